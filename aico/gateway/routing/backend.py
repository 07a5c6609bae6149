"""Serving routes from backend modules over the message bus.

:class:`ModuleRoutes` keeps the route table in step with the module directory (a module
that registers is served at once; one whose heartbeats stop answers 503 until it
registers again); :class:`BusForwarder` turns a request into an ``ApiRequest`` on the
route's topic and the module's ``ApiResponse`` back into a response, streamed or not.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from aico.bus.core import DirectResponder
from aico.bus.errors import BusTimeout
from aico.bus.interfaces import IMessageBus
from aico.gateway.errors import BackendError, BackendUnavailable
from aico.gateway.routing.aggregator import fan_out
from aico.gateway.routing.messages import Request, Response, StreamBody, json_response
from aico.gateway.routing.table import RouteConflict, RouteEntry, RouteTable
from aico.proto import AicoMessage, ApiRequest, ApiResponse, EnvelopeError, unpack, wrap
from aico.proto import Route as RouteMsg

if TYPE_CHECKING:
    from aico.gateway.routing.dispatch import Dispatcher

_R = TypeVar("_R")

#: Request headers never forwarded to a module (credentials stay in the gateway).
_DROP_REQUEST_HEADERS = frozenset(
    {"authorization", "cookie", "proxy-authorization", "x-csrf-token", "connection", "host"}
)
#: Response headers a module may set.
_PASS_RESPONSE_HEADERS = frozenset(
    {"content-type", "cache-control", "etag", "last-modified", "location", "content-language"}
)


def to_api_request(request: Request) -> ApiRequest:
    """The bus form of a request (docs/bus.md)."""
    api = ApiRequest(
        request_id=request.request_id,
        method=request.method,
        path=request.path,
        body=request.body,
    )
    for name, value in request.headers.items():
        if name not in _DROP_REQUEST_HEADERS:
            api.headers[name] = value
    # A protobuf map's update() is MutableMapping's, in Python: skipped when empty.
    if request.path_params:
        api.path_params.update(request.path_params)
    if request.query:
        api.query.update(request.query)
    p = request.principal
    if p is not None:
        api.principal.subject = p.subject
        api.principal.roles.extend(p.roles)
        api.principal.device_id = p.device_id or request.device_id
    api.principal.transport = request.transport
    return api


def from_api_response(api: ApiResponse) -> Response:
    if api.status >= 500 or api.status < 100:
        raise BackendError(f"the backend module answered {api.status}")
    headers = {k: v for k, v in api.headers.items() if k.lower() in _PASS_RESPONSE_HEADERS}
    content_type = headers.pop("content-type", None) or headers.pop("Content-Type", None)
    return Response(
        status=api.status,
        body=api.body,
        headers=headers,
        content_type=content_type or "application/json",
    )


class BusForwarder:
    """Sends requests to backend modules and turns their replies into responses."""

    log = Logger()

    def __init__(
        self,
        bus: IMessageBus,
        is_served: Callable[[str], bool],
        timeout: Callable[[], float],
        clock: IReactorTime,
    ) -> None:
        self.bus = bus
        self.is_served = is_served
        self.timeout = timeout
        self.clock = clock
        #: Told ``(topic, seconds)`` when a module's reply (the first message of a stream)
        #: comes back: the bus round trip (metrics). ``None``: nothing is timed.
        self.on_round_trip: Callable[[str, float], None] | None = None
        #: The responder a module in this process offers for a topic, if the bus client
        #: has such offers (``BusCore.direct``).
        self._direct: Callable[[str], DirectResponder | None] | None = getattr(bus, "direct", None)

    def handler(self, topics: tuple[str, ...]) -> Callable[[Request], Deferred[Response] | Response]:
        """The handler of a route served from *topics* (several: fanned out)."""
        if len(topics) == 1:
            topic = topics[0]
            return lambda request: self.forward(request, topic)
        return lambda request: self.fan_out(request, topics)

    def _message(self, request: Request) -> AicoMessage:
        return wrap(to_api_request(request), source="gateway",
                    attributes={"request_id": request.request_id})

    def forward(self, request: Request, topic: str) -> Deferred[Response] | Response:
        if not self.is_served(topic):
            raise BackendUnavailable("no backend module serves this route right now")
        if not request.accepts_stream and self._direct is not None:
            responder = self._direct(topic)
            if responder is not None:
                return self._call_direct(responder, request, topic)
        message = self._message(request)
        if not request.accepts_stream:
            d = self.bus.request(topic, message, timeout=self.timeout())
            if self.on_round_trip is not None:
                d.addCallback(self._timed, topic, self.clock.seconds())
            return d.addCallback(lambda reply: from_api_response(unpack_reply(reply)))
        return self._forward_streaming(topic, message)

    def _call_direct(self, responder: DirectResponder, request: Request,
                     topic: str) -> Deferred[Response] | Response:
        """A module in this process answers *request* by a call (``BusCore.serve_directly``):
        the same ``ApiRequest`` and ``ApiResponse`` as over the bus, without the envelopes;
        the same timeout when it does not answer at once."""
        sent = self.clock.seconds()
        answer = responder(to_api_request(request))
        if isinstance(answer, ApiResponse):
            self._timed(answer, topic, sent)
            return from_api_response(answer)
        timeout = self.timeout()

        def expired(value: object, seconds: float) -> ApiResponse:
            raise BusTimeout(topic, timeout)

        answer.addTimeout(timeout, self.clock, onTimeoutCancel=expired)
        return answer.addCallback(self._timed, topic, sent).addCallback(from_api_response)

    def _timed(self, reply: _R, topic: str, sent: float) -> _R:
        if self.on_round_trip is not None:
            try:
                self.on_round_trip(topic, self.clock.seconds() - sent)
            except Exception:
                self.log.failure("round-trip observer failed")
        return reply

    def _forward_streaming(self, topic: str, message: AicoMessage) -> Deferred[Response]:
        result: Deferred[Response] = Deferred()
        stream = StreamBody()
        sent = self.clock.seconds()

        def on_chunk(chunk: AicoMessage) -> None:
            api = unpack_reply(chunk)
            if not result.called:
                self._timed(chunk, topic, sent)
                response = from_api_response(api)
                response.stream = stream
                response.content_type = "application/x-ndjson"
                response.body = b""
                result.callback(response)
            stream.push(api.body)

        def on_end(reply: AicoMessage) -> None:
            api = unpack_reply(reply)
            if not result.called:
                self._timed(reply, topic, sent)
                # The module chose to answer in one piece.
                result.callback(from_api_response(api))
                return
            if api.body:
                stream.push(api.body)
            stream.finish()

        def on_error(failure: Any) -> None:
            if not result.called:
                result.errback(failure)
            else:
                self.log.warn("streamed reply on {topic} broke off: {error}",
                              topic=topic, error=failure.getErrorMessage())
                stream.fail(failure)

        d = self.bus.request(topic, message, timeout=self.timeout(), on_chunk=on_chunk)
        stream.on_cancel = d.cancel
        d.addCallbacks(on_end, on_error)
        return result

    def fan_out(self, request: Request, topics: tuple[str, ...]) -> Deferred[Response]:
        """A route that names several topics: ask each, answer with every part."""
        if not any(self.is_served(t) for t in topics):
            raise BackendUnavailable("no backend module serves this route right now")
        message = self._message(request)

        def call(topic: str) -> Callable[[], Deferred[Any]]:
            def go() -> Deferred[Any]:
                m = AicoMessage()
                m.CopyFrom(message)
                d = self.bus.request(topic, m, timeout=self.timeout())
                return d.addCallback(self._timed, topic, self.clock.seconds()).addCallback(
                    lambda reply: _json_or_text(from_api_response(unpack_reply(reply)).body)
                )
            return go

        d = fan_out(self.clock, {t: call(t) for t in topics}, self.timeout())

        def combine(parts: Mapping[str, Any]) -> Response:
            body = {
                "parts": {
                    name: ({"status": "ok", "body": p.value} if p.status == "ok"
                           else {"status": p.status, "error": p.error})
                    for name, p in parts.items()
                },
                "partial": sorted(n for n, p in parts.items() if p.status != "ok"),
            }
            if all(p.status != "ok" for p in parts.values()):
                raise BackendUnavailable("no backend answered")
            return json_response(body)

        return d.addCallback(combine)


def unpack_reply(message: AicoMessage) -> ApiResponse:
    try:
        return unpack(message, ApiResponse)
    except EnvelopeError as e:
        raise BackendError("the backend module sent a malformed reply") from e


def _json_or_text(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return body.decode("utf-8", "replace")


def entries_from_registration(
    module: str,
    routes: list[RouteMsg],
    forwarder: BusForwarder,
    prefix: str = "",
) -> list[RouteEntry]:
    """Route entries for a module's registered routes; bad ones raise ``ValueError``."""
    entries = []
    for r in routes:
        topics = tuple(t.strip() for t in r.topic.split(",") if t.strip())
        if not topics:
            raise ValueError(f"{r.method} {r.path}: route has no topic")
        entries.append(
            RouteEntry(
                method=r.method.upper(),
                path=prefix + r.path,
                handler=forwarder.handler(topics),
                owner=module,
                capability=r.capability,
                public=r.public,
                tier="public" if r.public else "standard",
                request_schema=_schema(r.request_schema, r, "request_schema"),
                response_schema=_schema(r.response_schema, r, "response_schema"),
                topics=topics,
                summary=f"Served by module {module}",
                streaming=True,
            )
        )
    return entries


#: Paths under this prefix belong to the admin site.
ADMIN_PATH = "/admin/"


def admin_entries(module: str, routes: list[RouteMsg], forwarder: BusForwarder) -> list[RouteEntry]:
    """Route entries for a module's admin routes, served by the admin site under
    ``/admin/api/modules/MODULE/…``: never public, always an ``admin:`` capability (the
    route's own when it names one, else ``admin:modules``), on the ``admin`` tier."""
    base = f"/admin/api/modules/{module}"
    entries = []
    for r in routes:
        path = r.path[len(ADMIN_PATH) - 1:] if r.path.startswith(ADMIN_PATH) else r.path
        if not path.startswith("/"):
            path = "/" + path
        cap = r.capability if r.capability.startswith("admin:") else "admin:modules"
        route = RouteMsg()
        route.CopyFrom(r)
        route.capability, route.public = cap, False
        entry = entries_from_registration(module, [route], forwarder)[0]
        entries.append(RouteEntry(
            method=entry.method, path=base + path, handler=entry.handler, owner=module,
            capability=cap, public=False, tier="admin", request_schema=entry.request_schema,
            response_schema=entry.response_schema, topics=entry.topics,
            summary=f"Admin route of module {module}", streaming=True))
    return entries


class ModuleRoutes:
    """Keeps the dispatcher's route table in step with the module directory.

    A module that registers is served at once (its routes validated and merged with the
    gateway's own, the table swapped whole); the set of topics that live modules serve is
    recomputed on every registration and drop, so the forwarder's check on the hot path
    is one set lookup. A module serving one of the gateway's own domain routes (same
    method, path and topic) serves it under the gateway's contract: no second route.
    """

    log = Logger()

    def __init__(self, directory: ModuleDirectoryView, dispatcher: Dispatcher,
                 own_routes: list[RouteEntry],
                 prepare: Callable[[list[RouteEntry]], list[RouteEntry]]) -> None:
        self.directory = directory
        self.dispatcher = dispatcher
        self.own_routes = own_routes
        self.prepare = prepare
        self.forwarder: BusForwarder | None = None
        self._served_topics: frozenset[str] = frozenset()
        #: Modules an operator disabled (``POST /admin/api/modules/{name}/disable``):
        #: their routes answer 503 ``backend_unavailable`` until enabled again.
        self.disabled: set[str] = set()
        #: Each module's admin routes, as the admin site serves them
        #: (``/admin/api/modules/NAME/…``); never in the dispatcher's table.
        self.admin_entries: dict[str, list[RouteEntry]] = {}
        #: Told when :attr:`admin_entries` changed (the admin site rebuilds its table).
        self.on_admin_routes: Callable[[], None] | None = None

    def attach(self, forwarder: BusForwarder) -> None:
        """Serve module routes through *forwarder*; start following the directory."""
        self.forwarder = forwarder
        self.dispatcher.set_table(RouteTable(self.own_routes))
        self.directory.add_observer(self.on_module)

    def served(self, topic: str) -> bool:
        """Whether a live module serves *topic* (one of its routes names it)."""
        return topic in self._served_topics

    def _recompute(self) -> None:
        self._served_topics = frozenset(
            t.strip()
            for module in self.directory.modules.values()
            if module.alive and module.name not in self.disabled
            for r in [*module.registration.routes, *module.registration.admin_routes]
            for t in r.topic.split(",")
        )

    def disable(self, name: str) -> None:
        """Stop forwarding to module *name*: its routes answer 503 until :meth:`enable`."""
        self.disabled.add(name)
        self._recompute()

    def enable(self, name: str) -> None:
        self.disabled.discard(name)
        self._recompute()

    def on_module(self, event: str, info: Any) -> None:
        self._recompute()
        if event != "registered" or self.forwarder is None:
            return
        own = {(e.method, e.path): e for e in self.own_routes}
        try:
            # A route whose path starts with /admin/ is an admin route too: served by
            # the admin site only, never on http or tls.
            public_routes = [r for r in info.registration.routes
                             if not r.path.startswith(ADMIN_PATH)]
            admin = admin_entries(info.name, [
                *info.registration.admin_routes,
                *(r for r in info.registration.routes if r.path.startswith(ADMIN_PATH))],
                self.forwarder)
            entries = entries_from_registration(info.name, public_routes, self.forwarder)
            entries = [e for e in entries
                       if not ((e.method, e.path) in own and own[(e.method, e.path)].topics == e.topics)]
            table = self.dispatcher.table.with_routes(info.name, self.prepare(entries))
        except (RouteConflict, ValueError) as e:
            self.log.error("routes of module {module} refused: {error}", module=info.name,
                           error=str(e))
            return
        self.dispatcher.set_table(table)
        self.admin_entries[info.name] = self.prepare(admin)
        if self.on_admin_routes is not None:
            self.on_admin_routes()
        self.log.info("module {module} {version} serves {count} route(s)", module=info.name,
                      version=info.version, count=len(entries))


class ModuleDirectoryView(Protocol):
    """What :class:`ModuleRoutes` reads of the module directory."""

    @property
    def modules(self) -> Mapping[str, Any]: ...

    def add_observer(self, observer: Callable[[str, Any], None]) -> None: ...


def _schema(text: str, route: RouteMsg, name: str) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{route.method} {route.path}: {name} is not JSON") from e
    if not isinstance(value, dict):
        raise ValueError(f"{route.method} {route.path}: {name} is not a JSON object")
    return value


__all__ = [
    "BusForwarder",
    "ModuleRoutes",
    "RouteConflict",
    "RouteTable",
    "admin_entries",
    "entries_from_registration",
    "from_api_response",
    "to_api_request",
]
