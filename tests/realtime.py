"""Test harness for the IPC adapter and ``aico.client`` on real ZeroMQ sockets
(``tests/test_ipc.py``, ``tests/test_client.py``; the WebSocket tests run on
:class:`~aico.gateway.testing.memory.MemoryGateway`).

A :class:`Realtime` builds, inside the test's reactor: a Curve state directory (short
path, for ``ipc://``), an embedded broker with a gateway bus client and a "module" bus
client that publishes events, a Dispatcher with a few test routes behind a tiny fake
security chain (authenticate from a token table, authorize by capability, the real
validation step), the connection manager, the WebSocket resource in a real GatewaySite
on 127.0.0.1 (``aico.client`` falls back to it), and optionally the IPC listener. Timers
of the adapters run on a ``Clock``. Everything is closed in the test's cleanups.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from aico.bus.broker import EmbeddedBroker
from aico.bus.client import BusClient, BusReactor, CurveClientKeys
from aico.bus.curve import CurveLayout, create_keypair, ensure_client, load_public
from aico.gateway.adapters.ipc import IpcListener
from aico.gateway.adapters.rest import GatewaySite, RestAdapter
from aico.gateway.adapters.session import SessionServices
from aico.gateway.adapters.websocket import GatewayWebSocketFactory, websocket_resource
from aico.gateway.api.transport.dependencies import TransportDeps
from aico.gateway.api.transport.router import routes as transport_routes
from aico.gateway.config import LimitsSection, WebSocketSection
from aico.gateway.connections import ConnectionManager
from aico.gateway.errors import (
    Forbidden,
    TokenInvalid,
    Unauthenticated,
)
from aico.gateway.lifecycle import InFlight
from aico.gateway.routing.dispatch import Dispatcher
from aico.gateway.routing.messages import Principal, Request, Response, StreamBody, json_response
from aico.gateway.routing.table import RouteEntry, RouteTable
from aico.gateway.security import validate
from aico.gateway.security.topics import may_subscribe
from aico.keystore import Keystore
from aico.proto import ApiEvent, wrap

reactor = cast(Any, _reactor)


# ----------------------------------------------------------------------- fake security


@dataclass
class Tokens:
    """A token table standing in for the real token service (tests only)."""

    table: dict[str, Principal] = field(default_factory=dict)

    def issue(self, subject: str, caps: tuple[str, ...] = ()) -> str:
        token = f"tok-{subject}-{len(self.table)}"
        self.table[token] = Principal(subject=subject, roles=("user",), caps=frozenset(caps),
                                      token_id="jti-" + token)
        return token

    def authenticate(self, token: str) -> Principal:
        principal = self.table.get(token)
        if principal is None:
            raise TokenInvalid("unknown token")
        return principal

    def step(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        if header.startswith("Bearer "):
            request.principal = self.authenticate(header[7:])

    def required(self, request: Request) -> None:
        self.step(request)
        if request.principal is None:
            raise Unauthenticated("this route needs a bearer token")

    @staticmethod
    def authorize_topic(request: Request) -> None:
        if not may_subscribe(request.principal, request.path):
            raise Forbidden(f"not allowed to subscribe to {request.path[:256]!r}")

    # The session layer's control steps (what SecurityChain provides in the gateway).
    def token_steps(self) -> list[Any]:
        return [self.required]

    def subscription_steps(self) -> list[Any]:
        return [self.required, self.authorize_topic]

    def unsubscription_steps(self) -> list[Any]:
        return [self.step]

    @staticmethod
    def authorize(request: Request) -> None:
        route = request.route
        assert route is not None
        if route.public:
            return
        if request.principal is None:
            raise Unauthenticated()
        if route.capability not in request.principal.caps:
            raise Forbidden(f"needs {route.capability}")


# ----------------------------------------------------------------------- test routes


def _echo(request: Request) -> Response:
    principal = request.principal
    return json_response({"echo": request.parsed_json(),
                          "subject": principal.subject if principal else None,
                          "transport": request.transport})


def _whoami(request: Request) -> Response:
    assert request.principal is not None
    return json_response({"subject": request.principal.subject})


def _ping(request: Request) -> Response:
    return json_response({"pong": True, "n": request.query.get("n")})


def _stream(request: Request) -> Response:
    if not request.accepts_stream:
        return json_response({"whole": True})
    stream = StreamBody()
    for i in range(3):
        stream.push(json.dumps({"delta": i}).encode() + b"\n")
    stream.finish()
    return Response(status=200, stream=stream, content_type="application/x-ndjson")


#: Bodies received by POST /api/v1/notes (to observe fire-and-forget requests).
NOTES: list[Any] = []


def _note(request: Request) -> Response:
    NOTES.append(request.parsed_json())
    return Response(status=204)


def test_routes() -> list[RouteEntry]:
    return validate.prepare([
        RouteEntry("POST", "/api/v1/notes", _note, public=True, tier="public"),
        RouteEntry("GET", "/api/v1/ping", _ping, public=True, tier="public"),
        RouteEntry("POST", "/api/v1/echo", _echo, capability="echo:write",
                   request_schema={"type": "object",
                                   "properties": {"text": {"type": "string"}},
                                   "required": ["text"]}),
        RouteEntry("GET", "/api/v1/whoami", _whoami, capability="whoami:read"),
        RouteEntry("GET", "/api/v1/stream", _stream, public=True, streaming=True),
    ])


USER_CAPS = ("echo:write", "whoami:read", "events:conversation")


# ----------------------------------------------------------------------- the harness


class Realtime:
    """Everything the adapters need, on real sockets; see the module docstring."""

    def __init__(self, case: TestCase, *, bus: bool = True) -> None:
        self.case = case
        self.clock = Clock()
        self.settings = WebSocketSection()
        self.root = Path(tempfile.mkdtemp(prefix="aico-rt-"))
        case.addCleanup(shutil.rmtree, self.root, True)
        self.keystore = Keystore.ephemeral()
        self.layout = CurveLayout(self.root, self.keystore)
        for name in ("broker", "gateway"):
            create_keypair(self.layout.root, name, self.keystore)
        self.tokens = Tokens()
        self.with_bus = bus
        self.bus: BusClient | None = None
        self.module: BusClient | None = None
        self.ipc: IpcListener | None = None

    async def start(self) -> Realtime:
        if self.with_bus:
            ensure_client(self.layout, "gateway")
            ensure_client(self.layout, "module")
            broker = EmbeddedBroker(self.layout, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
            broker.start()
            self.case.addCleanup(broker.stop)
            self.bus = self._bus_client(broker, "gateway")
            self.module = self._bus_client(broker, "module")
            await self.bus.start()
            await self.module.start()
        self.connections = ConnectionManager(self.clock, self.bus)
        self.case.addCleanup(self.connections.stop)
        limits = LimitsSection()
        deps = TransportDeps(
            ipc_endpoints=lambda: self.ipc.endpoints if self.ipc is not None else {},
            curve_server_key=lambda: load_public(self.layout.gateway_public).decode(),
            version="test")
        routes = [*test_routes(), *validate.prepare(transport_routes(deps))]
        self.dispatcher = Dispatcher(RouteTable(routes), [
            self.tokens.step, self.tokens.authorize, validate.make_step(lambda: limits)])
        self.limits = limits
        self.sessions = SessionServices(self.dispatcher, self.tokens, self.connections, InFlight(),
                                        lambda: self.limits, self.clock)
        resource, self.ws_factory = websocket_resource(self.sessions, lambda: self.settings)
        site = GatewaySite(RestAdapter(self.dispatcher, websocket=resource).resource(),
                           body_limit=lambda: limits.body_max,
                           header_limits=lambda: (limits.header_count, limits.header_size))
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.case.addCleanup(self.port.stopListening)
        self.http_port = self.port.getHost().port
        return self

    def _bus_client(self, broker: EmbeddedBroker, name: str) -> BusClient:
        client = BusClient(cast(BusReactor, reactor), name, broker.pub_endpoint,
                           broker.sub_endpoint, CurveClientKeys.from_layout(self.layout, name))
        self.case.addCleanup(client.stop)
        return client

    def start_ipc(self, endpoint: str | None = None, fallback: str = "tcp://127.0.0.1:*",
                  curve_on_ipc: bool = True) -> IpcListener:
        if endpoint is None:
            endpoint = f"ipc://{self.root}/gateway.ipc"
        self.ipc = IpcListener(self.sessions, self.layout, endpoint, fallback, curve_on_ipc, reactor)
        self.ipc.listen()
        self.case.addCleanup(self.ipc.stop)
        return self.ipc

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}/ws"

    def publish(self, topic: str, body: Any) -> None:
        """Publish an ApiEvent on *topic* from the module's bus client."""
        assert self.module is not None
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.module.publish(topic, wrap(ApiEvent(topic=topic, body=raw), source="module"))

    async def subscribed_on_bus(self, prefix: str) -> None:
        """Wait until the gateway's subscription to *prefix* reached the broker."""
        assert self.bus is not None
        await self.bus.wait_subscribed([prefix], timeout=5.0)

    def write_ports(self) -> Path:
        ports: dict[str, Any] = {"http": {"host": "127.0.0.1", "port": self.http_port}}
        if self.ipc is not None:
            ports["ipc"] = self.ipc.endpoints
        path = self.root / "ports.json"
        path.write_text(json.dumps(ports))
        return path

    @property
    def factory(self) -> GatewayWebSocketFactory:
        return self.ws_factory
