"""The session layer's WebSocket behaviour, in memory: fair share, rate-limited control
frames, unexpected errors in authentication, refused tokens (``aico/gateway/adapters/
session.py``)."""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.trial.unittest import TestCase

from aico.gateway.adapters.session import CLOSE_POLICY, MAX_AUTH_REFUSALS
from aico.gateway.adapters.websocket import WebSocketSession
from aico.gateway.testing.memory import MemoryGateway, MemoryWebSocket, WebSocketRefused
from tests.wsmodules import PASSWORD, Hold, connected, gateway, user_token


def session_of(gw: MemoryGateway, before: set[str]) -> WebSocketSession:
    """The one socket opened since *before* (connection ids)."""
    [new] = [c for c in gw.parts.connections if c.info.id not in before]
    return cast(WebSocketSession, new)


def ids(gw: MemoryGateway) -> set[str]:
    return {c.info.id for c in gw.parts.connections}


class FairShareTests(TestCase):
    def test_a_pipelining_socket_has_at_most_max_inflight_in_flight_while_others_are_served(self) -> None:
        gw = gateway(self, "[limits]\nmax_inflight = 2\n")
        hold = cast(Hold, gw.add_module(Hold))
        before = ids(gw)
        busy = connected(gw)
        session = session_of(gw, before)
        other = connected(gw)
        assert session.core is not None
        for i in range(10):
            busy.send({"type": "request", "id": i, "method": "GET", "path": f"/api/v1/hold?n={i}"})
        # Two in flight, the third read and waiting, reading held back: the other seven
        # are still in the client's transport, not read by the gateway.
        self.assertEqual([n for n, _ in hold.held], ["0", "1"])
        self.assertEqual(session.core.in_flight, 2)
        self.assertTrue(session.reading_paused)
        self.assertTrue(session.transport.reading_paused)  # type: ignore[union-attr]
        self.assertEqual(session.info.messages_in, 3)
        self.assertEqual(busy.recv_all(), [])
        # Meanwhile another socket and a REST client are answered at once.
        other.send({"type": "request", "id": "o", "method": "GET", "path": "/api/v1/ping?n=o"})
        r = other.recv()
        self.assertEqual((r["id"], r["status"], r["body"]["n"]), ("o", 200, "o"))
        rest = gw.get("/api/v1/ping?n=rest")
        self.assertEqual((rest.code, rest.json()["n"]), (200, "rest"))
        # Released, every request is answered, in order of arrival, never more than two
        # in flight at once.
        answered: list[Any] = []
        released: list[str] = []
        for _ in range(10):
            released += hold.release()
            gw.settle()
            answered += busy.recv_all()
            self.assertLessEqual(session.core.in_flight, 2)
            if len(answered) == 10:
                break
        self.assertEqual(released, [str(i) for i in range(10)])
        self.assertEqual([a["id"] for a in answered], list(range(10)))
        self.assertEqual([a["body"] for a in answered], [{"n": str(i)} for i in range(10)])
        self.assertEqual(session.core.max_in_flight_seen, 2)
        self.assertEqual(session.core.in_flight, 0)
        self.assertFalse(session.reading_paused)
        self.assertFalse(session.transport.reading_paused)  # type: ignore[union-attr]
        self.assertEqual(session.info.messages_in, 10)
        # ... and the socket reads again
        busy.send({"type": "heartbeat", "id": "after"})
        self.assertEqual(busy.recv()["id"], "after")


    def test_a_socket_held_back_for_fair_share_is_not_closed_as_idle(self) -> None:
        from twisted.internet.defer import Deferred

        from aico.bus.module import BackendModule, RequestContext, route
        from aico.proto import ApiRequest

        class Ticker(BackendModule):  # streams that do not end
            name = "ticker"
            version = "1"
            heartbeat_interval = 0

            def __init__(self, *args: Any) -> None:
                super().__init__(*args)
                self.streams: list[RequestContext] = []

            @route("GET", "/api/v1/ticks", topic="ticker/v1", public=True)
            def ticks(self, request: ApiRequest, ctx: RequestContext) -> Any:
                self.streams.append(ctx)
                return Deferred()

            def tick(self) -> None:
                for ctx in self.streams:
                    ctx.send_chunk({"t": self.clock.seconds()})

        gw = gateway(self, "[limits]\nmax_inflight = 2\n")
        ticker = cast(Ticker, gw.add_module(Ticker))
        before = ids(gw)
        ws = connected(gw, user_token(gw, "tess"))
        session = session_of(gw, before)
        for i in range(3):
            ws.send({"type": "request", "id": i, "method": "GET", "path": "/api/v1/ticks?stream=true"})
        self.assertTrue(session.reading_paused)
        for second in range(1, 181):
            gw.advance(1)
            if second % 3 == 0:
                ticker.tick()
                gw.settle()
            if second % 30 == 0:
                ws.send({"type": "heartbeat", "id": second})
        self.assertIsNone(session.close_code)  # held back by the gateway, not idle
        for ctx in ticker.streams:  # the streams end: the held frames are read at last
            ctx.finished = True
        ticker.streams.clear()


class ControlRateLimitTests(TestCase):
    config = "[ratelimit.tiers.standard]\nrequests = 3\nper_seconds = 60\nburst = 3\n"

    def test_subscribe_and_unsubscribe_are_rate_limited_like_requests(self) -> None:
        gw = gateway(self, self.config)
        ws = connected(gw, user_token(gw, "rita"))  # an accepted token costs nothing
        for i, topic in enumerate(["conversation/", "user/rita/", "conversation/a/"]):
            ws.send({"type": "subscribe", "topic": topic, "id": i})
            self.assertEqual(ws.recv()["type"], "subscribed", topic)
        ws.send({"type": "subscribe", "topic": "conversation/b/", "id": "over"})
        err = ws.recv()
        self.assertEqual((err["type"], err["id"]), ("error", "over"))
        self.assertEqual((err["problem"]["status"], err["problem"]["code"]), (429, "rate_limited"))
        ws.send({"type": "unsubscribe", "topic": "conversation/", "id": "un"})
        err = ws.recv()
        self.assertEqual((err["type"], err["id"]), ("error", "un"))
        self.assertEqual((err["problem"]["status"], err["problem"]["code"]), (429, "rate_limited"))
        # the same budget as requests on the standard tier
        ws.send({"type": "request", "id": "r", "method": "POST", "path": "/api/v1/echo",
                 "body": {"text": "x"}})
        r = ws.recv()
        self.assertEqual((r["status"], r["body"]["code"]), (429, "rate_limited"))
        self.assertIn("retry-after", r["headers"])
        [entry] = gw.parts.connections.snapshot()
        self.assertEqual(sorted(entry["subscriptions"]),
                         ["conversation/", "conversation/a/", "user/rita/"])
        # 429s are no refused tokens: the socket stays open
        self.assertFalse(ws.closed)
        # one request's worth later (60 s / 3), one more goes through
        gw.advance(20)
        ws.send({"type": "unsubscribe", "topic": "conversation/", "id": "un2"})
        self.assertEqual(ws.recv()["type"], "unsubscribed")
        ws.send({"type": "subscribe", "topic": "conversation/", "id": "again"})
        self.assertEqual(ws.recv()["problem"]["code"], "rate_limited")


class AuthenticationErrorTests(TestCase):
    def break_chain(self, gw: MemoryGateway) -> None:
        """Make ``principal_for_token`` raise ``RuntimeError`` until ``self.broken`` is false."""
        chain = gw.parts.chain
        working = chain.principal_for_token
        self.broken = True

        def principal_for_token(token: str) -> Any:
            if self.broken:
                raise RuntimeError("the token service broke")
            return working(token)

        self.patch(chain, "principal_for_token", principal_for_token)

    def test_an_unexpected_error_in_an_auth_frame_is_a_500_and_never_counts(self) -> None:
        gw = gateway(self)
        token = user_token(gw, "una")
        ws = connected(gw)
        self.break_chain(gw)
        for i in range(MAX_AUTH_REFUSALS + 1):
            ws.send({"type": "auth", "token": token, "id": i})
            err = ws.recv()
            self.assertEqual((err["type"], err["id"]), ("error", i))
            self.assertEqual((err["problem"]["status"], err["problem"]["code"]), (500, "internal_error"))
            self.assertNotIn("broke", json.dumps(err))
        # a broken check is no refused token: the socket stays open, and unauthenticated
        ws.send({"type": "heartbeat", "id": "h"})
        self.assertEqual(ws.recv()["type"], "heartbeat_ack")
        self.assertFalse(ws.closed)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), MAX_AUTH_REFUSALS + 1)

    def test_an_unexpected_error_checking_the_upgrade_header_answers_500_never_401(self) -> None:
        gw = gateway(self)
        token = user_token(gw, "ulf")
        self.break_chain(gw)
        with self.assertRaises(WebSocketRefused) as caught:
            gw.websocket(headers={"Authorization": f"Bearer {token}"})
        self.assertEqual(caught.exception.status, 500)
        self.assertNotIn("broke", caught.exception.status_line)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(gw.parts.connections), 0)
        # a bad token on a working chain is still a 401
        self.broken = False
        with self.assertRaises(WebSocketRefused) as caught:
            gw.websocket(headers={"Authorization": "Bearer forged"})
        self.assertEqual(caught.exception.status, 401)
        ws = gw.websocket(headers={"Authorization": f"Bearer {token}"})
        self.assertTrue(ws.recv()["authenticated"])


class RefusedTokenTests(TestCase):
    def test_five_refused_auth_frames_close_the_socket_with_1008(self) -> None:
        gw = gateway(self, "[auth]\naccess_ttl = 60\n")
        gw.add_user("rex", PASSWORD)
        expired = gw.token("rex", PASSWORD)
        gw.advance(61 + gw.config.auth.leeway)
        revoked = gw.token("rex", PASSWORD)
        self.assertEqual(gw.post("/api/v1/users/logout", {}, token=revoked).code, 204)
        ws: MemoryWebSocket = connected(gw)
        codes = []
        for i, token in enumerate(["forged", "not.a.token", revoked, expired]):
            ws.send({"type": "auth", "token": token, "id": i})
            err = ws.recv()
            self.assertEqual(err["problem"]["status"], 401)
            codes.append(err["problem"]["code"])
            ws.send({"type": "heartbeat"})  # frames in between do not reset the count
            self.assertEqual(ws.recv()["type"], "heartbeat_ack")
        self.assertEqual(codes, ["token_invalid", "token_invalid", "token_revoked", "token_expired"])
        self.assertFalse(ws.closed)
        ws.send({"type": "auth", "token": "forged", "id": 5})
        err = ws.recv()
        self.assertEqual((err["id"], err["problem"]["code"]), (5, "token_invalid"))
        self.assertTrue(ws.closed)
        self.assertEqual((ws.close_code, ws.closed_reason), (CLOSE_POLICY, "too many refused tokens"))
        self.assertEqual(CLOSE_POLICY, 1008)
        self.assertEqual(len(gw.parts.connections), 0)

    def test_an_accepted_token_in_between_does_not_reset_the_count(self) -> None:
        gw = gateway(self)
        good = user_token(gw, "sam")
        ws = connected(gw)
        for i in range(MAX_AUTH_REFUSALS - 1):
            ws.send({"type": "auth", "token": f"forged-{i}"})
            ws.recv()
        ws.send({"type": "auth", "token": good})
        self.assertEqual(ws.recv()["type"], "auth_success")
        ws.send({"type": "auth", "token": "forged-last"})
        self.assertEqual(ws.recv()["problem"]["code"], "token_invalid")
        self.assertEqual(ws.close_code, CLOSE_POLICY)


class IdleFootprintTests(TestCase):
    """What an idle, authenticated socket keeps (issue 12: ≤ 16 KiB at 10,000 sockets)."""

    def test_autobahns_options_live_on_the_class_with_the_factorys_values(self) -> None:
        gw = gateway(self)
        before = ids(gw)
        ws = gw.websocket(headers={"Authorization": f"Bearer {user_token(gw, 'ida')}"})
        self.assertEqual(ws.recv()["type"], "welcome")
        session = session_of(gw, before)
        factory = session.factory
        for attr in type(session).CONFIG_ATTRS:
            self.assertNotIn(attr, vars(session), attr)
            self.assertEqual(getattr(session, attr), getattr(factory, attr), attr)
        # a function option stays a function of its own argument, not a method
        self.assertIsNone(session.perMessageCompressionAccept([]))
        self.assertEqual(session.allowedOrigins, list(factory.settings().allowed_origins))

    def test_an_open_socket_does_not_keep_its_opening_handshake_or_empty_deques(self) -> None:
        gw = gateway(self)
        before = ids(gw)
        ws = gw.websocket(headers={"Authorization": f"Bearer {user_token(gw, 'ida')}"})
        self.assertEqual(ws.recv()["type"], "welcome")
        session = session_of(gw, before)
        self.assertEqual(ws.recv()["type"], "auth_success")
        self.assertEqual((session.http_request_data, session.http_headers), (b"", {}))
        self.assertIsInstance(session._queue, list)
        assert session.core is not None
        self.assertIsInstance(session.core._waiting, list)
        # and it still works: a request is answered
        ws.send({"type": "heartbeat"})
        self.assertEqual(ws.recv()["type"], "heartbeat_ack")


class ConnectionSetUpTests(TestCase):
    """Autobahn's per-connection debug line (all its options through ``pprint``) costs
    nothing while its debug level is off, and is still written when it is on."""

    def _count_pformat(self) -> list[object]:
        import autobahn.websocket.protocol as autobahn_protocol

        calls: list[object] = []
        module: Any = autobahn_protocol
        original = module.pformat

        def counting(obj: object, *args: Any, **kwargs: Any) -> str:
            # The gateway's sockets' options, not the in-memory client's (Autobahn too).
            if isinstance(obj, list) and any(source == "WebSocketSession" for *_, source in obj):
                calls.append(obj)
            return str(original(obj, *args, **kwargs))

        module.pformat = counting
        self.addCleanup(setattr, module, "pformat", original)
        return calls

    def _open(self) -> None:
        gw = gateway(self)
        ws = gw.websocket(headers={"Authorization": f"Bearer {user_token(gw, 'ida')}"})
        self.assertEqual(ws.recv()["type"], "welcome")
        self.assertEqual(ws.recv()["type"], "auth_success")
        ws.send({"type": "heartbeat"})
        self.assertEqual(ws.recv()["type"], "heartbeat_ack")

    def test_with_debug_off_a_new_socket_formats_no_options(self) -> None:
        calls = self._count_pformat()
        self._open()
        self.assertEqual(calls, [])

    def test_with_debug_on_the_options_are_formatted_for_the_debug_line(self) -> None:
        import txaio

        calls = self._count_pformat()
        txaio.set_global_log_level("debug")
        self.addCleanup(txaio.set_global_log_level, "info")
        self._open()
        self.assertEqual(len(calls), 1)  # one socket, one formatting of its options
        [options] = calls
        assert isinstance(options, list)
        self.assertIn("openHandshakeTimeout", {name for name, _, _ in options})
