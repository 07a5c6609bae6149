"""WebSocket against the whole gateway in memory: the built-in routes and modules, the
admin and user routes that end sessions, origins, hostile input, logs and rate limits.

These ran on real sockets against a real gateway (``tests/test_realtime_gateway.py``,
``tests/test_websocket_independent.py``); what needs real sockets stays in
``tests/test_ipc_gateway.py``, ``tests/test_ws_real.py`` and
``tests/test_websocket_independent.py``.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import TestCase

from aico.gateway.adapters.websocket import CLOSE_AUTH_TIMEOUT, CLOSE_IDLE_TIMEOUT
from aico.gateway.testing.memory import (
    ADMIN_PASSWORD,
    MemoryGateway,
    MemoryWebSocket,
    WebSocketRefused,
)
from aico.proto import ApiEvent, wrap


class GatewayWebSocketTests(TestCase):
    """The WebSocket half of what ``tests/test_realtime_gateway.py`` checked."""

    def setUp(self) -> None:
        self.gw = MemoryGateway(test=self)
        self.tokens = self.gw.login()

    def test_websocket_goes_through_the_same_chain_as_rest(self) -> None:
        token = self.tokens["access_token"]
        ws = self.gw.websocket()
        out = [ws.recv()]  # welcome
        ws.send({"type": "request", "id": 1, "method": "GET", "path": "/api/v1/users/me"})
        out.append(ws.recv())  # 401 before auth
        ws.send({"type": "auth", "token": token})
        out.append(ws.recv())
        ws.send({"type": "request", "id": "c", "method": "POST",
                 "path": "/api/v1/conversations/messages", "body": {"message": "over ws"}})
        out.append(ws.recv())
        ws.send({"type": "request", "id": "v", "method": "POST",
                 "path": "/api/v1/conversations/messages", "body": {"nope": 1}})
        out.append(ws.recv())
        welcome, anon, auth, ok, invalid = out
        self.assertEqual(welcome["type"], "welcome")
        self.assertEqual((anon["type"], anon["status"], anon["body"]["code"]), ("response", 401, "unauthenticated"))
        self.assertEqual((auth["type"], auth["subject"]), ("auth_success", "admin"))
        self.assertEqual((ok["id"], ok["status"], ok["body"]["reply"]), ("c", 200, "over ws"))
        self.assertEqual((invalid["status"], invalid["body"]["code"]), (400, "validation_failed"))
        # and REST answers the same request the same way
        r = self.gw.post("/api/v1/conversations/messages", {"nope": 1}, token=token)
        self.assertEqual((r.code, r.json()["code"]), (400, "validation_failed"))

    def test_websocket_subscriber_receives_module_events_and_is_told_of_logout(self) -> None:
        tokens = self.gw.login()
        ws = self.gw.websocket(headers={"Authorization": f"Bearer {tokens['access_token']}"})
        ws.recv()  # welcome
        frames = [ws.recv()]  # auth_success from the upgrade header
        ws.send({"type": "subscribe", "topic": "conversation/"})
        frames.append(ws.recv())
        self.gw.bus.publish("conversation/events/v1",
                            wrap(ApiEvent(topic="conversation/events/v1", body=b'{"typing": true}'), "test"))
        frames.append(ws.recv())  # the event
        self.assertEqual(len(frames), 3, frames)
        r = self.gw.post("/api/v1/users/logout", {}, token=tokens["access_token"])
        self.assertEqual(r.code, 204)
        frames.append(ws.recv())  # auth_revoked
        ws.send({"type": "request", "id": 9, "method": "GET", "path": "/api/v1/users/me"})
        frames.append(ws.recv())
        auth, sub, event, revoked, after = frames
        self.assertEqual((auth["type"], auth["subject"]), ("auth_success", "admin"))
        self.assertEqual(sub["type"], "subscribed")
        self.assertEqual((event["type"], event["topic"], event["body"]), ("event", "conversation/events/v1", {"typing": True}))
        self.assertEqual(revoked["type"], "auth_revoked")
        self.assertEqual(after["body"]["code"] if "body" in after else after["problem"]["code"], "token_revoked")
        # the other login's token (setUp's) is a session of its own: still good
        self.assertEqual(self.gw.get("/api/v1/users/me", token=self.tokens["access_token"]).code, 200)

    def test_no_token_in_logs_over_websocket(self) -> None:
        """Tokens sent over WebSocket (upgrade header and auth frame) are never logged."""
        from twisted.logger import formatEvent, globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        token = self.tokens["access_token"]
        ws = self.gw.websocket(headers={"Authorization": f"Bearer {token}"})
        ws.recv()
        ws.recv()
        ws.close()
        ws = self.gw.websocket()
        ws.recv()
        ws.send({"type": "auth", "token": token})
        ws.recv()
        ws.send({"type": "auth", "token": token + "x"})  # a refused one too
        ws.recv()
        ws.close()
        self.assertTrue(events)
        # Autobahn's own debug lines (once routed here) carried the upgrade headers.
        text = "\n".join(formatEvent(e) + " " + repr(e) for e in events)
        for part in [token, *token.split(".")]:
            self.assertNotIn(part, text)

    def test_hostile_input_over_websocket_is_a_clear_4xx(self) -> None:
        token = self.tokens["access_token"]
        deep = "[" * 100_000 + "]" * 100_000
        out: dict[str, Any] = {}
        ws = self.gw.websocket()
        ws.recv()
        ws.send({"type": "auth", "token": token})
        ws.recv()
        ws.send(deep)  # the frame itself nests too deeply
        out["ws_frame"] = ws.recv()
        ws.send(json.dumps({"type": "request", "id": 1, "method": "POST",
                            "path": "/api/v1/conversations/messages"})[:-1]
                + ', "body": ' + "[" * 100 + "]" * 100 + "}")  # deeper than limits.json_depth
        out["ws_body"] = ws.recv()
        ws.send({"type": "heartbeat", "id": "still-open"})
        out["ws_alive"] = ws.recv()
        self.assertEqual(out["ws_frame"]["type"], "error")
        self.assertEqual((out["ws_frame"]["problem"]["status"], out["ws_frame"]["problem"]["code"]),
                         (400, "malformed_json"))
        self.assertEqual((out["ws_body"]["status"], out["ws_body"]["body"]["code"]), (400, "validation_failed"))
        self.assertEqual((out["ws_alive"]["type"], out["ws_alive"]["id"]), ("heartbeat_ack", "still-open"))

    def test_websocket_origins_and_plain_get(self) -> None:
        out: dict[str, Any] = {}
        for name, origin in [("evil", "http://evil.example"), ("local", "http://127.0.0.1:8771")]:
            try:
                out[name] = self.gw.websocket(headers={"Origin": origin}).recv()["type"]
            except WebSocketRefused as e:
                out[name] = e
        out["none"] = self.gw.websocket().recv()["type"]  # no Origin: not a browser
        self.assertIsInstance(out["evil"], WebSocketRefused)
        # The gateway's own refusal (403 forbidden), never echoing the Origin back.
        self.assertEqual(out["evil"].status, 403)
        self.assertNotIn("evil.example", out["evil"].status_line)
        self.assertEqual((out["local"], out["none"]), ("welcome", "welcome"))
        r = self.gw.get("/ws")
        body = r.json()
        self.assertEqual((r.code, body["code"]), (400, "bad_request"))
        self.assertEqual(r.header("x-request-id"), body["request_id"])
        self.assertNotIn(b"Autobahn", json.dumps(body).encode())

    def frames_around(self, token: str, act: Any) -> list[dict[str, Any]]:
        """Open a socket authenticated with *token*, run *act* once it is authenticated, and
        return the socket's first three frames."""
        ws = self.gw.websocket(headers={"Authorization": f"Bearer {token}"})
        frames = [ws.recv(), ws.recv()]
        act()
        frames.append(ws.recv())
        return frames

    def test_disabling_a_user_tells_their_open_sockets(self) -> None:
        admin = self.tokens["access_token"]
        r = self.gw.post("/api/v1/users", {"username": "hank", "password": "a-long-password-1",
                                           "roles": ["user"]}, token=admin)
        self.assertEqual(r.code, 201)
        user = self.gw.login("hank", "a-long-password-1")

        def disable() -> None:
            r = self.gw.request("PATCH", "/api/v1/users/hank", json_body={"disabled": True}, token=admin)
            self.assertEqual(r.code, 200)

        frames = self.frames_around(user["access_token"], disable)
        self.assertEqual([f["type"] for f in frames], ["welcome", "auth_success", "auth_revoked"])
        self.assertEqual(frames[2]["problem"]["code"], "token_revoked")

    def test_logout_with_a_newer_token_of_the_session_tells_sockets_holding_an_older_one(self) -> None:
        first = self.gw.login()

        def refresh_then_logout() -> None:
            r = self.gw.post("/api/v1/users/refresh", {"refresh_token": first["refresh_token"]})
            second = r.json()
            r = self.gw.post("/api/v1/users/logout", {}, token=second["access_token"])
            self.assertEqual(r.code, 204)

        frames = self.frames_around(first["access_token"], refresh_then_logout)
        self.assertEqual([f["type"] for f in frames], ["welcome", "auth_success", "auth_revoked"])

    def test_changing_a_users_password_or_roles_tells_their_open_sockets(self) -> None:
        admin = self.tokens["access_token"]
        for name, change in (("ida", {"password": "another-long-password"}),
                             ("jon", {"roles": ["service"]})):
            self.gw.add_user(name, "a-long-password-1", ("user",))
            user = self.gw.login(name, "a-long-password-1")

            def patch(name: str = name, change: dict[str, Any] = change) -> None:
                r = self.gw.request("PATCH", f"/api/v1/users/{name}", json_body=change, token=admin)
                self.assertEqual(r.code, 200)

            frames = self.frames_around(user["access_token"], patch)
            self.assertEqual([f["type"] for f in frames], ["welcome", "auth_success", "auth_revoked"],
                             change)


class FramesAgainstTheGatewayTests(TestCase):
    """What ``tests/test_websocket_independent.py`` checked of frames and timeouts, which
    needs no second client library (the real layer keeps the interoperability tests)."""

    extra = "[websocket]\nauth_timeout = 0.5\nidle_timeout = 1.0\nmax_message_size = 4096\n"

    def setUp(self) -> None:
        self.gw = MemoryGateway(self.extra, test=self)
        self.tokens = self.gw.login()

    def test_json_frames_heartbeat_subscribe_unsubscribe_and_errors(self) -> None:
        token = self.tokens["access_token"]
        ws = self.gw.websocket()

        def ask(frame: Any) -> Any:
            ws.send(frame)
            return ws.recv()

        out = [ws.recv()]                                                            # welcome
        out.append(ask({"type": "auth", "token": token}))                            # auth_success
        out.append(ask({"type": "heartbeat", "id": "h"}))                            # heartbeat_ack
        out.append(ask({"type": "subscribe", "topic": "conversation/", "id": 1}))
        out.append(ask({"type": "unsubscribe", "topic": "conversation/", "id": 2}))
        out.append(ask("this is not json"))
        out.append(ask({"id": 4}))                                                   # no type
        out.append(ask({"type": "dance", "id": 5}))                                  # unknown type
        out.append(ask({"type": "heartbeat", "pad": "x" * 8000}))                    # too large
        out.append(ask({"type": "request", "id": 6, "method": "GET", "path": "/api/v1/nope"}))
        out.append(ask({"type": "heartbeat", "id": "still-open"}))
        (welcome, auth, ack, sub, unsub, not_json, no_type, unknown, too_large,
         not_found, alive) = out
        self.assertEqual(welcome["type"], "welcome")
        self.assertEqual((welcome["auth_timeout"], welcome["idle_timeout"], welcome["max_message_size"]),
                         (0.5, 1.0, 4096))
        self.assertEqual((auth["type"], auth["subject"], auth["roles"]), ("auth_success", "admin", ["admin"]))
        self.assertEqual((ack["type"], ack["id"]), ("heartbeat_ack", "h"))
        self.assertEqual((sub["type"], sub["topic"]), ("subscribed", "conversation/"))
        self.assertEqual((unsub["type"], unsub["topic"]), ("unsubscribed", "conversation/"))
        for frame, code in [(not_json, "malformed_json"), (no_type, "bad_request"),
                            (unknown, "bad_request"), (too_large, "payload_too_large")]:
            self.assertEqual(frame["type"], "error", frame)
            self.assertEqual(frame["problem"]["code"], code)
        self.assertEqual((not_found["type"], not_found["status"], not_found["body"]["code"]),
                         ("response", 404, "not_found"))
        self.assertEqual(alive["type"], "heartbeat_ack")

    def test_auth_and_idle_timeouts_close_with_their_codes(self) -> None:
        token = self.tokens["access_token"]
        never = self.gw.websocket()  # never authenticates
        never.recv()
        self.gw.advance(0.4)
        self.assertFalse(never.closed)
        self.gw.advance(0.1)
        silent = self.gw.websocket(headers={"Authorization": f"Bearer {token}"})
        silent.recv()
        silent.recv()
        self.gw.advance(0.9)  # authenticated but silent
        self.assertFalse(silent.closed)
        self.gw.advance(0.1)
        self.assertEqual((never.close_code, silent.close_code), (CLOSE_AUTH_TIMEOUT, CLOSE_IDLE_TIMEOUT))
        self.assertEqual((never.close_code, silent.close_code), (4001, 4002))


class AuthTierAcrossConnectionsTests(TestCase):
    extra = "[ratelimit.tiers.auth]\nrequests = 3\nper_seconds = 60\nburst = 3\n"

    def test_new_connections_do_not_reset_the_login_budget(self) -> None:
        gw = MemoryGateway(self.extra, test=self)
        statuses = []
        sockets: list[MemoryWebSocket] = []
        for _ in range(5):  # a fresh socket for every attempt
            ws = gw.websocket()
            sockets.append(ws)
            ws.recv()
            ws.send({"type": "request", "id": 1, "method": "POST",
                     "path": "/api/v1/users/authenticate",
                     "body": {"username": "admin", "password": "wrong-guess"}})
            statuses.append(ws.recv()["status"])
            ws.close()
        self.assertEqual(statuses, [401, 401, 401, 429, 429])
        self.assertEqual(len({id(s) for s in sockets}), 5)
        # REST from the same address shares the budget: still refused
        r = gw.post("/api/v1/users/authenticate", {"username": "admin", "password": ADMIN_PASSWORD})
        self.assertEqual(r.code, 429)
