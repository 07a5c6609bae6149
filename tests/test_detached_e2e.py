"""Detached mode end to end on real parts: a window opened with `aico-gateway pair`, a
device paired with `aico-client pair` over real TCP (SPAKE2), then that device's new
certificate used over the real mutual-TLS listener — an HTTPS request through
`aico-client request --cert-dir`, and a WSS session with requests and events through
`aico.client.connect(cert_dir=…)` — and finally its revocation cutting the WSS session."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from aico.client.connect import connect
from aico.gateway import cli as gateway_cli
from aico.gateway.testing.harness import RunningGateway, start_gateway
from aico.gateway.testing.waiting import eventually
from tests.test_pairing_real import client, free_port, open_window


class DetachedEndToEndTests(TestCase):
    timeout = 60

    async def paired(self) -> tuple[RunningGateway, Path, str]:
        port = free_port()
        gw = await start_gateway(self, f"[pairing]\nport = {port}\n")
        code = open_window(gw, "--for", "admin", "--name", "laptop")
        await eventually(lambda: gw.parts.pairing.port is not None, timeout=2)
        out_dir = Path(self.mktemp())
        self.patch(os, "environ", {**os.environ, "AICO_NO_KEYRING": "1"})
        status, _, err = await client("pair", "--host", "127.0.0.1", "--port", str(port),
                                      "--code", code, "--name", "laptop", "--out", str(out_dir))
        self.assertEqual(status, 0, err)
        device_id = json.loads((out_dir / "gateway.json").read_text())["device_id"]
        return gw, out_dir, device_id

    def url(self, gw: RunningGateway) -> str:
        host, port = gw.tls_address
        return f"https://{host}:{port}"

    async def test_a_device_paired_by_the_clis_reaches_https_and_wss_with_its_new_certificate(
            self) -> None:
        gw, cert_dir, device_id = await self.paired()

        # HTTPS, through the client CLI: the device is the principal, paired for admin.
        status, out, err = await client("request", "GET", "/api/v1/devices/me",
                                        "--cert-dir", str(cert_dir), "--url", self.url(gw),
                                        "--transport", "https")
        self.assertEqual(status, 0, err)
        self.assertIn("via https", err)
        me = json.loads(out)
        self.assertEqual((me["device_id"], me["name"], me["paired_for"]),
                         (device_id, "laptop", "admin"))

        # WSS, through the library: requests and an event on the user's own topic.
        c = await connect(reactor, cert_dir=cert_dir, url=self.url(gw), order=("wss",))
        self.addCleanup(c.close)
        self.assertEqual(c.transport_name, "wss")
        events: list[tuple[str, Any]] = []
        await c.subscribe("user/admin/", lambda topic, body: events.append((topic, body)))
        answer = await c.request("POST", "/api/v1/conversations/messages",
                                 {"message": "hello from the laptop"})
        self.assertEqual(answer.status, 200, answer.body)
        await eventually(lambda: events, timeout=5)
        topic, body = events[0]
        self.assertEqual(topic, "user/admin/conversation/output/v1")
        self.assertEqual(body["reply"], answer.json()["reply"])

    async def test_revoking_the_paired_device_cuts_its_wss_session_within_a_second(self) -> None:
        gw, cert_dir, device_id = await self.paired()
        c = await connect(reactor, cert_dir=cert_dir, url=self.url(gw), order=("wss",))
        self.addCleanup(c.close)
        transport = c.transport
        assert transport is not None
        lost: Deferred[None] = Deferred()
        previous = transport.on_lost

        def on_lost(*args: Any) -> None:
            if not lost.called:
                lost.callback(None)
            previous(*args)

        transport.on_lost = on_lost
        self.assertEqual((await c.request("GET", "/api/v1/devices/me")).status, 200)
        out, err = io.StringIO(), io.StringIO()
        status = gateway_cli.main(["devices", "revoke", device_id, "--state-dir",
                                   str(gw.state_dir)], stdout=out, stderr=err, environ={})
        self.assertEqual(status, 0, err.getvalue())
        started = reactor.seconds()
        await lost
        self.assertLess(reactor.seconds() - started, 1.0)
        # Its next connection is refused: a 403 problem on its first request, then closed.
        status, out, err = await client("request", "GET", "/api/v1/devices/me",
                                        "--cert-dir", str(cert_dir), "--url", self.url(gw),
                                        "--transport", "https")
        self.assertEqual(status, 1, err)
        self.assertEqual(json.loads(out)["code"], "device_not_allowed")
