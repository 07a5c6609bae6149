"""Transport hardening (issue 9): what a hostile client can make the gateway hold, write
or log is bounded, and every request it sends meets the gateway's own answers.

* a WebSocket that floods pings and never reads is closed (1008), its buffers bounded;
* a request body that trickles in is answered 408 at ``limits.body_timeout``, a chunked
  body past ``body_max`` 413 at once;
* a request target that is not UTF-8 is the gateway's 400 (rate-limited, one log line);
  no response names the framework (``Server: TwistedWeb``);
* no log line can be forged (CR, LF, U+2028 in usernames, paths, headers, tracebacks);
* refused WebSocket upgrades are problem+json; refused tokens on sockets are charged to
  the rate limiter; only-unknown subprotocols are refused; methods are case-sensitive;
  refused bus keys are logged at a bounded rate.

In memory first; the real-socket tests at the end prove what memory cannot (a kernel
buffer that fills, a real slow body, raw bytes on the wire, the twistd text log).
"""

from __future__ import annotations

import io
import json
import socket
import struct
import threading
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import (
    Logger,
    globalLogPublisher,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.bus.zap import RefusalLog, ZapHandler
from aico.gateway import logs
from aico.gateway.adapters.websocket import (
    CLOSE_POLICY,
    SUBPROTOCOL_JSON,
    SUBPROTOCOL_PROTO,
    WebSocketSession,
)
from aico.gateway.testing.harness import http_client, login, start_gateway
from aico.gateway.testing.memory import MemoryGateway
from aico.gateway.testing.waiting import eventually
from tests import test_process
from tests.wsmodules import connected, gateway, user_token

SEND_BUFFER = 65_536
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def sessions(gw: Any) -> list[WebSocketSession]:
    return [c for c in gw.parts.connections if isinstance(c, WebSocketSession)]


def split(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    """Status line, header fields (lower-case names), body of one HTTP/1.1 answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if fields.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return lines[0], fields, body


def upgrade(*extra: str, key: str | None = WS_KEY, version: str = "13") -> bytes:
    lines = ["GET /ws HTTP/1.1", "Host: 127.0.0.1:8771", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Version: {version}"]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode("latin-1")


def masked(opcode: int, payload: bytes) -> bytes:
    """One client frame (FIN, masked with a zero key: the payload as is)."""
    assert len(payload) <= 125
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + b"\0\0\0\0" + payload


# -- 5. ping floods ------------------------------------------------------------------


class PingFloodTests(SynchronousTestCase):
    def test_a_client_that_floods_pings_and_never_reads_is_closed_with_1008_and_bounded(self) -> None:
        gw = gateway(self, f"[websocket]\nsend_buffer = {SEND_BUFFER}\n")
        ws = connected(gw, user_token(gw, "pinger"))
        (session,) = sessions(gw)
        ws.transport.pauseProducing()  # the client never reads again
        most = 0
        for _ in range(40):  # 40 x 100 pings of 125 bytes: ~500 KB of pongs owed
            for _ in range(100):
                ws.sendPing(b"p" * 125)
            gw.settle()
            most = max(most, session.buffered_bytes())
            if session.close_code is not None:
                break
        self.assertEqual(session.close_code, CLOSE_POLICY)
        # What the gateway held: the transport's buffer (64 KiB before it pauses us) and
        # the pongs owed, never more than send_buffer, plus one write.
        self.assertLessEqual(most, 65_536 + SEND_BUFFER + 4096)
        gw.advance(1.0)  # the close handshake cannot complete: the connection is dropped
        self.assertEqual(session.session_state, "closed")
        self.assertEqual(len(gw.parts.connections), 0)

    def test_a_reading_client_gets_a_pong_for_every_ping(self) -> None:
        gw = gateway(self)
        ws = connected(gw, user_token(gw, "reader"))
        pongs: list[bytes] = []
        ws.onPong = pongs.append  # type: ignore[method-assign]
        for i in range(50):
            ws.sendPing(b"%d" % i)
        gw.settle()
        self.assertEqual(pongs, [b"%d" % i for i in range(50)])
        self.assertIsNone(sessions(gw)[0].close_code)

    def test_pings_while_the_client_is_behind_are_answered_once_it_reads_again(self) -> None:
        gw = gateway(self)
        ws = connected(gw, user_token(gw, "late"))
        (session,) = sessions(gw)
        pongs: list[bytes] = []
        ws.onPong = pongs.append  # type: ignore[method-assign]
        ws.transport.pauseProducing()
        for i in range(700):  # past the transport's 64 KiB: the gateway holds back
            ws.sendPing(b"%03d" % i + b"p" * 100)
        gw.settle()
        self.assertLess(session.buffered_bytes(), 65_536 + 4096)
        ws.transport.resumeProducing()
        gw.settle()
        # Every ping until the buffer filled, then only the latest (RFC 6455 §5.5.3).
        self.assertEqual(pongs[-1][:3], b"699")
        self.assertIsNone(session.close_code)


# -- 6. slow bodies ------------------------------------------------------------------

LOGIN_HEAD = (b"POST /api/v1/users/authenticate HTTP/1.1\r\nHost: localhost\r\n"
              b"Content-Type: application/json\r\n")


class SlowBodyTests(SynchronousTestCase):
    def test_a_body_trickled_past_body_timeout_is_answered_408_and_closed(self) -> None:
        gw = MemoryGateway("[limits]\nbody_timeout = 5\n", test=self)
        before = gw.parts.access_log.count
        out, closed = gw.raw_http(LOGIN_HEAD + b"Content-Length: 36\r\n\r\n{",
                                  b'"', b"u", b"s", gap=2.0)  # every byte resets the idle timer
        status, fields, body = split(out)
        self.assertEqual(status, "HTTP/1.1 408 Request timeout")
        self.assertTrue(closed)
        problem = json.loads(body)
        self.assertEqual((problem["status"], problem["code"]), (408, "request_timeout"))
        self.assertEqual(fields["x-request-id"], problem["request_id"])
        self.assertEqual(fields["content-type"], "application/problem+json")
        self.assertEqual(gw.parts.access_log.count, before + 1)

    def test_a_body_in_time_is_served(self) -> None:
        gw = MemoryGateway("[limits]\nbody_timeout = 5\n", test=self)
        body = b'{"username":"nobody","password":"x"}'
        out, _ = gw.raw_http(LOGIN_HEAD + b"Content-Length: %d\r\n\r\n" % len(body),
                             body[:10], body[10:], gap=2.0)
        self.assertTrue(out.startswith(b"HTTP/1.1 401"), out[:80])

    def test_a_chunked_body_past_body_max_is_answered_413_before_it_ends(self) -> None:
        gw = MemoryGateway("[limits]\nbody_max = 100\n", test=self)
        chunk = b"50\r\n" + b"x" * 0x50 + b"\r\n"
        out, closed = gw.raw_http(LOGIN_HEAD + b"Transfer-Encoding: chunked\r\n\r\n",
                                  chunk, chunk)  # 160 bytes, and the body never ends
        status, _fields, body = split(out)
        self.assertEqual(status.split(" ")[1], "413")
        self.assertTrue(closed)
        self.assertEqual(json.loads(body)["code"], "payload_too_large")


# -- 9. every request meets the gateway; 11 (d) methods ------------------------------


class RequestTargetTests(SynchronousTestCase):
    def gw(self, extra: str = "") -> MemoryGateway:
        return MemoryGateway(extra, test=self)

    def test_a_path_that_is_not_utf8_is_the_gateways_400_with_one_log_line(self) -> None:
        gw = self.gw()
        before = gw.parts.access_log.count
        for target in (b"/%ff", b"/api/v1/%c3%28", b"/%80abc"):
            out, _ = gw.raw_http(b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
            status, fields, body = split(out)
            self.assertEqual(status.split(" ")[1], "400", target)
            problem = json.loads(body)
            self.assertEqual(problem["code"], "bad_request")
            self.assertEqual(fields["x-request-id"], problem["request_id"])
            self.assertEqual(fields["content-type"], "application/problem+json")
            self.assertEqual(fields["server"], "aico-gateway")
            self.assertIn("ratelimit", fields)  # counted by the rate limiter
        self.assertEqual(gw.parts.access_log.count, before + 3)
        self.assertEqual(self.flushLoggedErrors(), [])  # no traceback logged

    def test_a_host_that_is_not_utf8_is_the_gateways_400(self) -> None:
        out, _ = self.gw().raw_http(b"GET /api/v1/health HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n")
        status, _fields, body = split(out)
        self.assertEqual((status.split(" ")[1], json.loads(body)["code"]), ("400", "bad_request"))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_bad_targets_are_rate_limited(self) -> None:
        gw = self.gw("[ratelimit.tiers.public]\nrequests = 2\nper_seconds = 60\nburst = 2\n")
        codes = []
        for _ in range(4):
            out, _ = gw.raw_http(b"GET /%ff HTTP/1.1\r\nHost: localhost\r\n\r\n")
            codes.append(json.loads(split(out)[2])["code"])
        self.assertEqual(codes, ["bad_request", "bad_request", "rate_limited", "rate_limited"])

    def test_no_answer_names_the_framework(self) -> None:
        gw = self.gw()
        answers = [
            gw.raw_http(b"GET /%ff HTTP/1.1\r\nHost: localhost\r\n\r\n")[0],
            gw.raw_http(b"GET /nowhere HTTP/1.1\r\nHost: localhost\r\n\r\n")[0],
            gw.raw_http(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")[0],
            gw.raw_http(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n\r\n")[0],
            gw.raw_http(b"GET / HTTP/1.1\r\nHost: localhost\r\nBad Header\r\n\r\n")[0],
            gw.raw_http(LOGIN_HEAD + b"Content-Length: 99999999\r\n\r\n")[0],
            raw_upgrade(gw, upgrade("Origin: http://evil.example"))[0],
            raw_upgrade(gw, upgrade())[0],  # the 101 itself
        ]
        for raw in answers:
            status, fields, _ = split(raw)
            self.assertEqual(fields.get("server"), "aico-gateway", status)
            self.assertNotIn(b"TwistedWeb", raw)
            self.assertNotIn(b"Autobahn", raw)

    def test_lower_case_methods_are_not_get(self) -> None:
        gw = self.gw()
        token = gw.token()
        out, _ = gw.raw_http(b"get /api/v1/users/me HTTP/1.1\r\nHost: localhost\r\n"
                             b"Authorization: Bearer " + token.encode() + b"\r\n\r\n")
        status, _fields, body = split(out)
        self.assertEqual((status.split(" ")[1], json.loads(body)["code"]),
                         ("405", "method_not_allowed"))
        self.assertEqual(gw.get("/api/v1/users/me", token=token).code, 200)


# -- 8. logs cannot be forged --------------------------------------------------------


class LogForgingTests(SynchronousTestCase):
    """The real observer chain: the guard first, then Twisted's text observer (what
    twistd writes) and the JSON one, on the global publisher every Logger uses."""

    def capture(self) -> tuple[io.StringIO, io.StringIO]:
        text, js = io.StringIO(), io.StringIO()
        text_observer, json_observer = textFileLogObserver(text), jsonFileLogObserver(js)
        guard = logs.guard_log_lines()
        globalLogPublisher.addObserver(text_observer)
        globalLogPublisher.addObserver(json_observer)
        self.addCleanup(globalLogPublisher.removeObserver, text_observer)
        self.addCleanup(globalLogPublisher.removeObserver, json_observer)
        self.addCleanup(logs.unguard_log_lines)
        self.assertIs(globalLogPublisher._observers[0], guard)
        return text, js

    def assert_no_forged_line(self, text: str) -> None:
        for bad in ("\r", "\u2028", "\u2029", "\x85", "\x1b", "\x0b", "\x0c"):
            self.assertNotIn(bad, text)
        for line in text.split("\n"):
            # every line starts with a timestamp, or is the continuation of one (a tab)
            if line:
                self.assertTrue(line.startswith(("\t", "20")), repr(line))
            if line.startswith("20"):
                self.assertNotIn("forged", line.split("]", 1)[0])

    def test_usernames_paths_headers_and_tracebacks_cannot_start_a_line(self) -> None:
        text, js = self.capture()
        gw = MemoryGateway(test=self)
        forged = "\r2026-11-30T00:34:00+0000 [aico.gateway.api.users#info] forged"
        for username in ("x" + forged, "x\u2028" + forged, "x\n" + forged):
            r = gw.post("/api/v1/users/authenticate", {"username": username, "password": "x"})
            self.assertEqual(r.code, 401)
        gw.raw_http(b"GET /a%0d%0a2026-11-30T00:00:00+0000%20[x#info]%20forged HTTP/1.1\r\n"
                    b"Host: localhost\r\n\r\n")
        gw.raw_http(b"GET /a%e2%80%a8forged HTTP/1.1\r\nHost: localhost\r\n\r\n")
        # Any call site that logs what a client sent, formatted in any way:
        log = Logger(namespace="aico.test")
        header = "ok\x85\x1b[2J\u2029forged"
        log.info("header {value} {value!r} {n:>4} {call()}", value=header, n=7,
                 call=lambda: "a\rforged")
        try:
            raise ValueError("bad name\r" + forged)
        except ValueError:
            log.failure("failed for {who}", who="y\u2028forged")
        self.flushLoggedErrors(ValueError)
        written = text.getvalue()
        self.assertIn("login refused for x\\r2026-11-30T00:34:00+0000", written)
        self.assertIn("x\\u2028\\r2026", written)
        self.assertIn("x\\n\\r2026", written)
        self.assertIn("header ok\\x85\\x1b[2J\\u2029forged", written)
        self.assertIn("   7 a\\rforged", written)  # format specs still apply
        self.assertIn("bad name\\r", written)
        self.assert_no_forged_line(written)
        for record in js.getvalue().split("\n"):  # the JSON log: one event per line
            if record.strip("\x1e"):
                json.loads(record.strip("\x1e"))


# -- 11 (a), (b), (e): WebSocket handshakes ------------------------------------------


def raw_upgrade(gw: MemoryGateway, raw: bytes) -> tuple[bytes, bool]:
    """*raw* (an upgrade request) into a fresh connection of the site: what the gateway
    wrote, and whether it closed. (``raw_http``'s transport cannot be taken over by the
    WebSocket resource: it has no ``protocol``.)"""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    address = IPv4Address("TCP", "127.0.0.1", 31337)
    channel = gw.parts.http_site.buildProtocol(address)  # type: ignore[no-untyped-call]
    transport = StringTransport(peerAddress=address)
    transport.protocol = channel  # type: ignore[attr-defined]
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    gw.settle()
    return transport.value(), bool(transport.disconnecting)


class HandshakeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = gateway(self)

    def refused(self, raw: bytes) -> tuple[int, dict[str, str], dict[str, Any], bool]:
        before = self.gw.parts.access_log.count
        out, closed = raw_upgrade(self.gw, raw)
        status, fields, body = split(out)
        problem = json.loads(body)
        self.assertEqual(fields["content-type"], "application/problem+json")
        self.assertEqual(fields["x-request-id"], problem["request_id"])
        self.assertEqual(fields["server"], "aico-gateway")
        self.assertGreaterEqual(self.gw.parts.access_log.count, before + 1)
        return int(status.split(" ")[1]), fields, problem, closed

    def test_refused_upgrades_are_problem_json_with_the_gateways_codes(self) -> None:
        cases = [
            (upgrade("Origin: http://evil.example\x85"), 403, "forbidden"),
            (upgrade("Authorization: Bearer not-a-token"), 401, "token_invalid"),
            (upgrade("Authorization: Basic Zm9vOmJhcg=="), 401, "token_invalid"),
            (upgrade(key=None), 400, "bad_request"),
            (upgrade(key="short"), 400, "bad_request"),
            (upgrade(version="8"), 400, "bad_request"),
        ]
        for raw, status, code in cases:
            got, fields, problem, closed = self.refused(raw)
            self.assertEqual((got, problem["code"]), (status, code), raw)
            self.assertTrue(closed)
            self.assertNotIn("evil.example", json.dumps(problem))
        _, fields, _, _ = self.refused(upgrade(version="8"))
        self.assertEqual(fields["sec-websocket-version"], "13")

    def test_only_unknown_subprotocols_are_refused_naming_the_supported_ones(self) -> None:
        status, _, problem, _ = self.refused(upgrade("Sec-WebSocket-Protocol: aico.v2.json"))
        self.assertEqual((status, problem["code"]), (400, "bad_request"))
        self.assertEqual(problem["supported"], [SUBPROTOCOL_JSON, SUBPROTOCOL_PROTO])
        self.assertIn(SUBPROTOCOL_JSON, problem["detail"])
        # none still means JSON; a known one among unknown ones is chosen
        self.assertEqual(self.gw.websocket().recv()["type"], "welcome")
        ws = self.gw.websocket(protocols=["aico.v2.json", SUBPROTOCOL_JSON])
        self.assertEqual(ws.recv()["type"], "welcome")

    def test_refused_upgrade_tokens_are_charged_like_a_bad_token_on_rest(self) -> None:
        gw = gateway(self, "[ratelimit.tiers.standard]\nrequests = 3\nper_seconds = 60\n"
                           "burst = 3\n")
        codes = []
        for _ in range(5):  # each on a new connection: not a fresh budget each
            out, _ = raw_upgrade(gw, upgrade("Authorization: Bearer not-a-token"))
            codes.append(json.loads(split(out)[2])["code"])
        self.assertEqual(codes[:3], ["token_invalid"] * 3)
        self.assertEqual(set(codes[3:]), {"rate_limited"})
        r = gw.get("/api/v1/users/me", token="not-a-token")  # the same budget as REST's
        self.assertEqual(r.code, 429)

    def test_refused_auth_frames_are_charged_across_sockets(self) -> None:
        gw = gateway(self, "[ratelimit.tiers.standard]\nrequests = 4\nper_seconds = 60\n"
                           "burst = 4\n")
        codes = []
        for _ in range(3):
            ws = connected(gw)
            for _ in range(2):
                ws.send({"type": "auth", "token": "not-a-token"})
                codes.append(ws.recv()["problem"]["code"])
        self.assertEqual(codes[:4], ["token_invalid"] * 4)
        self.assertEqual(set(codes[4:]), {"rate_limited"})


# -- 11 (c): ZAP refusals ------------------------------------------------------------


class ZapRefusalLogTests(SynchronousTestCase):
    def test_refused_bus_keys_are_logged_at_a_bounded_rate(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        now = [1000.0]
        refusals = RefusalLog(interval=60.0, burst=3, clock=lambda: now[0])
        handler = ZapHandler(None, _NoKeys(), refusals)  # type: ignore[arg-type]

        def attempt(key: bytes, mechanism: bytes = b"CURVE") -> None:
            reply = handler.answer([b"1.0", b"1", b"", b"127.0.0.1", b"", mechanism, key])
            self.assertEqual(reply[2], b"400")

        for _ in range(1000):
            attempt(b"k" * 40)  # one key retrying
        for i in range(1000):
            attempt(b"%040d" % i)  # fresh keys: at most `burst` first lines a window
        attempt(b"", mechanism=b"NULL")
        lines = [e for e in events if str(e.get("log_namespace")).startswith("aico.bus.zap")]
        self.assertEqual(len(lines), 3)
        now[0] += 61
        attempt(b"k" * 40)
        lines = [e for e in events if str(e.get("log_namespace")).startswith("aico.bus.zap")]
        self.assertEqual(len(lines), 4)
        self.assertEqual(lines[-1]["count"], 2000 - 3 + 1)  # every refusal is counted
        self.assertEqual(refusals.suppressed, 1)


class _NoKeys:
    def lookup(self, public_key: bytes) -> None:
        return None


# -- the real sockets ----------------------------------------------------------------


class _Raw(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


class RealSocketTests(TestCase):
    timeout = 60

    async def raw(self, port: int, *chunks: bytes, gap: float = 0.0) -> _Raw:
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        proto = _Raw()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
        self.addCleanup(lambda: proto.transport.abortConnection() if proto.transport else None)
        for i, chunk in enumerate(chunks):
            if i and gap:
                await deferLater(reactor, gap, lambda: None)
            if proto.closed.called:
                break
            proto.transport.write(chunk)
        return proto

    async def test_real_socket_slow_body_times_out_and_raw_bytes_meet_the_gateway(self) -> None:
        gw = await start_gateway(self, "[limits]\nbody_timeout = 0.5\n")
        port = gw.ports["http"]["port"]
        slow = await self.raw(port, LOGIN_HEAD + b"Content-Length: 36\r\n\r\n{", b'"', b"u",
                              gap=0.2)
        await slow.closed
        status, fields, body = split(slow.data)
        self.assertEqual((status, json.loads(body)["code"]), ("HTTP/1.1 408 Request timeout",
                                                              "request_timeout"))
        for target in (b"/%ff", b"/%c3%28x"):
            bad = await self.raw(port, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n"
                                       b"Connection: close\r\n\r\n")
            await bad.closed
            status, fields, body = split(bad.data)
            self.assertEqual((status.split(" ")[1], json.loads(body)["code"]),
                             ("400", "bad_request"))
            self.assertEqual(fields["server"], "aico-gateway")
            self.assertEqual(fields["x-request-id"], json.loads(body)["request_id"])
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_real_socket_ping_flood_without_reading_is_closed_and_bounded(self) -> None:
        gw = await start_gateway(self, f"[websocket]\nsend_buffer = {SEND_BUFFER}\n")
        tokens = await login(http_client(self), gw.base, "admin", gw.admin_password)
        port = gw.ports["http"]["port"]
        most = [0]
        seen: list[WebSocketSession] = []

        def sample() -> None:
            for s in sessions(gw):
                if s not in seen:
                    seen.append(s)
                most[0] = max(most[0], s.buffered_bytes())

        sampler = LoopingCall(sample)
        sampler.start(0.005)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        stop = threading.Event()
        self.addCleanup(stop.set)
        sent = [0]

        def flood() -> str:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(10)
            try:
                s.connect(("127.0.0.1", port))
                s.sendall(upgrade(f"Authorization: Bearer {tokens['access_token']}"))
                head = b""
                while b"\r\n\r\n" not in head:
                    head += s.recv(1)  # the 101 only; then it never reads again
                assert head.startswith(b"HTTP/1.1 101"), head
                batch = masked(0x9, b"p" * 125) * 1000
                while sent[0] < 64 * 1024 * 1024 and not stop.is_set():  # at most 64 MB
                    s.sendall(batch)
                    sent[0] += len(batch)
                return "not closed"
            except OSError as e:
                return type(e).__name__
            finally:
                s.close()

        outcome = await threads.deferToThread(flood)
        self.assertNotEqual(outcome, "not closed")
        (session,) = seen
        await eventually(lambda: session.session_state == "closed")
        self.assertEqual(session.close_code, CLOSE_POLICY)
        # Far less than what was sent: the transport's buffer (it pauses us past 64 KiB)
        # plus send_buffer of pongs owed, plus one batch of writes.
        self.assertLess(sent[0], 64 * 1024 * 1024)
        self.assertLessEqual(most[0], 65_536 + SEND_BUFFER + 140_000)


class TwistdLogTests(TestCase):
    """The twistd text log itself (the observer twistd builds, after makeService)."""

    timeout = 60
    spawn = test_process.ProcessTests.spawn
    _kill = test_process.ProcessTests._kill
    state = test_process.ProcessTests.state
    config = test_process.ProcessTests.config
    wait_ports = test_process.ProcessTests.wait_ports

    async def test_a_forged_login_username_cannot_start_a_line_of_the_twistd_log(self) -> None:
        state = self.state()
        proto = self.spawn(["-n", "--pidfile=", "aico-gateway", "--config", str(self.config()),
                            "--state-dir", str(state)])
        ports = await self.wait_ports(state, proto)
        base = f"http://127.0.0.1:{ports['http']['port']}"
        http = http_client(self)
        forged = "\r2026-11-30T00:34:00+0000 [aico.gateway.api.users#info] forged"
        for username in ("x" + forged, "x\u2028" + forged):
            r = await http.post(base + "/api/v1/users/authenticate",
                                json={"username": username, "password": "x"})
            self.assertEqual(r.code, 401)
            await r.content()
        await eventually(lambda: proto.output.count(b"login refused") >= 2)
        self.transport.signalProcess("TERM")
        self.assertEqual(await proto.ended, 0)
        output = proto.output.decode("utf-8")
        self.assertIn("login refused for x\\r2026-11-30T00:34:00+0000", output)
        self.assertNotIn("\r", output)
        self.assertNotIn("\u2028", output)
        self.assertFalse([line for line in output.split("\n") if "forged" in line
                          and not line.startswith("20")])

