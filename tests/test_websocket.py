"""WebSocket /ws end to end: two independent clients (Autobahn's and ``websockets``).

Every frame type and error of docs/protocols.md is exercised by :class:`FrameTests`,
which runs once per client library; the rest (pipelining, backpressure, timeouts with
``Clock``, expiry and revocation, the binary subprotocol) uses the Autobahn client.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from twisted.internet.defer import CancelledError, ensureDeferred, gatherResults
from twisted.trial.unittest import TestCase

from aico.gateway.adapters.websocket import (
    CLOSE_AUTH_TIMEOUT,
    CLOSE_IDLE_TIMEOUT,
    CLOSE_SLOW_CONSUMER,
    SUBPROTOCOL_PROTO,
    WebSocketSession,
)
from aico.gateway.config import WebSocketSection
from aico.gateway.testing.waiting import eventually, sleep
from aico.proto import ApiRequest
from aico.proto.aico.gateway.v1.gateway_pb2 import SocketFrame
from tests.realtime import USER_CAPS, AutobahnClient, Realtime, WebsocketsClient


class _AutobahnAdapter:
    """The Autobahn client behind the same async calls as :class:`WebsocketsClient`."""

    def __init__(self, client: AutobahnClient) -> None:
        self.client = client

    async def send(self, obj: Any) -> None:
        self.client.send(obj)

    async def recv(self, timeout: float = 5.0) -> Any:
        return await self.client.recv(timeout)

    async def wait_closed(self, timeout: float = 5.0) -> int | None:
        code, _ = await self.client.closed
        return code


class FrameTests:
    """Every frame type and error, for one client library (set by the subclass)."""

    timeout = 20

    async def client(self, headers: dict[str, str] | None = None) -> Any:
        raise AssertionError("each FrameTests subclass connects with its own client library")

    async def connected(self, token: str | None = None) -> Any:
        c = await self.client()
        welcome = await c.recv()
        assert welcome["type"] == "welcome", welcome
        if token is not None:
            await c.send({"type": "auth", "token": token})
            ok = await c.recv()
            assert ok["type"] == "auth_success", ok
        return c

    def setUp(self) -> Any:
        self.rt = Realtime(self)  # type: ignore[arg-type]
        return ensureDeferred(self.rt.start())

    async def test_welcome_then_auth_frame_authenticates(self) -> None:
        token = self.rt.tokens.issue("alice", USER_CAPS)
        c = await self.client()
        welcome = await c.recv()
        self.assertEqual(welcome["type"], "welcome")
        self.assertEqual(welcome["version"], 1)
        self.assertFalse(welcome["authenticated"])
        await c.send({"type": "auth", "token": token, "id": "a1"})
        ok = await c.recv()
        self.assertEqual(ok["type"], "auth_success")
        self.assertEqual((ok["subject"], ok["roles"], ok["id"]), ("alice", ["user"], "a1"))
        self.assertEqual(ok["session_id"], welcome["session_id"])

    async def test_authorization_header_on_upgrade_authenticates(self) -> None:
        token = self.rt.tokens.issue("bob", USER_CAPS)
        c = await self.client({"Authorization": f"Bearer {token}"})
        welcome = await c.recv()
        self.assertTrue(welcome["authenticated"])
        ok = await c.recv()
        self.assertEqual((ok["type"], ok["subject"]), ("auth_success", "bob"))
        await c.send({"type": "request", "id": 1, "method": "GET", "path": "/api/v1/whoami"})
        r = await c.recv()
        self.assertEqual((r["status"], r["body"]), (200, {"subject": "bob"}))

    async def test_bad_token_frame_answers_error_and_stays_open(self) -> None:
        c = await self.connected()
        await c.send({"type": "auth", "token": "forged", "id": 7})
        err = await c.recv()
        self.assertEqual(err["type"], "error")
        self.assertEqual(err["id"], 7)
        self.assertEqual((err["problem"]["status"], err["problem"]["code"]), (401, "token_invalid"))
        await c.send({"type": "heartbeat"})
        self.assertEqual((await c.recv())["type"], "heartbeat_ack")

    async def test_request_goes_through_the_dispatcher_and_security_chain(self) -> None:
        c = await self.connected()
        # anonymous: public route fine, protected route 401 as a problem in the body
        await c.send({"type": "request", "id": "p", "method": "GET", "path": "/api/v1/ping?n=3"})
        r = await c.recv()
        self.assertEqual((r["type"], r["id"], r["status"]), ("response", "p", 200))
        self.assertEqual(r["body"], {"pong": True, "n": "3"})
        await c.send({"type": "request", "id": "w", "method": "GET", "path": "/api/v1/whoami"})
        r = await c.recv()
        self.assertEqual((r["status"], r["body"]["code"]), (401, "unauthenticated"))
        await c.send({"type": "auth", "token": self.rt.tokens.issue("carol", USER_CAPS)})
        await c.recv()
        await c.send({"type": "request", "id": "e", "method": "POST", "path": "/api/v1/echo",
                      "body": {"text": "hi"}})
        r = await c.recv()
        self.assertEqual(r["status"], 200)
        self.assertEqual(r["body"], {"echo": {"text": "hi"}, "subject": "carol",
                                     "transport": "websocket"})
        # validation, routing errors: problem objects with the request id
        await c.send({"type": "request", "id": "v", "method": "POST", "path": "/api/v1/echo",
                      "body": {"txt": "typo"}})
        r = await c.recv()
        self.assertEqual((r["status"], r["body"]["code"]), (400, "validation_failed"))
        self.assertEqual(r["body"]["request_id"], r["request_id"])
        await c.send({"type": "request", "id": "n", "method": "GET", "path": "/api/v1/nope"})
        r = await c.recv()
        self.assertEqual((r["status"], r["body"]["code"]), (404, "not_found"))
        await c.send({"type": "request", "id": "m", "method": "DELETE", "path": "/api/v1/ping"})
        r = await c.recv()
        self.assertEqual((r["status"], r["headers"]["Allow"]), (405, "GET, HEAD"))

    async def test_streamed_reply_arrives_as_chunks_then_response(self) -> None:
        c = await self.connected()
        await c.send({"type": "request", "id": "s", "method": "GET",
                      "path": "/api/v1/stream", "query": {"stream": "true"}})
        frames = [await c.recv() for _ in range(4)]
        self.assertEqual([f["type"] for f in frames], ["chunk"] * 3 + ["response"])
        self.assertEqual([f["body"] for f in frames[:3]], [{"delta": i} for i in range(3)])
        self.assertEqual((frames[3]["id"], frames[3]["status"], frames[3]["body"]), ("s", 200, None))

    async def test_subscriber_receives_module_events_until_unsubscribed(self) -> None:
        c = await self.connected(self.rt.tokens.issue("dave", USER_CAPS))
        await c.send({"type": "subscribe", "topic": "conversation/", "id": "s1"})
        ok = await c.recv()
        self.assertEqual((ok["type"], ok["topic"], ok["id"]), ("subscribed", "conversation/", "s1"))
        await self.rt.subscribed_on_bus("conversation/")
        self.rt.publish("conversation/user/output/v1", {"text": "hello"})
        event = await c.recv()
        self.assertEqual(event, {"type": "event", "topic": "conversation/user/output/v1",
                                 "body": {"text": "hello"}})
        await c.send({"type": "unsubscribe", "topic": "conversation/"})
        self.assertEqual((await c.recv())["type"], "unsubscribed")
        self.rt.publish("conversation/user/output/v1", {"text": "gone"})
        await sleep(0.2)
        await c.send({"type": "heartbeat", "id": "h"})
        self.assertEqual((await c.recv())["type"], "heartbeat_ack")  # no event in between

    async def test_forbidden_subscriptions_are_refused(self) -> None:
        c = await self.connected()
        await c.send({"type": "subscribe", "topic": "conversation/", "id": 0})
        err = await c.recv()
        self.assertEqual(err["problem"]["code"], "unauthenticated")
        await c.send({"type": "auth", "token": self.rt.tokens.issue("erin", USER_CAPS)})
        await c.recv()
        for i, topic in enumerate(["system/", "user/frank/", "user/erin", "health/", "reply/"]):
            await c.send({"type": "subscribe", "topic": topic, "id": i})
            err = await c.recv()
            self.assertEqual((err["type"], err["id"]), ("error", i))
            self.assertEqual(err["problem"]["code"], "forbidden", topic)
        await c.send({"type": "subscribe", "topic": "user/erin/", "id": "own"})
        self.assertEqual((await c.recv())["type"], "subscribed")

    async def test_heartbeat_is_acknowledged(self) -> None:
        c = await self.connected()
        await c.send({"type": "heartbeat", "id": 42})
        ack = await c.recv()
        self.assertEqual((ack["type"], ack["id"]), ("heartbeat_ack", 42))

    async def test_bad_frames_answer_error_and_keep_the_socket_open(self) -> None:
        self.rt.set_settings(max_message_size=4096)
        c = await self.connected()
        cases: list[tuple[Any, str]] = [
            ("{not json", "malformed_json"),
            ("[1, 2]", "bad_request"),
            ({"id": 1}, "bad_request"),
            ({"type": "launch"}, "bad_request"),
            ({"type": "request", "id": 2, "method": "GET"}, "bad_request"),
            ({"type": "request", "method": "GET", "path": "/api/v1/ping"}, "bad_request"),
            ({"type": "subscribe"}, "bad_request"),
            ({"type": "heartbeat", "id": {"nested": 1}}, "bad_request"),
            ({"type": "heartbeat", "pad": "x" * 5000}, "payload_too_large"),
            (b"\x00\x01binary", "bad_request"),
        ]
        for frame, code in cases:
            await c.send(frame)
            err = await c.recv()
            self.assertEqual(err["type"], "error", frame)
            self.assertEqual(err["problem"]["code"], code, frame)
            self.assertIn("request_id", err["problem"])
        await c.send({"type": "request", "id": "after", "method": "GET", "path": "/api/v1/ping"})
        self.assertEqual((await c.recv())["status"], 200)


class AutobahnFrameTests(FrameTests, TestCase):
    async def client(self, headers: dict[str, str] | None = None) -> Any:
        c = AutobahnClient(self, self.rt.ws_url, headers=headers)
        await c.open()
        return _AutobahnAdapter(c)


class WebsocketsFrameTests(FrameTests, TestCase):
    async def client(self, headers: dict[str, str] | None = None) -> Any:
        return await WebsocketsClient(self, self.rt.ws_url, headers=headers).open()

    async def test_bad_token_on_the_upgrade_is_refused_with_401(self) -> None:
        from websockets.exceptions import InvalidStatus

        with self.assertRaises(InvalidStatus) as caught:
            await self.client({"Authorization": "Bearer forged"})
        self.assertEqual(caught.exception.response.status_code, 401)


class SessionTests(TestCase):
    """Behaviour beyond single frames, with the Autobahn client."""

    timeout = 30

    def setUp(self) -> Any:
        self.rt = Realtime(self)
        return ensureDeferred(self.rt.start())

    async def client(self, token: str | None = None, protocols: list[str] | None = None) -> AutobahnClient:
        c = await AutobahnClient(self, self.rt.ws_url, protocols=protocols).open()
        if protocols is None:
            await c.recv()  # welcome
            if token is not None:
                c.send({"type": "auth", "token": token})
                self.assertEqual((await c.recv())["type"], "auth_success")
        return c

    def session(self) -> WebSocketSession:
        sessions = [c for c in self.rt.connections if isinstance(c, WebSocketSession)]
        self.assertEqual(len(sessions), 1)
        return sessions[0]

    async def test_thousand_pipelined_requests_each_answered_with_its_own_id(self) -> None:
        c = await self.client(self.rt.tokens.issue("pip", USER_CAPS))
        n = 1000
        start = time.perf_counter()
        for i in range(n):
            c.send({"type": "request", "id": i, "method": "POST", "path": "/api/v1/echo",
                    "body": {"text": f"m{i}"}})
        answers = {}
        for _ in range(n):
            r = await c.recv()
            answers[r["id"]] = r
        elapsed = time.perf_counter() - start
        self.assertEqual(sorted(answers), list(range(n)))
        for i, r in answers.items():
            self.assertEqual((r["status"], r["body"]["echo"]), (200, {"text": f"m{i}"}))
        print(f"\n  1000 pipelined WebSocket requests: {elapsed:.3f} s, "
              f"{n / elapsed:,.0f} req/s")
        self.assertLess(elapsed, 10)

    async def test_slow_consumer_is_dropped_while_a_fast_one_keeps_receiving(self) -> None:
        limit = 256 * 1024
        self.rt.set_settings(send_buffer=limit)
        fast = await self.client(self.rt.tokens.issue("fast", USER_CAPS))
        slow = await self.client(self.rt.tokens.issue("slow", USER_CAPS))
        for c in (fast, slow):
            c.send({"type": "subscribe", "topic": "conversation/"})
            self.assertEqual((await c.recv())["type"], "subscribed")
        await self.rt.subscribed_on_bus("conversation/")
        assert slow.proto is not None
        slow_session = next(s for s in self.rt.connections
                            if s.info.principal is not None and s.info.principal.subject == "slow")
        assert isinstance(slow_session, WebSocketSession)
        # Small kernel buffers on the slow pair, so that the gateway's own queue is
        # what fills; then the slow client stops reading altogether.
        for transport in (slow.proto.transport, slow_session.transport):
            handle = transport.getHandle()  # type: ignore[union-attr]
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16_384)
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16_384)
        # The module's PUB socket learns of the new subscription through the broker a
        # moment later (ZeroMQ's slow joiner): probe until an event gets through.
        for _ in range(100):
            self.rt.publish("conversation/out", {"i": -1})
            try:
                if (await fast.recv(timeout=0.1))["body"]["i"] == -1:
                    break
            except CancelledError:
                continue
        slow.proto.transport.pauseProducing()  # type: ignore[union-attr]
        payload = "x" * 16_384
        count = 300  # ~5 MB in bursts of 10 events (160 KiB), under the limit
        for i in range(count):
            self.rt.publish("conversation/out", {"i": i, "pad": payload})
            if i % 10 == 9:
                await sleep(0.01)
        received = []
        while len(received) < count:
            event = await fast.recv(timeout=10)
            if event["body"]["i"] >= 0:  # late probes are skipped
                received.append(event["body"]["i"])
        self.assertEqual(received, list(range(count)))
        await eventually(lambda: slow_session.session_state == "closed", timeout=10)
        self.assertEqual(slow_session.close_code, CLOSE_SLOW_CONSUMER)
        # memory stays bounded: never more than the limit plus one frame queued
        self.assertLessEqual(slow_session.max_queued, limit + 20_000)
        self.assertEqual(len(self.rt.connections), 1)
        self.assertEqual(self.rt.connections.bus_prefixes, {"conversation/"})

    async def test_unauthenticated_socket_closed_after_auth_timeout(self) -> None:
        c = await self.client()
        self.rt.clock.advance(9.9)
        c.send({"type": "heartbeat"})
        self.assertEqual((await c.recv())["type"], "heartbeat_ack")
        self.rt.clock.advance(0.2)
        code, reason = await c.closed
        self.assertEqual((code, reason), (CLOSE_AUTH_TIMEOUT, "authentication timeout"))

    async def test_authenticated_socket_outlives_the_auth_timeout(self) -> None:
        c = await self.client(self.rt.tokens.issue("gina", USER_CAPS))
        self.rt.clock.advance(30)
        c.send({"type": "heartbeat"})
        self.assertEqual((await c.recv())["type"], "heartbeat_ack")

    async def test_silent_socket_closed_after_idle_timeout_and_heartbeats_keep_it(self) -> None:
        c = await self.client(self.rt.tokens.issue("hank", USER_CAPS))
        for _ in range(3):
            self.rt.clock.advance(80)
            c.send({"type": "heartbeat"})
            self.assertEqual((await c.recv())["type"], "heartbeat_ack")
        self.rt.clock.advance(89)
        self.assertFalse(c.closed.called)
        self.rt.clock.advance(2)
        code, _ = await c.closed
        self.assertEqual(code, CLOSE_IDLE_TIMEOUT)

    async def test_token_expiry_tells_the_socket_and_requests_then_fail(self) -> None:
        c = await self.client(self.rt.tokens.issue("ivy", USER_CAPS, ttl=60))
        c.send({"type": "subscribe", "topic": "conversation/"})
        await c.recv()
        self.rt.clock.advance(61)
        notice = await c.recv()
        self.assertEqual(notice["type"], "auth_expired")
        self.assertEqual(notice["problem"]["code"], "token_expired")
        c.send({"type": "request", "id": 1, "method": "GET", "path": "/api/v1/ping"})
        r = await c.recv()
        self.assertEqual((r["type"], r["problem"]["code"]), ("error", "token_expired"))
        self.assertEqual(self.rt.connections.bus_prefixes, frozenset())
        # a fresh token brings the socket back
        c.send({"type": "auth", "token": self.rt.tokens.issue("ivy", USER_CAPS)})
        self.assertEqual((await c.recv())["type"], "auth_success")
        c.send({"type": "request", "id": 2, "method": "GET", "path": "/api/v1/whoami"})
        self.assertEqual((await c.recv())["status"], 200)

    async def test_revoked_token_tells_every_socket_holding_it(self) -> None:
        token = self.rt.tokens.issue("jack", USER_CAPS)
        other = await self.client(self.rt.tokens.issue("kate", USER_CAPS))
        a = await self.client(token)
        b = await self.client(token)
        jti = self.rt.tokens.table[token].token_id
        self.rt.tokens.revoked.add(jti)
        self.assertEqual(self.rt.connections.revoke_token(jti), 2)
        for c in (a, b):
            notice = await c.recv()
            self.assertEqual((notice["type"], notice["problem"]["code"]),
                             ("auth_revoked", "token_revoked"))
            c.send({"type": "request", "id": 1, "method": "GET", "path": "/api/v1/whoami"})
            self.assertEqual((await c.recv())["problem"]["code"], "token_revoked")
            c.send({"type": "auth", "token": token})
            self.assertEqual((await c.recv())["problem"]["code"], "token_revoked")
        # the revoked sockets must re-authenticate within auth_timeout
        self.rt.clock.advance(10.5)
        self.assertEqual((await a.closed)[0], CLOSE_AUTH_TIMEOUT)
        other.send({"type": "request", "id": 9, "method": "GET", "path": "/api/v1/whoami"})
        self.assertEqual((await other.recv())["status"], 200)

    async def test_connection_manager_lists_the_live_socket(self) -> None:
        c = await self.client(self.rt.tokens.issue("liz", USER_CAPS))
        c.send({"type": "subscribe", "topic": "user/liz/"})
        await c.recv()
        [entry] = self.rt.connections.snapshot()
        self.assertEqual((entry["transport"], entry["subject"]), ("websocket", "liz"))
        self.assertEqual(entry["subscriptions"], ["user/liz/"])
        self.assertGreater(entry["bytes_in"], 0)
        self.assertGreater(entry["bytes_out"], 0)
        self.assertTrue(entry["peer"].startswith("127.0.0.1:"))
        await c.close()
        await eventually(lambda: len(self.rt.connections) == 0)
        self.assertEqual(self.rt.connections.bus_prefixes, frozenset())

    async def test_binary_subprotocol_carries_the_same_exchanges(self) -> None:
        token = self.rt.tokens.issue("max", USER_CAPS)
        c = await self.client(protocols=[SUBPROTOCOL_PROTO])
        assert c.proto is not None

        async def recv() -> SocketFrame:
            payload, binary = await c.recv_raw()
            self.assertTrue(binary)
            return SocketFrame.FromString(payload)

        welcome = await recv()
        self.assertEqual(welcome.WhichOneof("frame"), "welcome")
        c.send(SocketFrame(auth={"token": token}).SerializeToString())
        ok = await recv()
        self.assertEqual(ok.auth_success.subject, "max")
        req = ApiRequest(request_id="r1", method="POST", path="/api/v1/echo",
                         body=json.dumps({"text": "pb"}).encode())
        c.send(SocketFrame(request=req).SerializeToString())
        r = await recv()
        self.assertEqual((r.response.request_id, r.response.status), ("r1", 200))
        self.assertEqual(json.loads(r.response.body)["echo"], {"text": "pb"})
        c.send(SocketFrame(subscribe={"topic": "conversation/", "id": "s"}).SerializeToString())
        self.assertEqual((await recv()).subscribed.topic, "conversation/")
        await self.rt.subscribed_on_bus("conversation/")
        self.rt.publish("conversation/x", {"n": 1})
        ev = await recv()
        self.assertEqual((ev.event.topic, json.loads(ev.event.body)), ("conversation/x", {"n": 1}))
        c.send(SocketFrame(heartbeat={"id": "h"}).SerializeToString())
        self.assertEqual((await recv()).heartbeat_ack.id, "h")
        c.send(b"\xff\xff garbage")
        err = await recv()
        self.assertEqual(json.loads(err.error.problem)["code"], "bad_request")
        c.send('{"type": "heartbeat"}')
        err = await recv()
        self.assertEqual(json.loads(err.error.problem)["code"], "bad_request")

    async def test_shutdown_closes_every_socket_with_going_away(self) -> None:
        clients = [await self.client(self.rt.tokens.issue(f"u{i}", USER_CAPS)) for i in range(3)]
        self.assertEqual(self.rt.factory.close_all(), 3)
        codes = await gatherResults([c.closed for c in clients])
        self.assertEqual({code for code, _ in codes}, {1001})


class SettingsTests(TestCase):
    def test_defaults_match_the_spec(self) -> None:
        s = WebSocketSection()
        self.assertEqual((s.auth_timeout, s.idle_timeout), (10.0, 90.0))
