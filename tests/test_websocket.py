"""WebSocket /ws on the in-memory gateway: the production composition and security chain,
real logins, users and roles, test routes served by a module on the memory bus
(``tests/wsmodules.py``), time moved by the test.

Every frame type and error of docs/protocols.md is exercised by :class:`FrameTests`;
:class:`SessionTests` covers pipelining, backpressure (the client stops reading, the
gateway's socket queues), timeouts, expiry and revocation and the binary subprotocol.
Over real sockets: ``tests/test_ws_real.py`` (Autobahn) and
``tests/test_websocket_independent.py`` (the ``websockets`` package).
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.trial.unittest import TestCase

from aico.gateway.adapters.websocket import (
    CLOSE_AUTH_TIMEOUT,
    CLOSE_IDLE_TIMEOUT,
    CLOSE_SLOW_CONSUMER,
    SUBPROTOCOL_PROTO,
    WebSocketSession,
)
from aico.gateway.config import WebSocketSection
from aico.gateway.security import validate as validate_module
from aico.gateway.testing.memory import MemoryGateway, MemoryWebSocket, WebSocketRefused
from aico.proto import ApiEvent, ApiRequest, wrap
from aico.proto.aico.gateway.v1.gateway_pb2 import SocketFrame
from tests.wsmodules import connected, gateway, publish, user_token


def sessions(gw: MemoryGateway) -> list[WebSocketSession]:
    return [c for c in gw.parts.connections if isinstance(c, WebSocketSession)]


class FrameTests(TestCase):
    """Every frame type and error."""

    def setUp(self) -> None:
        self.gw = gateway(self)

    def client(self, headers: dict[str, str] | None = None) -> MemoryWebSocket:
        return self.gw.websocket(headers=headers)

    def connected(self, token: str | None = None) -> MemoryWebSocket:
        return connected(self.gw, token)

    def test_welcome_then_auth_frame_authenticates(self) -> None:
        token = user_token(self.gw, "alice")
        c = self.client()
        welcome = c.recv()
        self.assertEqual(welcome["type"], "welcome")
        self.assertEqual(welcome["version"], 1)
        self.assertFalse(welcome["authenticated"])
        c.send({"type": "auth", "token": token, "id": "a1"})
        ok = c.recv()
        self.assertEqual(ok["type"], "auth_success")
        self.assertEqual((ok["subject"], ok["roles"], ok["id"]), ("alice", ["user"], "a1"))
        self.assertEqual(ok["session_id"], welcome["session_id"])

    def test_authorization_header_on_upgrade_authenticates(self) -> None:
        token = user_token(self.gw, "bob")
        c = self.client({"Authorization": f"Bearer {token}"})
        welcome = c.recv()
        self.assertTrue(welcome["authenticated"])
        ok = c.recv()
        self.assertEqual((ok["type"], ok["subject"]), ("auth_success", "bob"))
        c.send({"type": "request", "id": 1, "method": "GET", "path": "/api/v1/whoami"})
        r = c.recv()
        self.assertEqual((r["status"], r["body"]), (200, {"subject": "bob"}))

    def test_bad_token_on_the_upgrade_is_refused_with_401(self) -> None:
        with self.assertRaises(WebSocketRefused) as caught:
            self.client({"Authorization": "Bearer forged"})
        self.assertEqual(caught.exception.status, 401)
        self.assertEqual(len(self.gw.parts.connections), 0)

    def test_bad_token_frame_answers_error_and_stays_open(self) -> None:
        c = self.connected()
        c.send({"type": "auth", "token": "forged", "id": 7})
        err = c.recv()
        self.assertEqual(err["type"], "error")
        self.assertEqual(err["id"], 7)
        self.assertEqual((err["problem"]["status"], err["problem"]["code"]), (401, "token_invalid"))
        c.send({"type": "heartbeat"})
        self.assertEqual(c.recv()["type"], "heartbeat_ack")

    def test_request_goes_through_the_dispatcher_and_security_chain(self) -> None:
        c = self.connected()
        # anonymous: public route fine, protected route 401 as a problem in the body
        c.send({"type": "request", "id": "p", "method": "GET", "path": "/api/v1/ping?n=3"})
        r = c.recv()
        self.assertEqual((r["type"], r["id"], r["status"]), ("response", "p", 200))
        self.assertEqual(r["body"], {"pong": True, "n": "3"})
        c.send({"type": "request", "id": "w", "method": "GET", "path": "/api/v1/whoami"})
        r = c.recv()
        self.assertEqual((r["status"], r["body"]["code"]), (401, "unauthenticated"))
        c.send({"type": "auth", "token": user_token(self.gw, "carol")})
        c.recv()
        c.send({"type": "request", "id": "e", "method": "POST", "path": "/api/v1/echo",
                "body": {"text": "hi"}})
        r = c.recv()
        self.assertEqual(r["status"], 200)
        self.assertEqual(r["body"], {"echo": {"text": "hi"}, "subject": "carol",
                                     "transport": "websocket"})
        # validation, routing errors: problem objects with the request id
        c.send({"type": "request", "id": "v", "method": "POST", "path": "/api/v1/echo",
                "body": {"txt": "typo"}})
        r = c.recv()
        self.assertEqual((r["status"], r["body"]["code"]), (400, "validation_failed"))
        self.assertEqual(r["body"]["request_id"], r["request_id"])
        c.send({"type": "request", "id": "n", "method": "GET", "path": "/api/v1/nope"})
        r = c.recv()
        self.assertEqual((r["status"], r["body"]["code"]), (404, "not_found"))
        c.send({"type": "request", "id": "m", "method": "DELETE", "path": "/api/v1/ping"})
        r = c.recv()
        self.assertEqual((r["status"], r["headers"]["allow"]), (405, "GET, HEAD"))

    def test_a_user_whose_role_lacks_the_capability_is_refused_403(self) -> None:
        # the "service" role has no echo:write (and no users:self)
        c = self.connected(user_token(self.gw, "svc", roles=("service",)))
        c.send({"type": "request", "id": "e", "method": "POST", "path": "/api/v1/echo",
                "body": {"text": "hi"}})
        r = c.recv()
        self.assertEqual((r["id"], r["status"], r["body"]["code"]), ("e", 403, "forbidden"))

    def test_streamed_reply_arrives_as_chunks_then_response(self) -> None:
        c = self.connected()
        c.send({"type": "request", "id": "s", "method": "GET",
                "path": "/api/v1/stream", "query": {"stream": "true"}})
        frames = [c.recv() for _ in range(4)]
        self.assertEqual([f["type"] for f in frames], ["chunk"] * 3 + ["response"])
        self.assertEqual([f["body"] for f in frames[:3]], [{"delta": i} for i in range(3)])
        self.assertEqual((frames[3]["id"], frames[3]["status"], frames[3]["body"]), ("s", 200, None))
        c.send({"type": "request", "id": "w", "method": "GET", "path": "/api/v1/stream"})
        r = c.recv()
        self.assertEqual((r["type"], r["body"]), ("response", {"whole": True}))

    def test_subscriber_receives_module_events_until_unsubscribed(self) -> None:
        c = self.connected(user_token(self.gw, "dave"))
        c.send({"type": "subscribe", "topic": "conversation/", "id": "s1"})
        ok = c.recv()
        self.assertEqual((ok["type"], ok["topic"], ok["id"]), ("subscribed", "conversation/", "s1"))
        self.assertEqual(self.gw.parts.connections.bus_prefixes, {"conversation/"})
        publish(self.gw, "conversation/user/output/v1", {"text": "hello"})
        event = c.recv()
        self.assertEqual(event, {"type": "event", "topic": "conversation/user/output/v1",
                                 "body": {"text": "hello"}})
        c.send({"type": "unsubscribe", "topic": "conversation/"})
        self.assertEqual(c.recv()["type"], "unsubscribed")
        publish(self.gw, "conversation/user/output/v1", {"text": "gone"})
        c.send({"type": "heartbeat", "id": "h"})
        self.assertEqual(c.recv()["type"], "heartbeat_ack")  # no event in between
        self.assertEqual(c.recv_all(), [])

    def test_forbidden_subscriptions_are_refused(self) -> None:
        c = self.connected()
        c.send({"type": "subscribe", "topic": "conversation/", "id": 0})
        err = c.recv()
        self.assertEqual(err["problem"]["code"], "unauthenticated")
        c.send({"type": "auth", "token": user_token(self.gw, "erin")})
        c.recv()
        for i, topic in enumerate(["system/", "user/frank/", "user/erin", "health/", "reply/"]):
            c.send({"type": "subscribe", "topic": topic, "id": i})
            err = c.recv()
            self.assertEqual((err["type"], err["id"]), ("error", i))
            self.assertEqual(err["problem"]["code"], "forbidden", topic)
        c.send({"type": "subscribe", "topic": "user/erin/", "id": "own"})
        self.assertEqual(c.recv()["type"], "subscribed")

    def test_heartbeat_is_acknowledged(self) -> None:
        c = self.connected()
        c.send({"type": "heartbeat", "id": 42})
        ack = c.recv()
        self.assertEqual((ack["type"], ack["id"]), ("heartbeat_ack", 42))
        self.assertEqual(ack["time"], self.gw.clock.seconds())


class BadFrameTests(TestCase):
    def test_bad_frames_answer_error_and_keep_the_socket_open(self) -> None:
        gw = gateway(self, "[websocket]\nmax_message_size = 4096\n")
        c = connected(gw)
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
            c.send(frame)
            err = c.recv()
            self.assertEqual(err["type"], "error", frame)
            self.assertEqual(err["problem"]["code"], code, frame)
            self.assertIn("request_id", err["problem"])
        c.send({"type": "request", "id": "after", "method": "GET", "path": "/api/v1/ping"})
        self.assertEqual(c.recv()["status"], 200)
        self.assertFalse(c.closed)


class SessionTests(TestCase):
    """Behaviour beyond single frames."""

    _gw: MemoryGateway | None = None

    @property
    def gw(self) -> MemoryGateway:
        """The test's gateway (default config unless :meth:`configure` made it)."""
        if self._gw is None:
            self._gw = gateway(self)
        return self._gw

    def configure(self, config: str) -> MemoryGateway:
        self._gw = gateway(self, config)
        return self._gw

    def client(self, token: str | None = None, protocols: list[str] | None = None) -> MemoryWebSocket:
        if protocols is not None:
            return self.gw.websocket(protocols=protocols)
        return connected(self.gw, token)

    def session(self) -> WebSocketSession:
        found = sessions(self.gw)
        self.assertEqual(len(found), 1)
        return found[0]

    def test_thousand_pipelined_requests_each_answered_with_its_own_id(self) -> None:
        c = self.client(user_token(self.gw, "pip"))
        c.send({"type": "request", "id": "warm", "method": "POST", "path": "/api/v1/echo",
                "body": {"text": "first use"}})
        self.assertEqual(c.recv()["status"], 200)  # lazy imports and caches, outside the timing
        n = 1000
        start = time.perf_counter()
        # Pipelined: every frame is written before the gateway reads any of them.
        for i in range(n):
            c.sendMessage(json.dumps({"type": "request", "id": i, "method": "POST",
                                      "path": "/api/v1/echo", "body": {"text": f"m{i}"}}).encode())
        answers = {}
        for r in c.recv_all():
            answers[r["id"]] = r
        elapsed = time.perf_counter() - start
        self.assertEqual(sorted(answers), list(range(n)))
        for i, r in answers.items():
            self.assertEqual((r["status"], r["body"]["echo"]), (200, {"text": f"m{i}"}))
        print(f"\n  1000 pipelined WebSocket requests (in memory): {elapsed:.3f} s, "
              f"{n / elapsed:,.0f} req/s")
        self.assertLess(elapsed, 10)

    def test_slow_consumer_is_dropped_while_a_fast_one_keeps_receiving(self) -> None:
        limit = 256 * 1024
        gw = self.configure(f"[websocket]\nsend_buffer = {limit}\n")
        fast = connected(gw, user_token(gw, "fast"))
        slow = connected(gw, user_token(gw, "slow"))
        for c in (fast, slow):
            c.send({"type": "subscribe", "topic": "conversation/"})
            self.assertEqual(c.recv()["type"], "subscribed")
        slow_session = next(s for s in sessions(gw)
                            if s.info.principal is not None and s.info.principal.subject == "slow")
        # The slow client stops reading altogether: the gateway's transport fills, then
        # the socket's own queue.
        slow.transport.pauseProducing()
        payload = "x" * 16_384
        count = 300  # ~5 MB in bursts of 10 events (160 KiB), under the limit
        received = []
        for i in range(count):
            gw.bus.publish("conversation/out", _event("conversation/out", {"i": i, "pad": payload}))
            if i % 10 == 9:
                received += [e["body"]["i"] for e in fast.recv_all()]
                if i == 9:  # queueing, under the limit still
                    self.assertGreater(slow_session.max_queued, 0)
                    self.assertEqual(slow_session.session_state, "authenticated")
        received += [e["body"]["i"] for e in fast.recv_all()]
        self.assertEqual(received, list(range(count)))
        # Closed at once with 4004; the client, not reading, never acknowledges: the
        # gateway drops the connection after its close handshake timeout.
        self.assertEqual(slow_session.close_code, CLOSE_SLOW_CONSUMER)
        self.assertNotEqual(slow_session.session_state, "closed")
        self.assertFalse(fast.closed)
        gw.advance(1.0)
        self.assertEqual(slow_session.session_state, "closed")
        # memory stays bounded: never more than the limit plus one frame queued
        self.assertGreater(slow_session.max_queued, limit)
        self.assertLessEqual(slow_session.max_queued, limit + 20_000)
        self.assertEqual(len(gw.parts.connections), 1)
        self.assertEqual(gw.parts.connections.bus_prefixes, {"conversation/"})

    def test_a_client_that_reads_late_gets_every_queued_frame_in_order(self) -> None:
        c = self.client(user_token(self.gw, "late"))
        c.send({"type": "subscribe", "topic": "conversation/"})
        c.recv()
        session = self.session()
        c.transport.pauseProducing()
        for i in range(20):  # ~330 KiB: past the transport's buffer, under send_buffer
            self.gw.bus.publish("conversation/x", _event("conversation/x", {"i": i, "pad": "y" * 16_384}))
        self.gw.settle()
        self.assertGreater(session.max_queued, 0)
        self.assertEqual(c.recv_all(), [])
        c.transport.resumeProducing()
        self.assertEqual([e["body"]["i"] for e in c.recv_all()], list(range(20)))
        self.assertEqual(session.session_state, "authenticated")

    def test_unauthenticated_socket_closed_after_auth_timeout(self) -> None:
        c = self.client()
        self.gw.advance(9.9)
        c.send({"type": "heartbeat"})
        self.assertEqual(c.recv()["type"], "heartbeat_ack")
        self.assertFalse(c.closed)
        self.gw.advance(0.1)
        self.assertTrue(c.closed)
        self.assertEqual((c.close_code, c.closed_reason), (CLOSE_AUTH_TIMEOUT, "authentication timeout"))
        self.assertEqual(len(self.gw.parts.connections), 0)

    def test_authenticated_socket_outlives_the_auth_timeout(self) -> None:
        c = self.client(user_token(self.gw, "gina"))
        self.gw.advance(30)
        c.send({"type": "heartbeat"})
        self.assertEqual(c.recv()["type"], "heartbeat_ack")
        self.assertFalse(c.closed)

    def test_silent_socket_closed_after_idle_timeout_and_heartbeats_keep_it(self) -> None:
        c = self.client(user_token(self.gw, "hank"))
        for _ in range(3):
            self.gw.advance(80)
            c.send({"type": "heartbeat"})
            self.assertEqual(c.recv()["type"], "heartbeat_ack")
        self.gw.advance(89)
        self.assertFalse(c.closed)
        self.gw.advance(1)  # 90 s after the last heartbeat
        self.assertTrue(c.closed)
        self.assertEqual(c.close_code, CLOSE_IDLE_TIMEOUT)

    def test_token_expiry_tells_the_socket_and_requests_then_fail(self) -> None:
        gw = self.configure("[auth]\naccess_ttl = 60\n")
        c = connected(gw, user_token(gw, "ivy"))
        c.send({"type": "subscribe", "topic": "conversation/"})
        c.recv()
        gw.advance(59)
        self.assertEqual(c.recv_all(), [])
        gw.advance(2)
        notice = c.recv()
        self.assertEqual(notice["type"], "auth_expired")
        self.assertEqual(notice["problem"]["code"], "token_expired")
        c.send({"type": "request", "id": 1, "method": "GET", "path": "/api/v1/ping"})
        r = c.recv()
        self.assertEqual((r["type"], r["problem"]["code"]), ("error", "token_expired"))
        self.assertEqual(gw.parts.connections.bus_prefixes, frozenset())
        # a fresh token brings the socket back
        c.send({"type": "auth", "token": user_token(gw, "ivy")})
        self.assertEqual(c.recv()["type"], "auth_success")
        c.send({"type": "request", "id": 2, "method": "GET", "path": "/api/v1/whoami"})
        self.assertEqual(c.recv()["status"], 200)

    def test_a_frame_body_is_validated_as_read_once_with_the_same_answers_as_rest(self) -> None:
        # The frame was read with the chain's strict decoder; validation checks that
        # value instead of reading the body's bytes again, and answers as on REST.
        token = user_token(self.gw, "nina")
        c = self.client(token)
        reads: list[Any] = []
        original = validate_module.loads

        def counting(data: Any) -> Any:
            reads.append(data)
            return original(data)

        self.patch(validate_module, "loads", counting)
        deep: Any = "x"
        for _ in range(40):
            deep = [deep]
        bodies: list[Any] = [
            {"text": "hi"},
            {"text": "Cafe\u0301"},            # NFC-normalised before the module sees it
            {"text": 1},                        # schema: not a string
            {"note": "no text"},                # schema: required member missing
            {"text": "a\u0000b"},              # a control character
            {"text": deep},                     # deeper than limits.json_depth
        ]
        for i, body in enumerate(bodies):
            c.send({"type": "request", "id": i, "method": "POST", "path": "/api/v1/echo",
                    "body": body})
            frame = c.recv()
            rest = self.gw.post("/api/v1/echo", body, token=token)
            if rest.code == 200:
                self.assertEqual((frame["status"], frame["body"]["echo"]),
                                 (200, rest.json()["echo"]), body)
            else:
                problem = frame.get("problem") or frame["body"]
                self.assertEqual((problem["status"], problem["code"], problem.get("errors")),
                                 (rest.code, rest.json()["code"], rest.json().get("errors")), body)
        self.assertEqual(self.gw.post("/api/v1/echo", {"text": "Cafe\u0301"}, token=token)
                         .json()["echo"]["text"], "Caf\u00e9")
        # Only the REST requests were read by the validation step.
        self.assertEqual(len(reads), len(bodies) + 1)

    def test_the_per_frame_check_mirrors_the_machine_in_every_state(self) -> None:
        # onMessage asks "opened and not closed" instead of the machine's
        # may_handle_frames (an Automat call per frame): the two agree in every state.
        token = user_token(self.gw, "mira")
        c = self.client(token)
        session = self.session()

        def agree(state: str) -> None:
            self.assertEqual(session.session_state, state)
            self.assertEqual(session._opened and not session._ended,
                             session._machine.may_handle_frames(), state)

        agree("authenticated")
        self.assertEqual(self.gw.post("/api/v1/users/logout", {}, token=token).code, 204)
        agree("auth_lost")
        c.send({"type": "request", "id": 1, "method": "GET", "path": "/api/v1/whoami"})
        self.assertEqual(c.recv_all()[-1]["problem"]["code"], "token_revoked")
        c.close()
        self.gw.settle()
        agree("closed")
        fresh = WebSocketSession()
        self.assertEqual(fresh.session_state, "connecting")
        self.assertEqual(fresh._opened and not fresh._ended, fresh._machine.may_handle_frames())

    def test_revoked_token_tells_every_socket_holding_it(self) -> None:
        token = user_token(self.gw, "jack")
        other = self.client(user_token(self.gw, "kate"))
        a = self.client(token)
        b = self.client(token)
        r = self.gw.post("/api/v1/users/logout", {}, token=token)
        self.assertEqual(r.code, 204)
        lost = [s for s in sessions(self.gw) if s.session_state == "auth_lost"]
        self.assertEqual(len(lost), 2)
        for c in (a, b):
            notice = c.recv()
            self.assertEqual((notice["type"], notice["problem"]["code"]),
                             ("auth_revoked", "token_revoked"))
            c.send({"type": "request", "id": 1, "method": "GET", "path": "/api/v1/whoami"})
            self.assertEqual(c.recv()["problem"]["code"], "token_revoked")
            c.send({"type": "auth", "token": token})
            self.assertEqual(c.recv()["problem"]["code"], "token_revoked")
        # the revoked sockets must re-authenticate within auth_timeout
        self.gw.advance(9.9)
        self.assertFalse(a.closed)
        self.gw.advance(0.6)
        self.assertEqual(a.close_code, CLOSE_AUTH_TIMEOUT)
        self.assertEqual(b.close_code, CLOSE_AUTH_TIMEOUT)
        other.send({"type": "request", "id": 9, "method": "GET", "path": "/api/v1/whoami"})
        self.assertEqual(other.recv()["status"], 200)

    def test_connection_manager_lists_the_live_socket(self) -> None:
        c = self.client(user_token(self.gw, "liz"))
        c.send({"type": "subscribe", "topic": "user/liz/"})
        c.recv()
        [entry] = self.gw.parts.connections.snapshot()
        self.assertEqual((entry["transport"], entry["subject"]), ("websocket", "liz"))
        self.assertEqual(entry["subscriptions"], ["user/liz/"])
        self.assertGreater(entry["bytes_in"], 0)
        self.assertGreater(entry["bytes_out"], 0)
        self.assertTrue(entry["peer"].startswith("127.0.0.1:"))
        c.close()
        self.assertTrue(c.closed)
        self.assertEqual(len(self.gw.parts.connections), 0)
        self.assertEqual(self.gw.parts.connections.bus_prefixes, frozenset())

    def test_binary_subprotocol_carries_the_same_exchanges(self) -> None:
        token = user_token(self.gw, "max")
        c = self.client(protocols=[SUBPROTOCOL_PROTO])

        def recv() -> SocketFrame:
            payload, binary = c.recv_raw()
            self.assertTrue(binary)
            return SocketFrame.FromString(payload)

        welcome = recv()
        self.assertEqual(welcome.WhichOneof("frame"), "welcome")
        c.send(SocketFrame(auth={"token": token}).SerializeToString())
        ok = recv()
        self.assertEqual(ok.auth_success.subject, "max")
        req = ApiRequest(request_id="r1", method="POST", path="/api/v1/echo",
                         body=json.dumps({"text": "pb"}).encode())
        c.send(SocketFrame(request=req).SerializeToString())
        r = recv()
        self.assertEqual((r.response.request_id, r.response.status), ("r1", 200))
        self.assertEqual(json.loads(r.response.body)["echo"], {"text": "pb"})
        c.send(SocketFrame(subscribe={"topic": "conversation/", "id": "s"}).SerializeToString())
        self.assertEqual(recv().subscribed.topic, "conversation/")
        publish(self.gw, "conversation/x", {"n": 1})
        ev = recv()
        self.assertEqual((ev.event.topic, json.loads(ev.event.body)), ("conversation/x", {"n": 1}))
        c.send(SocketFrame(heartbeat={"id": "h"}).SerializeToString())
        self.assertEqual(recv().heartbeat_ack.id, "h")
        c.send(b"\xff\xff garbage")
        err = recv()
        self.assertEqual(json.loads(err.error.problem)["code"], "bad_request")
        c.send('{"type": "heartbeat"}')
        err = recv()
        self.assertEqual(json.loads(err.error.problem)["code"], "bad_request")

    def test_shutdown_closes_every_socket_with_going_away(self) -> None:
        clients = [self.client(user_token(self.gw, f"u{i}")) for i in range(3)]
        self.assertEqual(self.gw.parts.ws_factory.close_all(), 3)
        self.gw.settle()
        self.assertEqual({c.close_code for c in clients}, {1001})
        self.assertEqual({c.closed_reason for c in clients}, {"gateway stopping"})


class SettingsTests(TestCase):
    def test_defaults_match_the_spec(self) -> None:
        s = WebSocketSection()
        self.assertEqual((s.auth_timeout, s.idle_timeout), (10.0, 90.0))


def _event(topic: str, body: Any) -> Any:
    return wrap(ApiEvent(topic=topic, body=json.dumps(body).encode()), "module")

