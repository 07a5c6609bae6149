"""The tls listener over real sockets: mutual TLS 1.3, HTTPS and WSS, the device as the
principal, and every refusal asserted where TLS 1.3 reports it (PITFALLS.md: a refused
client certificate is reported after the handshake, on the first read)."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

from twisted.trial.unittest import TestCase

from aico.gateway.devices.ca import DeviceCA
from aico.gateway.testing.harness import http_client, login, start_gateway
from tests import tlshelp


class TlsListenerTests(TestCase):
    timeout = 60

    async def _gateway(self) -> tuple[tlshelp.RunningGateway, Path, str, int]:
        gw = await start_gateway(self)
        work = Path(self.mktemp())
        work.mkdir()
        host, port = gw.tls_address
        return gw, work, host, port

    async def test_a_paired_device_gets_its_own_description_over_https_tls13(self) -> None:
        gw, work, host, port = await self._gateway()
        phone = await tlshelp.pair(gw, "phone", work, paired_for="admin")
        ctx = tlshelp.context(tlshelp.ca_file(gw, work), phone)
        seen = await tlshelp.probe(host, port, ctx)
        self.assertEqual(seen["version"], "TLSv1.3")
        status, body = await tlshelp.https_get(host, port, ctx, "/api/v1/devices/me")
        self.assertEqual(status, 200, body)
        self.assertEqual((body["device_id"], body["name"], body["trust"], body["paired_for"],
                          body["subject"], body["roles"]),
                         (phone.device_id, "phone", "standard", "admin", "admin", ["device"]))
        self.assertIn("conversations:write", body["capabilities"])
        self.assertNotIn("*", body["capabilities"])

    async def test_a_device_paired_for_nobody_is_its_own_subject_with_its_own_capabilities(self) -> None:
        gw, work, host, port = await self._gateway()
        kiosk = await tlshelp.pair(gw, "kiosk", work, capabilities=("kiosk:display",))
        ctx = tlshelp.context(tlshelp.ca_file(gw, work), kiosk)
        status, body = await tlshelp.https_get(host, port, ctx, "/api/v1/devices/me")
        self.assertEqual(status, 200, body)
        self.assertEqual(body["subject"], f"device:{kiosk.device_id}")
        self.assertIn("kiosk:display", body["capabilities"])

    async def test_a_user_token_over_https_is_narrowed_to_what_the_device_may_do(self) -> None:
        gw, work, host, port = await self._gateway()
        phone = await tlshelp.pair(gw, "phone", work)
        ctx = tlshelp.context(tlshelp.ca_file(gw, work), phone)
        tokens = await login(http_client(self), gw.base, "admin", gw.admin_password)
        token = tokens["access_token"]
        status, body = await tlshelp.https_get(host, port, ctx, "/api/v1/devices/me",
                                               {"Authorization": f"Bearer {token}"})
        self.assertEqual(status, 200, body)
        self.assertEqual(body["subject"], "admin")
        self.assertNotIn("*", body["capabilities"])
        self.assertIn("devices:self", body["capabilities"])

    async def test_devices_me_over_http_answers_404_no_device(self) -> None:
        gw, _, _, _ = await self._gateway()
        http = http_client(self)
        tokens = await login(http, gw.base, "admin", gw.admin_password)
        r = await http.get(gw.base + "/api/v1/devices/me",
                           headers={"Authorization": f"Bearer {tokens['access_token']}"})
        body = json.loads(await r.content())
        self.assertEqual((r.code, body["code"]), (404, "no_device"))

    async def test_a_client_without_a_certificate_is_refused_on_its_first_read(self) -> None:
        gw, work, host, port = await self._gateway()
        seen = await tlshelp.probe(host, port, tlshelp.context(tlshelp.ca_file(gw, work)))
        self.assertIsNone(seen["handshake"])  # TLS 1.3: the client's handshake completes
        self.assertIsInstance(seen["read"], ssl.SSLError)
        self.assertIn("CERTIFICATE_REQUIRED", str(seen["read"]).upper())
        self.assertEqual(seen["data"], b"")

    async def test_a_certificate_from_another_ca_is_refused_on_its_first_read(self) -> None:
        gw, work, host, port = await self._gateway()
        stranger = tlshelp.issue(DeviceCA.create("someone else's CA"), "stranger", work)
        seen = await tlshelp.probe(host, port,
                                   tlshelp.context(tlshelp.ca_file(gw, work), stranger))
        self.assertIsNone(seen["handshake"])
        self.assertIsInstance(seen["read"], ssl.SSLError)
        self.assertIn("UNKNOWN_CA", str(seen["read"]).upper())
        self.assertEqual(seen["data"], b"")

    async def test_tls_1_2_is_refused_in_the_handshake(self) -> None:
        gw, work, host, port = await self._gateway()
        phone = await tlshelp.pair(gw, "phone", work)
        ctx = tlshelp.context(tlshelp.ca_file(gw, work), phone, max_version=ssl.TLSVersion.TLSv1_2)
        seen = await tlshelp.probe(host, port, ctx)
        self.assertIsInstance(seen["handshake"], ssl.SSLError)
        self.assertIn("PROTOCOL_VERSION", str(seen["handshake"]).upper())

    async def test_a_certificate_of_our_ca_whose_device_is_not_paired_gets_403_then_close(self) -> None:
        gw, work, host, port = await self._gateway()
        ca = gw.parts.materials.device_ca
        assert ca is not None
        unpaired = tlshelp.issue(ca, "unpaired", work)
        seen = await tlshelp.probe(host, port, tlshelp.context(tlshelp.ca_file(gw, work), unpaired))
        self.assertIsNone(seen["handshake"])
        head, _, body = seen["data"].partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 403"), head)
        self.assertEqual(json.loads(body)["code"], "device_not_allowed")

    async def test_a_sync_peers_certificate_never_opens_https(self) -> None:
        gw, work, host, port = await self._gateway()
        peer = await tlshelp.pair(gw, "other-gateway", work, paired_for="sync")
        seen = await tlshelp.probe(host, port, tlshelp.context(tlshelp.ca_file(gw, work), peer))
        self.assertIsNone(seen["handshake"])
        head, _, body = seen["data"].partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 403"), head)
        self.assertEqual(json.loads(body)["code"], "device_not_allowed")
        self.assertIn("sync listener", json.loads(body)["detail"])

    async def test_a_revoked_device_is_refused_at_its_next_connection(self) -> None:
        gw, work, host, port = await self._gateway()
        phone = await tlshelp.pair(gw, "phone", work)
        ctx = tlshelp.context(tlshelp.ca_file(gw, work), phone)
        self.assertEqual((await tlshelp.https_get(host, port, ctx, "/api/v1/devices/me"))[0], 200)
        await gw.parts.device_gate.revoke(phone.device_id)
        seen = await tlshelp.probe(host, port, ctx)
        self.assertIsNone(seen["handshake"])
        head, _, body = seen["data"].partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 403"), head)
        self.assertEqual(json.loads(body)["code"], "device_not_allowed")

    async def test_a_wss_session_is_authenticated_by_the_device_certificate(self) -> None:
        gw, work, host, port = await self._gateway()
        phone = await tlshelp.pair(gw, "phone", work, paired_for="admin")
        ctx = tlshelp.context(tlshelp.ca_file(gw, work), phone)
        log: list[object] = []
        d = await tlshelp.wss_opened(host, port, ctx, log)
        welcome, auth, response = log[0], log[1], log[-2]
        assert isinstance(welcome, dict) and isinstance(auth, dict) and isinstance(response, dict)
        self.assertEqual((welcome["type"], welcome["authenticated"]), ("welcome", True))
        self.assertEqual((auth["type"], auth["subject"]), ("auth_success", "admin"))
        self.assertEqual(response["status"], 200, response)
        self.assertEqual(response["body"]["device_id"], phone.device_id)
        gw.parts.wss_factory.close_all()
        await d

    async def test_transport_lists_the_tls_endpoint_with_the_ca_fingerprint(self) -> None:
        gw, _, host, port = await self._gateway()
        r = await http_client(self).get(gw.base + "/api/v1/transport")
        body = json.loads(await r.content())
        ca = gw.parts.materials.device_ca
        assert ca is not None
        tls = {e["transport"]: e for e in body["endpoints"] if "ca_fingerprint" in e}
        self.assertEqual(tls["https"]["address"], f"https://{host}:{port}/api/v1")
        self.assertEqual(tls["wss"]["address"], f"wss://{host}:{port}/ws")
        self.assertEqual(tls["wss"]["ca_fingerprint"], ca.fingerprint)
        ports = json.loads((gw.state_dir / "ports.json").read_text())
        self.assertEqual(ports["tls"], {"host": host, "port": port})
