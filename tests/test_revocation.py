"""Revocation that bites at once: ``aico-gateway devices revoke`` (another process's
connection to the registry file) closes a device's open WSS and HTTPS keep-alive
connections within 1 s, and the revocation is audited."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from aico.gateway import cli
from aico.gateway.testing.harness import start_gateway
from aico.gateway.testing.waiting import eventually
from tests import tlshelp


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(list(argv), stdout=out, stderr=err, environ={})
    return status, out.getvalue(), err.getvalue()


class RevocationTests(TestCase):
    timeout = 60

    async def test_cli_revoke_closes_open_wss_and_https_keepalive_within_one_second(self) -> None:
        gw = await start_gateway(self)
        work = Path(self.mktemp())
        host, port = gw.tls_address
        phone = await tlshelp.pair(gw, "phone", work)
        other = await tlshelp.pair(gw, "laptop", work)
        ca = tlshelp.ca_file(gw, work)
        ctx, other_ctx = tlshelp.context(ca, phone), tlshelp.context(ca, other)

        log: list[object] = []
        wss = await tlshelp.wss_opened(host, port, ctx, log)
        keepalive = tlshelp.KeepAlive(host, port, ctx)
        status, _ = await deferToThread(keepalive.get, "/api/v1/devices/me")
        self.assertEqual(status, 200)
        waiting = deferToThread(keepalive.wait_closed)
        bystander = tlshelp.KeepAlive(host, port, other_ctx)
        self.assertEqual((await deferToThread(bystander.get, "/api/v1/devices/me"))[0], 200)
        self.assertEqual(gw.parts.device_gate.live(phone.device_id), 2)

        revoked_at = time.monotonic()
        status, _, err = await deferToThread(
            _cli, "devices", "revoke", phone.device_id, "--state-dir", str(gw.state_dir))
        self.assertEqual(status, 0, err)
        await waiting
        await wss
        assert keepalive.closed_at is not None
        self.assertLess(keepalive.closed_at - revoked_at, 1.0)
        closed = log[-1]
        assert isinstance(closed, tuple)
        self.assertLess(closed[1] - revoked_at, 1.0)
        self.assertEqual(closed[2], 4003)  # CLOSE_DEVICE_REVOKED
        # The next handshake of that device is refused; another device is untouched.
        seen = await tlshelp.probe(host, port, ctx)
        self.assertTrue(seen["data"].startswith(b"HTTP/1.1 403"), seen)
        self.assertEqual((await deferToThread(bystander.get, "/api/v1/devices/me"))[0], 200)
        bystander.conn.close()
        # Audited, by the CLI.
        rows = await gw.parts.db.run_query(
            "SELECT event, actor, detail FROM audit_log WHERE event = 'device_revoked'")
        self.assertEqual(len(rows), 1)
        self.assertEqual((rows[0][1], json.loads(rows[0][2])["device_id"]), ("cli", phone.device_id))

    async def test_in_process_revoke_closes_https_keepalive_within_one_second(self) -> None:
        gw = await start_gateway(self)
        work = Path(self.mktemp())
        host, port = gw.tls_address
        phone = await tlshelp.pair(gw, "phone", work)
        keepalive = tlshelp.KeepAlive(host, port, tlshelp.context(tlshelp.ca_file(gw, work), phone))
        self.assertEqual((await deferToThread(keepalive.get, "/api/v1/devices/me"))[0], 200)
        waiting = deferToThread(keepalive.wait_closed)
        started = time.monotonic()
        self.assertTrue(await gw.parts.device_gate.revoke(phone.device_id))
        await waiting
        assert keepalive.closed_at is not None
        self.assertLess(keepalive.closed_at - started, 1.0)
        self.assertEqual(gw.parts.device_gate.live(phone.device_id), 0)


class DevicesCliTests(TestCase):
    timeout = 60

    async def test_list_rename_and_revoke_from_the_command_line(self) -> None:
        gw = await start_gateway(self)
        work = Path(self.mktemp())
        phone = await tlshelp.pair(gw, "phone", work, paired_for="admin")
        state = str(gw.state_dir)
        status, out, _ = await deferToThread(_cli, "devices", "list", "--state-dir", state)
        self.assertEqual(status, 0)
        self.assertIn(phone.device_id, out)
        self.assertIn("phone\tstandard\tactive\tpaired for admin", out)
        status, out, err = await deferToThread(
            _cli, "devices", "rename", phone.device_id.lower(), "my phone", "--state-dir", state)
        self.assertEqual(status, 0, err)
        status, out, _ = await deferToThread(_cli, "devices", "list", "--json", "--state-dir", state)
        entry = json.loads(out.splitlines()[0])
        self.assertEqual((entry["name"], entry["revoked"]), ("my phone", False))
        self.assertEqual(
            (await deferToThread(_cli, "devices", "revoke", phone.device_id, "--state-dir", state))[0], 0)
        status, _, err = await deferToThread(_cli, "devices", "revoke", phone.device_id,
                                             "--state-dir", state)
        self.assertEqual(status, 1)
        self.assertIn("revoked already", err)
        status, _, err = await deferToThread(_cli, "devices", "revoke", "NOT-AN-ID",
                                             "--state-dir", state)
        self.assertEqual(status, 2)
        # The running gateway learns the new name and the revocation (ChangeWatcher).
        await eventually(lambda: (d := gw.parts.device_gate.get(phone.device_id)) is not None
                         and d.revoked and d.name == "my phone")
