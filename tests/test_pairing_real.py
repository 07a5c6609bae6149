"""Pairing with real sockets: `aico-gateway pair --no-wait` opens a window in the state
directory of a running gateway, which opens its pairing listener; `aico-client pair`
pairs over TCP and writes the certificate directory."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import stat
from pathlib import Path

from cryptography import x509
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from aico.client import cli as client_cli
from aico.gateway import cli as gateway_cli
from aico.gateway.devices.ca import device_id
from aico.gateway.testing.harness import RunningGateway, start_gateway
from aico.gateway.testing.waiting import eventually
from aico.keystore import is_sealed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def open_window(gw: RunningGateway, *extra: str) -> str:
    """`aico-gateway pair --no-wait` on the gateway's state directory; the code it printed."""
    out, err = io.StringIO(), io.StringIO()
    status = gateway_cli.main(["pair", "--no-wait", "--state-dir", str(gw.state_dir), *extra],
                              stdout=out, stderr=err, environ={})
    assert status == 0, err.getvalue()
    match = re.search(r"pairing code: (\S+)", out.getvalue())
    assert match is not None, out.getvalue()
    return match.group(1)


async def client(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = await client_cli.run(reactor, list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


class PairingRealTests(TestCase):
    timeout = 60

    async def start(self) -> tuple[RunningGateway, int]:
        port = free_port()
        gw = await start_gateway(self, f"[pairing]\nport = {port}\n")
        return gw, port

    async def test_aico_client_pair_pairs_with_a_window_opened_by_aico_gateway_pair(self) -> None:
        gw, port = await self.start()
        self.assertIsNone(gw.parts.pairing.port)  # closed until a window opens
        code = open_window(gw, "--name", "Ursula's phone")
        # The gateway sees the CLI's window through the registry watcher.
        await eventually(lambda: gw.parts.pairing.port is not None, timeout=2)
        out_dir = Path(self.mktemp())
        self.patch(os, "environ", {**os.environ, "AICO_NO_KEYRING": "1"})
        status, out, err = await client("pair", "--host", "127.0.0.1", "--port", str(port),
                                        "--code", code, "--name", "android", "--out",
                                        str(out_dir))
        self.assertEqual(status, 0, err)
        # SPEC §7's four files, plus the keystore that seals device.key (its master secret
        # in a 0600 master-key file: this test turns the platform keyring off).
        self.assertEqual(sorted(p.name for p in out_dir.iterdir()),
                         ["ca.pem", "device.key", "device.pem", "gateway.json", "keystore.json",
                          "master-key"])
        self.assertEqual(stat.S_IMODE((out_dir / "device.key").stat().st_mode), 0o600)
        self.assertTrue(is_sealed((out_dir / "device.key").read_bytes()),
                        "the device key is sealed at rest, not plain PEM")
        cert = x509.load_pem_x509_certificate((out_dir / "device.pem").read_bytes())
        gateway = json.loads((out_dir / "gateway.json").read_text())
        server_cert = gw.parts.materials.server_identity[0]  # type: ignore[index]
        self.assertEqual(gateway, {"fingerprint": device_id(server_cert), "host": "127.0.0.1",
                                   "port": port, "tls_port": gateway["tls_port"],
                                   "name": "Ursula's phone", "device_id": device_id(cert)})
        self.assertIn(device_id(cert), out)
        devices = await gw.parts.devices.list()
        self.assertEqual([(d.device_id, d.name) for d in devices],
                         [(device_id(cert), "Ursula's phone")])
        # Used: the listener closes, and the code does not work a second time.
        await eventually(lambda: gw.parts.pairing.port is None, timeout=2)
        status, _, err = await client("pair", "--host", "127.0.0.1", "--port", str(port),
                                      "--code", code, "--name", "again", "--out",
                                      self.mktemp())
        self.assertEqual(status, 2, err)  # nothing listens any more
        events = [e.event for e in await gw.parts.audit.latest(50)]
        for event in ("pairing_opened", "device_paired", "pairing_window_closed"):
            self.assertIn(event, events)

    async def test_a_wrong_code_is_refused_and_three_close_the_window(self) -> None:
        gw, port = await self.start()
        code = open_window(gw)
        await eventually(lambda: gw.parts.pairing.port is not None, timeout=2)
        wrong = "2345-6789" if code != "2345-6789" else "3456-789A"
        for attempt in range(3):
            out_dir = Path(self.mktemp())
            status, _, err = await client("pair", "--host", "127.0.0.1", "--port", str(port),
                                          "--code", wrong, "--name", "mallory", "--out",
                                          str(out_dir))
            self.assertEqual(status, 1, err)
            self.assertIn("wrong_code", err)
            self.assertFalse(out_dir.exists())
        windows = await gw.parts.pairing_windows.active()
        self.assertEqual(windows, [])
        await eventually(lambda: gw.parts.pairing.port is None, timeout=2)
        status, _, err = await client("pair", "--host", "127.0.0.1", "--port", str(port),
                                      "--code", code, "--name", "late", "--out", self.mktemp())
        self.assertEqual(status, 2, err)
        self.assertEqual(await gw.parts.devices.list(), [])
