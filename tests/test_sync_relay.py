"""The sync relay: magic-wormhole's transit relay, our client endpoint, TLS end to end.

In memory: tokens, sides, the TLS role rule and every path of :class:`RelayClientEndpoint`
(a fake relay endpoint, ``StringTransport``, a ``Clock``). On real sockets (127.0.0.1,
port 0): the transit relay's own service in process, two endpoints meeting through it,
tokens that never meet, mutual TLS 1.3 end to end with every byte the relay forwarded
recorded (no plaintext in it), and ``twistd aico-relay`` as a process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.plugin import getPlugins
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from aico.client.tls import CATrust
from aico.gateway.devices.ca import DeviceCA, create_csr, device_id, generate_key
from aico.gateway.testing.processes import ProcessOutput
from aico.gateway.testing.waiting import eventually
from aico.gateway.tls import server_options
from aico.sync import relay
from aico.sync.relay import (
    RelayClientEndpoint,
    RelayError,
    RelayRefused,
    RelayTimeout,
    RelayUnreachable,
    handshake_line,
    is_tls_server,
    relay_side,
    relay_token,
    tls_client_factory,
    tls_server_factory,
)
from aico.sync.testing import recording_transit, start_recording_relay

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")
A = "AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA"
B = "BBBBBBB-BBBBBBB-BBBBBBB-BBBBBBB-BBBBBBB-BBBBBBB-BBBBBBB-BBBBBBB"


# --------------------------------------------------------------------------- helpers


class Recorder(Protocol):
    """Records what it is given; writes *greeting* as soon as it is connected."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.received = b""
        self.made = 0
        self.lost: Failure | None = None
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.made += 1
        if self.greeting and self.transport is not None:
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason
        if not self.ended.called:
            self.ended.callback(None)


class RecorderFactory(Factory):
    def __init__(self, greeting: bytes = b"", refuse: bool = False) -> None:
        self.greeting = greeting
        self.refuse = refuse
        self.built: list[Recorder] = []
        self.addresses: list[Any] = []

    def buildProtocol(self, addr: Any) -> Recorder | None:  # type: ignore[override]
        self.addresses.append(addr)
        if self.refuse:
            return None
        p = Recorder(self.greeting)
        p.factory = self
        self.built.append(p)
        return p


@implementer(IStreamClientEndpoint)
class FakeRelay:
    """A relay endpoint whose connections the test completes (or fails) by hand."""

    def __init__(self) -> None:
        self.pending: list[tuple[IProtocolFactory, Deferred[IProtocol]]] = []
        self.cancelled = 0

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        def cancel(_: Deferred[IProtocol]) -> None:
            self.cancelled += 1

        d: Deferred[IProtocol] = Deferred(cancel)
        self.pending.append((factory, d))
        return d

    def complete(self) -> tuple[Protocol, StringTransport]:
        factory, d = self.pending.pop(0)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "203.0.113.7", 4001))
        proto: Any = factory.buildProtocol(transport.getPeer())
        proto.makeConnection(transport)
        d.callback(proto)
        return proto, transport


TOKEN = relay_token(A, B)
SIDE = "0123456789abcdef"


def failure_of(d: Deferred[Any]) -> Failure:
    out: list[Failure] = []
    d.addErrback(out.append)
    assert out, "the Deferred has not failed"
    return out[0]


# --------------------------------------------------------------------------- in memory


class TokenTests(SynchronousTestCase):
    def test_the_token_is_64_hex_and_the_same_in_either_order(self) -> None:
        self.assertRegex(relay_token(A, B), r"^[0-9a-f]{64}$")
        self.assertEqual(relay_token(A, B), relay_token(B, A))

    def test_different_pairs_and_secrets_give_different_tokens(self) -> None:
        c = "C" * len(A)
        self.assertEqual(len({relay_token(A, B), relay_token(A, c), relay_token(B, c),
                              relay_token(A, B, secret=b"shared")}), 4)
        # Concatenation cannot be confused: the parts are length-prefixed.
        self.assertNotEqual(relay_token("ab", "c"), relay_token("a", "bc"))

    def test_a_pair_needs_two_different_identities(self) -> None:
        for a, b in ((A, A), ("", B), (A, "")):
            self.assertRaises(ValueError, relay_token, a, b)

    def test_a_side_is_16_random_hex(self) -> None:
        sides = {relay_side() for _ in range(50)}
        self.assertEqual(len(sides), 50)
        for side in sides:
            self.assertRegex(side, r"^[0-9a-f]{16}$")

    def test_the_handshake_line_is_the_transit_relays(self) -> None:
        self.assertEqual(handshake_line(TOKEN, SIDE),
                         f"please relay {TOKEN} for side {SIDE}\n".encode())
        for token, side in ((TOKEN[:-1], SIDE), (TOKEN.upper(), SIDE), (TOKEN, "xyz"),
                            (TOKEN + "\nx", SIDE)):
            self.assertRaises(ValueError, handshake_line, token, side)

    def test_exactly_one_of_two_peers_is_the_tls_server_the_one_sorting_first(self) -> None:
        self.assertTrue(is_tls_server(A, B))
        self.assertFalse(is_tls_server(B, A))
        self.assertRaises(ValueError, is_tls_server, A, A)


class EndpointTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.relay = FakeRelay()
        self.endpoint = RelayClientEndpoint(self.clock, self.relay, TOKEN, SIDE, timeout=5)
        self.factory = RecorderFactory(greeting=b"hello")

    def test_bad_arguments_are_refused_at_construction(self) -> None:
        self.assertRaises(ValueError, RelayClientEndpoint, self.clock, self.relay, "nope", SIDE)
        self.assertRaises(ValueError, RelayClientEndpoint, self.clock, self.relay, TOKEN, SIDE, 0)

    def test_it_sends_the_handshake_and_waits_for_ok(self) -> None:
        d = self.endpoint.connect(self.factory)
        _, transport = self.relay.complete()
        self.assertEqual(transport.value(), handshake_line(TOKEN, SIDE))
        self.assertNoResult(d)
        self.assertEqual(self.factory.built, [])

    def test_after_ok_the_same_transport_goes_to_the_callers_protocol_and_nothing_is_lost(self) -> None:
        d = self.endpoint.connect(self.factory)
        proto, transport = self.relay.complete()
        transport.clear()
        # The peer's first bytes can come in the very chunk that carries "ok\n".
        proto.dataReceived(b"ok\nfirst bytes of the peer")
        inner = self.successResultOf(d)
        self.assertIsInstance(inner, Recorder)
        assert isinstance(inner, Recorder)
        self.assertIs(inner.transport, transport)
        self.assertEqual(inner.made, 1)
        self.assertEqual(self.factory.addresses, [IPv4Address("TCP", "203.0.113.7", 4001)])
        self.assertEqual(transport.value(), b"hello")  # the inner protocol writes directly
        proto.dataReceived(b"; more")
        self.assertEqual(inner.received, b"first bytes of the peer; more")
        proto.connectionLost(Failure(ConnectionRefusedError()))
        assert inner.lost is not None
        self.assertTrue(inner.lost.check(ConnectionRefusedError))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_ok_split_over_reads(self) -> None:
        d = self.endpoint.connect(self.factory)
        proto, _ = self.relay.complete()
        proto.dataReceived(b"o")
        self.assertNoResult(d)
        proto.dataReceived(b"k")
        self.assertNoResult(d)
        proto.dataReceived(b"\nx")
        inner = self.successResultOf(d)
        assert isinstance(inner, Recorder)
        self.assertEqual(inner.received, b"x")

    def test_another_answer_is_a_clear_refusal_and_closes(self) -> None:
        d = self.endpoint.connect(self.factory)
        proto, transport = self.relay.complete()
        proto.dataReceived(b"bad handshake\n")
        f = failure_of(d)
        self.assertTrue(f.check(RelayRefused))
        self.assertIn("bad handshake", str(f.value))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.built, [])
        proto.connectionLost(connectionDone)  # reported once only
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_endless_line_is_refused(self) -> None:
        d = self.endpoint.connect(self.factory)
        proto, transport = self.relay.complete()
        proto.dataReceived(b"x" * 2000)
        self.assertTrue(failure_of(d).check(RelayRefused))
        self.assertTrue(transport.disconnecting)

    def test_no_peer_in_time_is_a_timeout_error_and_the_connection_is_aborted(self) -> None:
        d = self.endpoint.connect(self.factory)
        proto, transport = self.relay.complete()
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        f = failure_of(d)
        self.assertTrue(f.check(RelayTimeout))
        self.assertEqual(str(f.value), "no peer met us at the relay within 5 s")
        self.assertTrue(transport.disconnecting)
        proto.dataReceived(b"ok\n")  # too late: no protocol is built
        proto.connectionLost(connectionDone)
        self.assertEqual(self.factory.built, [])

    def test_a_relay_that_does_not_accept_in_time_is_a_timeout_too(self) -> None:
        d = self.endpoint.connect(self.factory)
        self.clock.advance(5)
        self.assertTrue(failure_of(d).check(RelayTimeout))
        self.assertEqual(self.relay.cancelled, 1)

    def test_an_unreachable_relay_is_reported_as_such(self) -> None:
        d = self.endpoint.connect(self.factory)
        _, connecting = self.relay.pending.pop()
        connecting.errback(ConnectionRefusedError("nobody there"))
        f = failure_of(d)
        self.assertTrue(f.check(RelayUnreachable))
        self.assertIn("could not reach the relay", str(f.value))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_relay_closing_before_ok_is_an_error(self) -> None:
        d = self.endpoint.connect(self.factory)
        proto, _ = self.relay.complete()
        proto.connectionLost(connectionDone)
        f = failure_of(d)
        self.assertTrue(f.check(RelayError))
        self.assertIn("before a peer met us", str(f.value))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelling_closes_the_connection(self) -> None:
        d = self.endpoint.connect(self.factory)
        proto, transport = self.relay.complete()
        d.cancel()
        self.assertTrue(failure_of(d).check(CancelledError))
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(connectionDone)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_factory_that_refuses_closes_the_connection(self) -> None:
        d = self.endpoint.connect(RecorderFactory(refuse=True))
        proto, transport = self.relay.complete()
        proto.dataReceived(b"ok\n")
        self.assertTrue(failure_of(d).check(RelayError))
        self.assertTrue(transport.disconnecting)


class PluginTests(SynchronousTestCase):
    def test_the_aico_relay_dropin_is_found_and_imports_only_twisted(self) -> None:
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("aico-relay", makers)
        self.assertEqual(makers["aico-relay"].module, "aico.sync.relay")
        source = (ROOT / "twisted" / "plugins" / "aico_relay.py").read_text()
        imports = [line for line in source.splitlines() if line.startswith(("import", "from"))]
        self.assertTrue(imports and all("twisted" in line for line in imports), imports)
        self.assertFalse((ROOT / "twisted" / "plugins" / "__init__.py").exists())

    def test_options_default_to_port_4001_on_every_interface_with_blurred_usage(self) -> None:
        o = relay.Options()
        o.parseOptions([])
        self.assertEqual((o["port"], o["blur-usage"], o["port-file"]),
                         ("tcp:4001", 3600, None))
        o = relay.Options()
        o.parseOptions(["--port", "5000", "--blur-usage", "0"])
        self.assertEqual((o["port"], o["blur-usage"]), ("tcp:5000", 0))
        self.assertRaises(UsageError, relay.Options().parseOptions, ["--blur-usage", "x"])


# --------------------------------------------------------------------------- real sockets


#: The relay's own connection class, keeping every byte it forwarded.
RecordingTransit: Any = recording_transit()


class TLSProbe(Protocol):
    """Over TLS: records what arrives, sends *send* once the handshake is done."""

    def __init__(self, send: bytes) -> None:
        self.send = send
        self.received = b""
        self.peer: x509.Certificate | None = None
        self.version = ""
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.send)  # queued by TLS until the handshake is done

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        transport: Any = self.transport
        cert = transport.getPeerCertificate()
        if cert is not None:
            self.peer = cert.to_cryptography()
        self.version = transport.getHandle().get_protocol_version_name()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.lost.called:
            self.lost.callback(None)


class ProbeFactory(Factory):
    def __init__(self, send: bytes) -> None:
        self.send = send
        self.built: list[TLSProbe] = []

    def buildProtocol(self, addr: Any) -> TLSProbe:
        p = TLSProbe(self.send)
        self.built.append(p)
        return p


def client_options(ca: x509.Certificate, cert: x509.Certificate,
                   key: ec.EllipticCurvePrivateKey) -> CertificateOptions:
    return CertificateOptions(privateKey=key, certificate=cert,  # type: ignore[arg-type]
                              trustRoot=CATrust(ca), raiseMinimumTo=TLSVersion.TLSv1_3)


class RelayRealTests(TestCase):
    timeout = 30

    def start_relay(self) -> int:
        return start_recording_relay(self, reactor, RecordingTransit)

    def endpoint(self, port: int, token: str = TOKEN, side: str | None = None,
                 timeout: float = 10) -> RelayClientEndpoint:
        return RelayClientEndpoint(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                   token, side or relay_side(), timeout=timeout)

    def close_at_end(self, *protocols: Recorder) -> None:
        async def close() -> None:
            for p in protocols:
                if p.transport is not None:
                    p.transport.loseConnection()
            for p in protocols:
                await p.ended

        self.addCleanup(lambda: Deferred.fromCoroutine(close()))

    async def test_two_peers_with_the_same_token_meet_and_talk_both_ways(self) -> None:
        port = self.start_relay()
        fa, fb = RecorderFactory(b"hello from a"), RecorderFactory(b"hello from b")
        da = self.endpoint(port).connect(fa)
        await eventually(lambda: len(RecordingTransit.instances) == 1)
        self.assertNoResult(da)  # alone at the relay: still waiting
        db = self.endpoint(port).connect(fb)
        a, b = await da, await db
        assert isinstance(a, Recorder) and isinstance(b, Recorder)
        self.close_at_end(a, b)
        await eventually(lambda: a.received == b"hello from b" and b.received == b"hello from a")
        assert a.transport is not None
        a.transport.write(b" and more")
        await eventually(lambda: b.received == b"hello from a and more")

    async def test_different_tokens_never_meet_and_time_out_clearly(self) -> None:
        port = self.start_relay()
        fa, fb = RecorderFactory(), RecorderFactory()
        da = self.endpoint(port, relay_token(A, B), timeout=0.5).connect(fa)
        db = self.endpoint(port, relay_token(A, "C" * 63), timeout=0.5).connect(fb)
        for d in (da, db):
            with self.assertRaises(RelayTimeout) as e:
                await d
            self.assertEqual(str(e.exception), "no peer met us at the relay within 0.5 s")
        self.assertEqual((fa.built, fb.built), ([], []))
        # And the relay let go of both connections.
        await eventually(lambda: len(RecordingTransit.instances) == 2 and not any(
            t.transport.connected for t in RecordingTransit.instances))

    async def test_mutual_tls_13_runs_end_to_end_and_the_relay_sees_no_plaintext(self) -> None:
        port = self.start_relay()
        # Gateway A (identity sorts first: the TLS server) and gateway B. B holds a client
        # certificate issued by A's CA, as after `sync join`.
        ca_a = DeviceCA.create("A device CA")
        server_cert, server_key = ca_a.issue_server_cert()
        b_key = generate_key()
        b_cert = ca_a.issue_client_cert(create_csr(b_key, "gateway-b"), "gateway-b")
        id_a, id_b = "A" + device_id(ca_a.cert)[1:], "B" + device_id(b_cert)[1:]
        self.assertTrue(is_tls_server(id_a, id_b))
        self.assertFalse(is_tls_server(id_b, id_a))
        token = relay_token(id_a, id_b)
        self.assertEqual(token, relay_token(id_b, id_a))

        marker_a, marker_b = b"SECRET-MARKER-FROM-A-" * 20, b"SECRET-MARKER-FROM-B-" * 20
        server = ProbeFactory(marker_a)
        client = ProbeFactory(marker_b)
        da = self.endpoint(port, token).connect(
            tls_server_factory(server_options(ca_a.cert, server_cert, server_key), server))
        db = self.endpoint(port, token).connect(
            tls_client_factory(client_options(ca_a.cert, b_cert, b_key), client))
        await da
        await db
        s, c = server.built[0], client.built[0]
        await eventually(lambda: s.received == marker_b and c.received == marker_a)
        # Mutual TLS 1.3, each side authenticated by the other.
        self.assertEqual((s.version, c.version), ("TLSv1.3", "TLSv1.3"))
        assert s.peer is not None and c.peer is not None
        self.assertEqual(device_id(s.peer), device_id(b_cert))
        self.assertEqual(device_id(c.peer), device_id(server_cert))
        # Every byte the relay forwarded, in each direction: ciphertext only.
        forwarded = [b"".join(t.forwarded) for t in RecordingTransit.instances]
        self.assertEqual(len(forwarded), 2)
        self.assertTrue(all(len(f) > len(marker_a) for f in forwarded))
        for f in forwarded:
            self.assertNotIn(b"SECRET-MARKER", f)
        for p in (s, c):
            assert p.transport is not None
            p.transport.loseConnection()
        await s.lost
        await c.lost

    async def test_a_peer_without_a_certificate_from_the_servers_ca_is_refused(self) -> None:
        port = self.start_relay()
        ca_a, ca_other = DeviceCA.create("A device CA"), DeviceCA.create("other CA")
        server_cert, server_key = ca_a.issue_server_cert()
        key = generate_key()
        cert = ca_other.issue_client_cert(create_csr(key, "intruder"), "intruder")
        server, client = ProbeFactory(b"for members only"), ProbeFactory(b"let me in")
        da = self.endpoint(port).connect(
            tls_server_factory(server_options(ca_a.cert, server_cert, server_key), server))
        db = self.endpoint(port).connect(
            tls_client_factory(client_options(ca_a.cert, cert, key), client))
        await da
        await db
        # TLS 1.3: the refusal arrives on the first read; nothing crosses.
        await client.built[0].lost
        await server.built[0].lost
        self.assertEqual((server.built[0].received, client.built[0].received), (b"", b""))


RelayProcess = ProcessOutput


class TwistdRelayTests(TestCase):
    timeout = 30

    async def test_twistd_aico_relay_pairs_two_clients_and_stops_on_sigterm(self) -> None:
        port_file = Path(os.path.abspath(self.mktemp()))
        proto = RelayProcess()
        process = reactor.spawnProcess(
            proto, TWISTD, [TWISTD, "-n", "--pidfile=", "aico-relay",
                            "--port", "tcp:0:interface=127.0.0.1", "--port-file", str(port_file)],
            env=dict(os.environ), path=str(ROOT))

        def kill() -> Deferred[int] | None:
            if proto.ended.called:
                return None
            process.signalProcess("KILL")
            return proto.ended

        self.addCleanup(kill)

        def listening() -> bool:
            if proto.ended.called:
                self.fail("twistd ended early:\n" + proto.output.decode(errors="replace"))
            return port_file.exists()

        await eventually(listening, timeout=15)
        info = json.loads(port_file.read_text())
        self.assertEqual(info["host"], "127.0.0.1")
        token = relay_token(A, B)
        fa, fb = RecorderFactory(b"ping"), RecorderFactory(b"pong")
        ep = lambda: RelayClientEndpoint(  # noqa: E731
            reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", info["port"]), token, relay_side(), 10)
        da, db = ep().connect(fa), ep().connect(fb)
        a, b = await da, await db
        assert isinstance(a, Recorder) and isinstance(b, Recorder)
        await eventually(lambda: a.received == b"pong" and b.received == b"ping")
        process.signalProcess("TERM")
        self.assertEqual(await proto.ended, 0, proto.output.decode(errors="replace"))
        await a.ended
        await b.ended
        self.assertNotIn(b"Traceback", proto.output)
        self.assertNotIn(token.encode(), proto.output)  # the relay does not log tokens
