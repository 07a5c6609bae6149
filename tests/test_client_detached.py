"""aico.client in detached mode: HTTPS (treq) and WSS (Autobahn) with mutual TLS 1.3.

The gateway's own ``tls`` listener is tested elsewhere; here the server is a small real
TLS server made in the test — the real gateway site of :class:`tests.realtime.Realtime`
(test routes, the real WebSocket adapter) behind ``CertificateOptions`` that require a
client certificate from the test's CA, TLS 1.3 only, on 127.0.0.1 — with a front that
also answers ``GET /peer`` (the device ID of the client certificate it saw) and a tiny
``/api/v1/users/authenticate|refresh|me`` (for the login tests). Certificates are made
in the test with :class:`aico.gateway.devices.ca.DeviceCA`; nothing TLS is mocked.
"""

from __future__ import annotations

import io
import json
import secrets
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from aico.client import Client, ClientError, connect
from aico.client.cli import parser, run_request
from aico.client.tls import CATrust, PairedGateway, load_device_key
from aico.gateway.adapters.rest import GatewaySite, RestAdapter
from aico.gateway.adapters.websocket import websocket_resource
from aico.gateway.devices.ca import (
    DeviceCA,
    create_csr,
    device_id,
    generate_key,
    save_certificate,
    save_private_key,
)
from aico.gateway.testing.waiting import eventually
from aico.keystore import TEST_KDF, client_keystore
from tests.realtime import USER_CAPS, Realtime, reactor

# ----------------------------------------------------------------------- the test server


@dataclass
class FakeUsers:
    """``/api/v1/users/authenticate``, ``/refresh`` and ``/me`` for the login tests."""

    password: str = "correct horse"
    ttl: int = 900
    access: dict[str, float] = field(default_factory=dict)  # token -> expiry
    refresh: set[str] = field(default_factory=set)
    logins: int = 0
    refreshes: int = 0
    seen_bearers: list[str] = field(default_factory=list)

    def pair(self) -> dict[str, Any]:
        access, refresh = "acc-" + secrets.token_hex(8), "ref-" + secrets.token_hex(8)
        self.access[access] = time.time() + self.ttl
        self.refresh.add(refresh)
        return {"access_token": access, "refresh_token": refresh, "token_type": "Bearer",
                "expires_in": self.ttl}

    def answer(self, method: bytes, path: bytes, body: bytes,
               bearer: str) -> tuple[int, dict[str, Any]] | None:
        if path == b"/api/v1/users/authenticate" and method == b"POST":
            creds = json.loads(body)
            if creds.get("username") != "alice" or creds.get("password") != self.password:
                return 401, {"code": "invalid_credentials", "status": 401}
            self.logins += 1
            return 200, self.pair()
        if path == b"/api/v1/users/refresh" and method == b"POST":
            token = json.loads(body).get("refresh_token")
            if token not in self.refresh:
                return 401, {"code": "token_revoked", "status": 401}
            self.refresh.discard(token)
            self.refreshes += 1
            return 200, self.pair()
        if path == b"/api/v1/users/me":
            self.seen_bearers.append(bearer)
            expiry = self.access.get(bearer)
            if expiry is None:
                return 401, {"code": "token_invalid", "status": 401}
            if expiry < time.time():
                return 401, {"code": "token_expired", "status": 401}
            return 200, {"username": "alice", "roles": ["user"]}
        return None


class Front(Resource):
    """``/peer`` and the fake users routes; everything else goes to the gateway site."""

    isLeaf = True

    def __init__(self, inner: Any, users: FakeUsers) -> None:
        super().__init__()
        self.inner = inner
        self.users = users

    def render(self, request: Any) -> Any:
        path = request.path
        if path == b"/peer":
            cert = request.channel.transport.getPeerCertificate().to_cryptography()
            return self._json(request, 200, {"device_id": device_id(cert)})
        auth = (request.getHeader(b"authorization") or b"").decode()
        bearer = auth[7:] if auth.startswith("Bearer ") else ""
        answer = self.users.answer(request.method, path, request.content.read(), bearer)
        if answer is not None:
            return self._json(request, *answer)
        request.content.seek(0)
        return self.inner.render(request)

    @staticmethod
    def _json(request: Any, status: int, body: dict[str, Any]) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()


def server_options(ca: DeviceCA, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                   **extra: Any) -> CertificateOptions:
    """What the gateway's tls listener does: our CA's client certificates only, TLS 1.3."""
    if "lowerMaximumSecurityTo" not in extra:
        extra["raiseMinimumTo"] = TLSVersion.TLSv1_3
    return CertificateOptions(privateKey=cast(Any, key), certificate=cast(Any, cert),
                              trustRoot=CATrust(ca.cert), **extra)


class DetachedServer:
    """A Realtime gateway site behind mutual TLS (see the module docstring)."""

    def __init__(self, case: TestCase, rt: Realtime, ca: DeviceCA, *,
                 hostnames: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",),
                 server_ca: DeviceCA | None = None, **options: Any) -> None:
        self.ca = ca
        self.cert, self.key = (server_ca or ca).issue_server_cert(hostnames, ips)
        self.users = FakeUsers()
        resource, _ = websocket_resource(rt.sessions, lambda: rt.settings)
        inner = RestAdapter(rt.dispatcher, websocket=resource).resource()
        site = GatewaySite(Front(inner, self.users), body_limit=lambda: 1 << 20,
                           header_limits=lambda: (100, 16384))
        self.port = reactor.listenSSL(0, site, server_options(ca, self.cert, self.key, **options),
                                      interface="127.0.0.1")
        case.addCleanup(self.port.stopListening)

    @property
    def port_number(self) -> int:
        return int(self.port.getHost().port)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port_number}"


def paired_dir(root: Path, ca: DeviceCA, server_cert: x509.Certificate, *, tls_port: int = 0,
               name: str = "phone") -> Path:
    """A certificate directory as ``aico-client pair`` writes it (SPEC §7)."""
    root.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    cert = ca.issue_client_cert(create_csr(key, name), name)
    keystore = client_keystore(root, kdf=TEST_KDF, env={"AICO_NO_KEYRING": "1"})
    save_private_key(root / "device.key", key, keystore)
    save_certificate(root / "device.pem", cert)
    save_certificate(root / "ca.pem", ca.cert)
    (root / "gateway.json").write_text(json.dumps({
        "fingerprint": device_id(server_cert), "host": "127.0.0.1", "port": 8776,
        "tls_port": tls_port, "name": "test-gateway", "device_id": device_id(cert)}))
    return root


# ----------------------------------------------------------------------- the tests


class DetachedClientTests(TestCase):
    timeout = 30

    async def setUp(self) -> None:
        self.rt = await Realtime(self).start()
        self.token = self.rt.tokens.issue("alice", USER_CAPS)
        self.ca = DeviceCA.create()

    def serve(self, **kw: Any) -> DetachedServer:
        return DetachedServer(self, self.rt, self.ca, **kw)

    def certs(self, server: DetachedServer, pinned: x509.Certificate | None = None,
              ca: DeviceCA | None = None) -> Path:
        return paired_dir(Path(self.mktemp()), ca or self.ca, pinned or server.cert,
                          tls_port=server.port_number)

    async def connect(self, cert_dir: Path, url: str = "", **kw: Any) -> Client:
        client = await connect(reactor, cert_dir=cert_dir, url=url, token=self.token, **kw)
        self.addCleanup(client.close)
        return client

    async def refused(self, cert_dir: Path, url: str, order: tuple[str, ...]) -> str:
        """The error text of a connection that must not get through (WSS: at connect;
        HTTPS: at the first request, where the handshake happens)."""
        with self.assertRaises(ClientError) as caught:
            client = await self.connect(cert_dir, url, order=order)
            await client.request("GET", "/peer")
        return str(caught.exception)

    async def test_https_request_presents_the_device_certificate_and_reaches_the_routes(self) -> None:
        server = self.serve()
        certs = self.certs(server)
        client = await self.connect(certs, order=("https",))  # URL from gateway.json
        self.assertEqual(client.transport_name, "https")
        r = await client.request("GET", "/peer")
        self.assertEqual(r.json(), {"device_id": device_id(PairedGateway.load(certs).device_cert)})
        r = await client.request("POST", "/api/v1/echo", {"text": "hi"})
        self.assertEqual((r.status, r.json()["subject"], r.json()["echo"]), (200, "alice", {"text": "hi"}))
        r = await client.request("GET", "/api/v1/nope")
        self.assertEqual((r.status, r.json()["code"]), (404, "not_found"))
        self.assertEqual(r.headers["content-type"], "application/problem+json")
        streamed = await client.request("GET", "/api/v1/stream", query={"stream": "true"})
        self.assertEqual([json.loads(line) for line in streamed.body.splitlines()],
                         [{"delta": 0}, {"delta": 1}, {"delta": 2}])
        with self.assertRaises(ClientError):
            await client.subscribe("conversation/", lambda topic, value: None)

    async def test_wss_session_requests_and_events_with_the_device_certificate(self) -> None:
        server = self.serve()
        client = await self.connect(self.certs(server), server.url)
        self.assertEqual(client.transport_name, "wss")
        r = await client.request("POST", "/api/v1/echo", {"text": "hi"})
        self.assertEqual((r.status, r.json()["subject"]), (200, "alice"))
        events: list[tuple[str, Any]] = []
        await client.subscribe("conversation/", lambda topic, value: events.append((topic, value)))
        await self.rt.subscribed_on_bus("conversation/")
        self.rt.publish("conversation/out", {"n": 1})
        await eventually(lambda: bool(events))
        self.assertEqual(events, [("conversation/out", {"n": 1})])
        hb = await client.transport.heartbeat()  # type: ignore[union-attr]
        self.assertEqual(hb["type"], "heartbeat_ack")

    async def test_a_server_certificate_from_another_ca_is_refused(self) -> None:
        other = DeviceCA.create()
        server = self.serve(server_ca=other)
        # Pinned to that very certificate: only "not our CA" can refuse it.
        certs = self.certs(server)
        for order in (("https",), ("wss",)):
            error = await self.refused(certs, server.url, order)
            self.assertIn("certificate verify failed", error)

    async def test_a_server_certificate_from_our_ca_that_is_not_the_pinned_one_is_refused(self) -> None:
        server = self.serve()
        paired_with, _ = self.ca.issue_server_cert(("localhost",), ("127.0.0.1",))
        certs = self.certs(server, pinned=paired_with)
        for order in (("https",), ("wss",)):
            error = await self.refused(certs, server.url, order)
            self.assertIn("not the one pinned at pairing", error)

    async def test_a_server_certificate_for_another_host_is_refused(self) -> None:
        server = self.serve(hostnames=("gateway.example",), ips=())
        certs = self.certs(server)
        for order in (("https",), ("wss",)):
            error = await self.refused(certs, server.url, order)
            self.assertIn("not valid for 127.0.0.1", error)

    async def test_the_host_name_is_checked_against_dns_names_too(self) -> None:
        server = self.serve(hostnames=("localhost",), ips=())
        client = await self.connect(self.certs(server), f"https://localhost:{server.port_number}",
                                    order=("https",))
        self.assertEqual((await client.request("GET", "/peer")).status, 200)

    async def test_a_server_that_stops_at_tls_1_2_is_refused(self) -> None:
        server = self.serve(lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
        for order in (("https",), ("wss",)):
            error = await self.refused(self.certs(server), server.url, order)
            self.assertRegex(error.lower(), "version|protocol")

    async def test_a_gateway_that_refuses_the_device_certificate_is_an_error_not_a_hang(self) -> None:
        # TLS 1.3: the server's refusal of our certificate arrives after the handshake.
        server = DetachedServer(self, self.rt, DeviceCA.create(), server_ca=self.ca)
        certs = self.certs(server)
        for order in (("https",), ("wss",)):
            await self.refused(certs, server.url, order)

    async def test_no_deprecated_pyopenssl_call_on_the_client_side(self) -> None:
        server = self.serve()
        certs = self.certs(server)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            client = await self.connect(certs, server.url, order=("https",))
            self.assertEqual((await client.request("GET", "/peer")).status, 200)
            client = await self.connect(certs, server.url, order=("wss",))
            self.assertEqual((await client.request("GET", "/api/v1/ping")).status, 200)

    async def test_a_url_that_is_not_https_host_port_is_refused(self) -> None:
        certs = self.certs(self.serve())
        for url in ("http://127.0.0.1:8772", "https://127.0.0.1", "https://127.0.0.1:8772/other"):
            with self.assertRaises(ValueError):
                await connect(reactor, cert_dir=certs, url=url)

    async def test_the_device_key_is_read_through_one_function(self) -> None:
        server = self.serve()
        certs = self.certs(server)
        key = load_device_key(certs)
        self.assertEqual(key.public_key(), PairedGateway.load(certs).device_cert.public_key())
        (certs / "device.key").write_text("not a key")
        with self.assertRaises(ValueError):
            PairedGateway.load(certs)

    async def test_cli_request_over_https_with_a_cert_dir(self) -> None:
        server = self.serve()
        certs = self.certs(server)
        out, err = io.StringIO(), io.StringIO()
        args = parser().parse_args(["request", "POST", "/api/v1/echo", "--body", '{"text": "x"}',
                                    "--token", self.token, "--url", server.url,
                                    "--cert-dir", str(certs)])
        code = await run_request(reactor, args, out, err)
        self.assertEqual(code, 0, err.getvalue())
        self.assertEqual(json.loads(out.getvalue())["echo"], {"text": "x"})
        self.assertEqual(err.getvalue(), "200 via https\n")

    async def test_cli_request_reports_a_refused_gateway(self) -> None:
        server = self.serve()
        paired_with, _ = self.ca.issue_server_cert(("localhost",), ("127.0.0.1",))
        certs = self.certs(server, pinned=paired_with)
        out, err = io.StringIO(), io.StringIO()
        args = parser().parse_args(["request", "GET", "/peer", "--token", self.token,
                                    "--url", server.url, "--cert-dir", str(certs)])
        self.assertEqual(await run_request(reactor, args, out, err), 2)
        self.assertIn("pinned at pairing", err.getvalue())
        self.assertEqual(out.getvalue(), "")

