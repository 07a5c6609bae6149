"""One WebSocket session with Autobahn's client over a real socket against a real gateway
(``start_gateway``: TCP listener, embedded ZeroMQ broker, built-in modules): what the
in-memory tests (``tests/test_websocket.py``, ``tests/test_ws_*.py``) cannot show is that
the same frames cross a real TCP connection and a real bus. The ``websockets`` package's
client is ``tests/test_websocket_independent.py``.
"""

from __future__ import annotations

import json
from typing import Any, cast

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, DeferredQueue, succeed
from twisted.trial.unittest import TestCase

from aico.gateway.testing.harness import RunningGateway, http_client, login, start_gateway
from aico.proto import ApiEvent, wrap

reactor = cast(Any, _reactor)


class _ClientProtocol(WebSocketClientProtocol):
    owner: AutobahnClient

    def onOpen(self) -> None:
        self.owner.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.owner.frames.put((payload, isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.owner.opened.called:
            self.owner.opened.errback(ConnectionError(f"refused: {code} {reason}"))
        if not self.owner.closed.called:
            self.owner.closed.callback((code, reason))


class AutobahnClient:
    """A JSON WebSocket client on Autobahn over TCP."""

    def __init__(self, case: TestCase, url: str, headers: dict[str, str] | None = None) -> None:
        self.frames: DeferredQueue[tuple[bytes, bool]] = DeferredQueue()
        self.opened: Deferred[_ClientProtocol] = Deferred()
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        factory = WebSocketClientFactory(url, headers=headers or {})
        owner = self

        class Proto(_ClientProtocol):
            def __init__(self) -> None:
                super().__init__()
                self.owner = owner

        factory.protocol = Proto
        host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
        self.connector = reactor.connectTCP(host, int(port), factory)
        case.addCleanup(self._cleanup)
        self.proto: _ClientProtocol | None = None

    async def open(self) -> AutobahnClient:
        self.proto = await self.opened
        return self

    def _cleanup(self) -> Deferred[Any]:
        if self.closed.called:
            return succeed(None)
        self.connector.disconnect()
        return self.closed

    def send(self, obj: Any) -> None:
        assert self.proto is not None
        self.proto.sendMessage(json.dumps(obj).encode(), isBinary=False)

    async def recv(self, timeout: float = 5.0) -> Any:
        d = self.frames.get()
        timer = reactor.callLater(timeout, d.cancel)
        try:
            payload, _ = await d
        finally:
            if timer.active():
                timer.cancel()
        return json.loads(payload)

    def close(self) -> Deferred[tuple[int | None, str | None]]:
        if self.proto is not None and not self.closed.called:
            self.proto.sendClose(1000)
        return self.closed


class RealSocketSmokeTests(TestCase):
    timeout = 60

    async def test_welcome_auth_request_subscribe_event_and_heartbeat_over_tcp(self) -> None:
        gw: RunningGateway = await start_gateway(self)
        tokens = await login(http_client(self), gw.base, "admin", gw.admin_password)
        c = await AutobahnClient(self, gw.base.replace("http://", "ws://") + "/ws").open()
        welcome = await c.recv()
        self.assertEqual((welcome["type"], welcome["authenticated"]), ("welcome", False))
        c.send({"type": "auth", "token": tokens["access_token"], "id": "a"})
        ok = await c.recv()
        self.assertEqual((ok["type"], ok["subject"], ok["id"]), ("auth_success", "admin", "a"))
        self.assertEqual(ok["session_id"], welcome["session_id"])
        c.send({"type": "request", "id": "r", "method": "POST",
                "path": "/api/v1/conversations/messages", "body": {"message": "over tcp"}})
        r = await c.recv()
        self.assertEqual((r["type"], r["id"], r["status"], r["body"]["reply"]),
                         ("response", "r", 200, "over tcp"))
        c.send({"type": "subscribe", "topic": "conversation/", "id": "s"})
        self.assertEqual((await c.recv())["type"], "subscribed")
        bus = gw.parts.bus
        # The gateway's own PUB socket publishes the event: wait until the broker has the
        # subscription the socket caused (ZeroMQ's slow joiner).
        await bus.wait_subscribed(["conversation/"], timeout=5.0)  # type: ignore[attr-defined]
        bus.publish("conversation/events/v1",
                    wrap(ApiEvent(topic="conversation/events/v1", body=b'{"typing": true}'), "test"))
        event = await c.recv()
        self.assertEqual(event, {"type": "event", "topic": "conversation/events/v1",
                                 "body": {"typing": True}})
        c.send({"type": "heartbeat", "id": "h"})
        ack = await c.recv()
        self.assertEqual((ack["type"], ack["id"]), ("heartbeat_ack", "h"))
        [entry] = gw.parts.connections.snapshot()
        self.assertEqual((entry["transport"], entry["subject"]), ("websocket", "admin"))
        self.assertTrue(entry["peer"].startswith("127.0.0.1:"))
        code, _ = await c.close()
        self.assertEqual(code, 1000)
