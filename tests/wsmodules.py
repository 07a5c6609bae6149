"""Backend modules and helpers for the in-memory WebSocket tests.

:class:`Routes` serves the small route set the WebSocket tests exercise (a public ping,
an echo that needs a capability and validates its body, a whoami, a streamed reply) as
a backend module on the :class:`~aico.gateway.testing.memory.MemoryGateway`'s bus, so a
request goes through the real route table, security chain and bus forwarder.
:class:`Hold` keeps its answers until the test releases them (fair share).

:data:`WS_CONFIG` grants the ``user`` role the two capabilities of those routes, on top
of the defaults: a user lacking a capability is a user whose role lacks it.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred

from aico.bus.module import BackendModule, RequestContext, Response, route
from aico.gateway.testing.memory import MemoryGateway, MemoryWebSocket
from aico.proto import ApiEvent, ApiRequest, wrap

#: The default ``user`` capabilities plus those of :class:`Routes`.
USER_CAPS = ("users:self", "conversations:read", "conversations:write", "events:conversation",
             "events:user", "sync:read", "sync:write", "echo:write", "whoami:read")

WS_CONFIG = "[roles]\nuser = [" + ", ".join(f'"{c}"' for c in USER_CAPS) + "]\n"

#: Every test user's password.
PASSWORD = "a-long-password-1"


class Routes(BackendModule):
    """The test routes (what ``tests/realtime.py`` serves from a fake table, as a module)."""

    name = "wsroutes"
    version = "1.0.0"
    heartbeat_interval = 0  # no heartbeat timer: the memory clock only moves when told

    @route("GET", "/api/v1/ping", topic="wsroutes/ping/v1", public=True)
    def ping(self, request: ApiRequest, ctx: RequestContext) -> Response:
        return Response(200, {"pong": True, "n": request.query.get("n")})

    @route("POST", "/api/v1/echo", topic="wsroutes/echo/v1", capability="echo:write",
           request_schema={"type": "object", "properties": {"text": {"type": "string"}},
                           "required": ["text"]})
    def echo(self, request: ApiRequest, ctx: RequestContext) -> Response:
        principal = request.principal
        return Response(200, {"echo": ctx.json(), "subject": principal.subject or None,
                              "transport": principal.transport})

    @route("GET", "/api/v1/whoami", topic="wsroutes/whoami/v1", capability="whoami:read")
    def whoami(self, request: ApiRequest, ctx: RequestContext) -> Response:
        return Response(200, {"subject": request.principal.subject})

    @route("GET", "/api/v1/stream", topic="wsroutes/stream/v1", public=True)
    def stream(self, request: ApiRequest, ctx: RequestContext) -> Response | None:
        if not ctx.streaming:
            return Response(200, {"whole": True})
        for i in range(3):
            ctx.send_chunk({"delta": i})
        return None


class Hold(BackendModule):
    """``GET /api/v1/hold?n=…`` (public): answered only when the test releases it."""

    name = "hold"
    version = "1.0.0"
    heartbeat_interval = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held: deque[tuple[str, Deferred[Response]]] = deque()

    @route("GET", "/api/v1/hold", topic="hold/v1", public=True)
    def hold(self, request: ApiRequest, ctx: RequestContext) -> Deferred[Response]:
        d: Deferred[Response] = Deferred()
        self.held.append((request.query.get("n", ""), d))
        return d

    def release(self) -> list[str]:
        """Answer every request held now, oldest first; their ``n``."""
        released = []
        while self.held:
            n, d = self.held.popleft()
            released.append(n)
            d.callback(Response(200, {"n": n}))
        return released


def gateway(test: Any, config: str = "", *modules: type[BackendModule]) -> MemoryGateway:
    """A memory gateway with :data:`WS_CONFIG` (then *config*) and :class:`Routes`."""
    gw = MemoryGateway(WS_CONFIG + config, test=test)
    classes: list[type[BackendModule]] = [Routes, *modules]
    for module in classes:
        gw.add_module(module)
    return gw


def user_token(gw: MemoryGateway, name: str, roles: tuple[str, ...] = ("user",)) -> str:
    """Create *name* (a no-op when it exists) and log in: an access token."""
    gw.add_user(name, PASSWORD, roles)
    return gw.token(name, PASSWORD)


def connected(gw: MemoryGateway, token: str | None = None, **kw: Any) -> MemoryWebSocket:
    """A socket past its ``welcome`` (and ``auth_success`` when *token* is given)."""
    ws = gw.websocket(**kw)
    welcome = ws.recv()
    assert welcome["type"] == "welcome", welcome
    if token is not None:
        ws.send({"type": "auth", "token": token})
        ok = ws.recv()
        assert ok["type"] == "auth_success", ok
    return ws


def publish(gw: MemoryGateway, topic: str, body: Any, source: str = "module") -> None:
    """Publish an ``ApiEvent`` on the gateway's bus, as a module does."""
    import json

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    gw.bus.publish(topic, wrap(ApiEvent(topic=topic, body=raw), source))
    gw.settle()
