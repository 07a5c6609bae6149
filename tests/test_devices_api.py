"""The device principal and ``GET /api/v1/devices/me`` on the in-memory gateway: the
chain makes a ``tls`` request's device its principal, refuses an unknown or revoked
device, narrows a token to the device, and ignores a device ID on other transports."""

from __future__ import annotations

import json

from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from aico.gateway.devices.ca import DeviceCA, create_csr, generate_key
from aico.gateway.devices.registry import Device
from aico.gateway.routing.messages import Request, Response
from aico.gateway.testing.memory import MemoryGateway


class DevicePrincipalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = MemoryGateway(test=self)
        self.ca = DeviceCA.create()

    def _pair(self, name: str, **kw: object) -> Device:
        cert = self.ca.issue_client_cert(create_csr(generate_key(), name), name)
        pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        device: Device = self.successResultOf(
            Deferred.fromCoroutine(self.gw.parts.devices.add(pem, name, **kw)))  # type: ignore[arg-type]
        self.gw.parts.device_gate.remember(device)
        return device

    def _get(self, path: str, device_id: str, transport: str = "tls",
             headers: dict[str, str] | None = None) -> Response:
        request = Request(method="GET", path=path, request_id="r1", transport=transport,
                          peer_host="192.0.2.7", device_id=device_id, headers=headers or {})
        response: Response = self.successResultOf(self.gw.parts.dispatcher.handle(request))
        return response

    def test_a_paired_device_is_the_principal_with_role_device_and_its_own_capabilities(self) -> None:
        phone = self._pair("phone", paired_for="ursula", capabilities=("notes:read",))
        r = self._get("/api/v1/devices/me", phone.device_id)
        body = json.loads(r.body)
        self.assertEqual(r.status, 200, body)
        self.assertEqual((body["subject"], body["roles"], body["paired_for"], body["trust"]),
                         ("ursula", ["device"], "ursula", "standard"))
        self.assertIn("notes:read", body["capabilities"])
        self.assertIn("conversations:write", body["capabilities"])

    def test_an_unknown_device_is_refused_403_device_not_allowed(self) -> None:
        r = self._get("/api/v1/devices/me", "AAAAAAA-BBBBBBB")
        self.assertEqual((r.status, json.loads(r.body)["code"]), (403, "device_not_allowed"))

    def test_a_revoked_device_is_refused_from_its_next_request(self) -> None:
        phone = self._pair("phone")
        self.assertEqual(self._get("/api/v1/devices/me", phone.device_id).status, 200)
        self.successResultOf(self.gw.parts.device_gate.revoke(phone.device_id))
        r = self._get("/api/v1/devices/me", phone.device_id)
        self.assertEqual((r.status, json.loads(r.body)["code"]), (403, "device_not_allowed"))

    def test_a_device_id_on_the_http_transport_is_not_a_principal(self) -> None:
        phone = self._pair("phone")
        r = self._get("/api/v1/devices/me", phone.device_id, transport="http")
        self.assertEqual(r.status, 401)

    def test_a_standard_device_may_not_administer_and_an_admin_trusted_one_is_flagged(self) -> None:
        standard = self._pair("phone")
        admin = self._pair("laptop", trust="admin")
        chain = self.gw.parts.chain
        for device, flagged in ((standard, False), (admin, True)):
            request = Request(method="GET", path="/api/v1/devices/me", request_id="r",
                              transport="tls", device_id=device.device_id)
            chain.authenticate(request)
            self.assertEqual(request.device_admin, flagged)
            assert request.principal is not None
            self.assertNotIn("*", request.principal.caps)

    def test_over_http_a_user_token_gets_404_no_device(self) -> None:
        self.gw.add_user("ursula", "a-long-password-1", ("user",))
        token = self.gw.token("ursula", "a-long-password-1")
        r = self.gw.get("/api/v1/devices/me", token=token)
        self.assertEqual((r.code, r.json()["code"]), (404, "no_device"))
