"""The module SDK: write a backend module in a few lines.

::

    class Echo(BackendModule):
        name = "echo"
        version = "1.0.0"
        health_topic = "echo/health/v1"

        @route("POST", "/api/v1/echo", topic="echo/say/v1", capability="echo:write",
               request_schema={"type": "object", "properties": {"text": {"type": "string"}},
                               "required": ["text"], "additionalProperties": False})
        async def say(self, request: ApiRequest, ctx: RequestContext) -> Response:
            return Response(200, {"echo": ctx.json()["text"]})

    module = Echo(bus, reactor)
    await module.start()      # subscribes, starts the bus, registers, heartbeats

The SDK subscribes to every route topic, the health topic and
``system/module/discover/v1`` (answered by registering again), publishes the
``ModuleRegistration``, heartbeats every ``heartbeat_interval`` seconds on the injected
clock (or leaves :meth:`BackendModule.beat` to a host that schedules it, with
``start(heartbeat=False)``) and replies on each request's ``reply_to`` with its ``correlation_id``. A handler
exception becomes a 500 ``application/problem+json`` reply (logged with its traceback,
never leaked); :class:`ProblemError` gives any other status and code.
"""

from __future__ import annotations

import http
import inspect
import json
import os
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, cast

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from aico import fastjson
from aico.bus.errors import BusError, BusTimeout
from aico.bus.interfaces import (
    ATTR_CORRELATION_ID,
    ATTR_REPLY_TO,
    ATTR_STREAM,
    TOPIC_DISCOVER,
    TOPIC_HEARTBEAT,
    TOPIC_REGISTERED,
    IBusControl,
    IMessageBus,
)
from aico.proto import (
    AicoMessage,
    ApiRequest,
    ApiResponse,
    EnvelopeError,
    ModuleHeartbeat,
    ModuleRegistration,
    Route,
    unpack,
    wrap,
)

JSON_TYPE = "application/json"
PROBLEM_TYPE = "application/problem+json"


def _json_bytes(value: Any) -> bytes:
    return fastjson.dumps(value)


@dataclass(frozen=True)
class RouteSpec:
    """One HTTP route a module serves, as registered with the gateway."""

    method: str
    path: str
    topic: str
    capability: str = ""
    public: bool = False
    request_schema: dict[str, Any] | None = None
    response_schema: dict[str, Any] | None = None
    #: An admin route (served under ``/admin/api/modules/NAME/…``).
    admin: bool = False

    def to_proto(self) -> Route:
        """The ``Route`` message, with the schemas as JSON text."""
        return Route(
            method=self.method.upper(),
            path=self.path,
            topic=self.topic,
            capability=self.capability,
            public=self.public,
            request_schema=json.dumps(self.request_schema) if self.request_schema else "",
            response_schema=json.dumps(self.response_schema) if self.response_schema else "",
        )


@dataclass(frozen=True)
class Response:
    """A handler's answer: *body* is JSON-able (or ``bytes``, sent as they are)."""

    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def to_proto(self, request_id: str) -> ApiResponse:
        headers = {k.lower(): v for k, v in self.headers.items()}
        if isinstance(self.body, bytes):
            body = self.body
        elif self.body is None:
            body = b""
        else:
            body = _json_bytes(self.body)
            headers.setdefault("content-type", JSON_TYPE)
        return ApiResponse(request_id=request_id, status=self.status, headers=headers, body=body)


class ProblemError(Exception):
    """Raise in a handler to answer with an RFC 9457 problem (``code`` from docs/rest.md § Errors)."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        title: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title
        self.extra = dict(extra or {})

    def problem(self, request_id: str = "") -> dict[str, Any]:
        """The problem+json object."""
        try:
            phrase = http.HTTPStatus(self.status).phrase
        except ValueError:
            phrase = "Error"
        body: dict[str, Any] = {
            "type": "about:blank",
            "title": self.title or phrase,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if request_id:
            body["request_id"] = request_id
        body.update(self.extra)
        return body

    def response(self, request_id: str = "") -> Response:
        return Response(self.status, self.problem(request_id), {"content-type": PROBLEM_TYPE})


def internal_error() -> ProblemError:
    """The 500 problem a failing handler answers with (no internals in ``detail``)."""
    return ProblemError(500, "internal_error", "The module failed to handle the request.")


HandlerResult = Union[Response, ApiResponse, Mapping[str, Any], list[Any], None]  # noqa: UP007
Handler = Callable[
    ["ApiRequest", "RequestContext"], Union[Awaitable[HandlerResult], HandlerResult]  # noqa: UP007
]
F = TypeVar("F", bound=Callable[..., Any])


def route(
    method: str,
    path: str,
    topic: str,
    *,
    capability: str = "",
    public: bool = False,
    request_schema: dict[str, Any] | None = None,
    response_schema: dict[str, Any] | None = None,
    admin: bool = False,
) -> Callable[[F], F]:
    """Mark a ``BackendModule`` method ``(self, request, ctx)`` as the handler of a route."""
    spec = RouteSpec(method, path, topic, capability, public, request_schema, response_schema, admin)

    def mark(fn: F) -> F:
        fn.__aico_route__ = spec  # type: ignore[attr-defined]
        return fn

    return mark


class RequestContext:
    """What a handler knows besides the request: streaming, and how to send chunks."""

    def __init__(self, module: BackendModule, message: AicoMessage | None, request: ApiRequest,
                 sink: Callable[[ApiResponse], None] | None = None) -> None:
        self.module = module
        self._message = message
        self.request = request
        #: True when the caller accepts a streamed reply (``stream=1`` on the request).
        self.streaming = (message is not None
                          and message.metadata.attributes.get(ATTR_STREAM) == "1")
        self.chunks_sent = 0
        self.stream_status = 200
        self.finished = False
        #: Where a direct call's one answer goes (:meth:`BackendModule.call_direct`);
        #: ``None``: answers are replies on the bus.
        self._sink = sink

    @property
    def message(self) -> AicoMessage:
        """The request's envelope (for a direct call, made on first use: such a call
        carries the ``ApiRequest`` alone)."""
        if self._message is None:
            self._message = wrap(self.request, "gateway",
                                 attributes={"request_id": self.request.request_id})
        return self._message

    def _answer(self, response: ApiResponse, stream: str = "") -> None:
        if self._sink is not None:
            self._sink(response)
        else:
            self.module._reply_safely(self.message, response, stream)

    @property
    def clock(self) -> IReactorTime:
        return self.module.clock

    def json(self) -> Any:
        """The request body parsed as JSON (``ProblemError`` 400 ``malformed_json`` if not)."""
        try:
            return fastjson.loads(self.request.body or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise ProblemError(400, "malformed_json", "The request body is not valid JSON.") from e

    def send_chunk(self, value: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        """Send one JSON object as a ``stream=chunk`` reply (status/headers: first only)."""
        if not self.streaming:
            raise RuntimeError("the caller did not accept a streamed reply")
        if self.finished:
            raise RuntimeError("the reply was already sent")
        if self.chunks_sent == 0:
            self.stream_status = status
            response = Response(status, value, headers or {})
        else:
            response = Response(self.stream_status, value)
        self.module._send_reply(self.message, response.to_proto(self.request.request_id), "chunk")
        self.chunks_sent += 1


class BackendModule:
    """Base class of a backend module: subclass, set the class attributes, add routes."""

    log = Logger()

    #: The module's name (unique on the bus).
    name: str = ""
    version: str = "0.0.0"
    #: Seconds between heartbeats; the gateway drops the module after three missed ones.
    heartbeat_interval: float = 5.0
    #: Where the gateway sends ``GET /health`` (empty: no health answers).
    health_topic: str = ""

    def __init__(self, bus: IMessageBus, clock: IReactorTime) -> None:
        if not self.name:
            raise ValueError(f"{type(self).__name__} has no name")
        self.bus = bus
        self.clock = clock
        self.started_at = clock.seconds()
        self._routes: list[tuple[RouteSpec, Handler]] = []
        self._topics: dict[str, list[tuple[RouteSpec, Handler]]] = {}
        self._heartbeat: LoopingCall | None = None
        self._running = False
        self._subscribed = False
        self._owns_bus = True
        for spec, handler in self._declared_routes():
            self.add_route(spec, handler)

    def _declared_routes(self) -> list[tuple[RouteSpec, Handler]]:
        found: list[tuple[RouteSpec, Handler]] = []
        seen: set[str] = set()
        for klass in type(self).__mro__:
            for attr, value in vars(klass).items():
                spec = getattr(value, "__aico_route__", None)
                if isinstance(spec, RouteSpec) and attr not in seen:
                    seen.add(attr)
                    found.append((spec, getattr(self, attr)))
        return found

    # -- declaration -------------------------------------------------------------------

    def add_route(self, spec: RouteSpec, handler: Handler) -> None:
        """Serve *spec* with ``handler(request, ctx)`` (before ``start()``)."""
        if self._running:
            raise RuntimeError("add routes before start()")
        self._routes.append((spec, handler))
        # A route may name several topics (the gateway fans a request out to each): the
        # module answers on every one of them.
        for topic in (t.strip() for t in spec.topic.split(",")):
            if topic:
                self._topics.setdefault(topic, []).append((spec, handler))

    @property
    def routes(self) -> list[RouteSpec]:
        return [spec for spec, _ in self._routes]

    def registration(self) -> ModuleRegistration:
        """The ``ModuleRegistration`` this module publishes."""
        return ModuleRegistration(
            name=self.name,
            version=self.version,
            routes=[spec.to_proto() for spec, _ in self._routes if not spec.admin],
            admin_routes=[spec.to_proto() for spec, _ in self._routes if spec.admin],
            heartbeat_interval_ms=round(self.heartbeat_interval * 1000),
            health_topic=self.health_topic,
        )

    async def health(self) -> Mapping[str, Any] | Response:
        """The answer to ``GET /health`` on the health topic; override to report more."""
        return {
            "status": "ok",
            "module": self.name,
            "version": self.version,
            "uptime_s": round(self.clock.seconds() - self.started_at, 3),
        }

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, start_bus: bool | None = None, *, heartbeat: bool = True) -> Deferred[None]:
        """Subscribe, start the bus, wait for the subscriptions, register, heartbeat.

        *start_bus*: ``None`` starts the bus unless it is a client that already runs
        (a bus shared with the gateway); the module stops the bus only if it started it.
        *heartbeat*: ``False`` leaves heartbeats to the host, which then calls
        :meth:`beat` every ``heartbeat_interval`` seconds itself (the registration still
        announces that interval).
        """
        return Deferred.fromCoroutine(self._start(start_bus, heartbeat))

    def _serve_locally(self, on: bool) -> None:
        """On a bus client that offers it (:meth:`BusClient.serve_locally`), requests
        this client itself sends to our request topics — the gateway's, when the module
        runs in its process — are handed to us in process, not through the broker."""
        method = getattr(self.bus, "serve_locally" if on else "stop_serving_locally", None)
        if method is not None:
            topics = list(self._topics)
            if self.health_topic:
                topics.append(self.health_topic)
            method(topics)

    def _serve_directly(self, on: bool) -> None:
        """On a bus client that offers it (:meth:`BusCore.serve_directly`), requests the
        gateway sharing this client makes on our route topics are direct calls of
        :meth:`call_direct`: no envelope, no reply message (docs/performance.md)."""
        method = getattr(self.bus, "serve_directly", None)
        if method is None:
            return
        for topic in self._topics:
            method(topic, self._direct_responder(topic) if on else None)

    def _direct_responder(self, topic: str) -> Callable[[ApiRequest], ApiResponse | Deferred[ApiResponse]]:
        return lambda request: self.call_direct(topic, request)

    def call_direct(self, topic: str, request: ApiRequest) -> ApiResponse | Deferred[ApiResponse]:
        """Answer *request* on *topic* in process, without the bus: the same handler,
        errors and answer as a request that came as a bus message, given back rather than
        sent (a caller that accepts a streamed reply uses the bus). The answer itself
        when the handler finished at once, else a Deferred of it."""
        answers: list[ApiResponse] = []
        waiting: list[Deferred[ApiResponse]] = []

        def sink(response: ApiResponse) -> None:
            if waiting:
                waiting[0].callback(response)
            else:
                answers.append(response)

        self._handle(RequestContext(self, None, request, sink),
                     lambda r: self._select(topic, r))
        if answers:
            return answers[0]
        d: Deferred[ApiResponse] = Deferred()
        waiting.append(d)
        return d

    def _topics_listened(self) -> list[str]:
        topics = list(self._topics)
        if self.health_topic:
            topics.append(self.health_topic)
        return [*topics, TOPIC_DISCOVER]

    async def _start(self, start_bus: bool | None, heartbeat: bool) -> None:
        if self._running:
            return
        control = cast(IBusControl, self.bus) if IBusControl.providedBy(self.bus) else None
        if start_bus is None:
            start_bus = not (control is not None and control.running)
        for topic in self._topics:
            self.bus.subscribe(topic, self._on_request)
        if self.health_topic:
            self.bus.subscribe(self.health_topic, self._on_health)
        self.bus.subscribe(TOPIC_DISCOVER, self._on_discover)
        self._subscribed = True
        self._owns_bus = start_bus
        if start_bus:
            await self.bus.start()
        if control is not None:
            # Register only once requests on our topics can reach us.
            try:
                await control.wait_subscribed(self._topics_listened())
            except BusTimeout:
                self.log.warn("module {name}: subscriptions not confirmed in time", name=self.name)
        self._serve_locally(True)
        self._serve_directly(True)
        self._running = True
        self.register()
        if heartbeat and self.heartbeat_interval > 0:
            loop = LoopingCall(self.beat)
            loop.clock = self.clock
            loop.start(self.heartbeat_interval, now=False)
            self._heartbeat = loop
        self.log.info(
            "module {name} {version} started with {count} routes",
            name=self.name,
            version=self.version,
            count=len(self._routes),
        )

    def stop(self) -> Deferred[None]:
        """Stop heartbeating, unsubscribe and (if ``start()`` started it) stop the bus."""
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._heartbeat = None
        was_running, self._running = self._running, False
        if self._subscribed:
            self._subscribed = False
            self._serve_locally(False)
            self._serve_directly(False)
            for topic in self._topics:
                self.bus.unsubscribe(topic, self._on_request)
            if self.health_topic:
                self.bus.unsubscribe(self.health_topic, self._on_health)
            self.bus.unsubscribe(TOPIC_DISCOVER, self._on_discover)
        if was_running and self._owns_bus:
            return self.bus.stop()
        return succeed(None)

    def register(self) -> None:
        """Publish the registration (again)."""
        self.bus.publish(TOPIC_REGISTERED, wrap(self.registration(), self.name))

    def beat(self) -> bool:
        """Publish one heartbeat if the module runs; True if it went out.

        It never raises, so a heartbeat loop (the module's own, or a host's periodic job)
        never dies: a bus error is logged as a warning, anything else with its traceback.
        """
        if not self._running:
            return False
        try:
            self.bus.publish(TOPIC_HEARTBEAT, wrap(ModuleHeartbeat(name=self.name), self.name))
        except BusError:
            self.log.warn("module {name}: heartbeat not sent, the bus is down", name=self.name)
            return False
        except Exception:
            self.log.failure("module {name}: heartbeat failed", name=self.name)
            return False
        return True

    def _on_discover(self, topic: str, message: AicoMessage) -> None:
        if self._running:
            self.register()

    # -- requests ----------------------------------------------------------------------

    def _send_reply(self, request: AicoMessage, response: ApiResponse, stream: str = "") -> None:
        self.bus.reply(request, wrap(response, self.name), stream or None)

    def _reply_safely(self, request: AicoMessage, response: ApiResponse, stream: str = "") -> None:
        try:
            self._send_reply(request, response, stream)
        except BusError:
            self.log.warn("module {name}: reply not sent, the bus is down", name=self.name)

    def _on_health(self, topic: str, message: AicoMessage) -> None:
        self._dispatch(message, lambda request: self._answer_health)

    async def _answer_health(self, request: ApiRequest, ctx: RequestContext) -> HandlerResult:
        if request.method.upper() != "GET":
            raise ProblemError(405, "method_not_allowed", "The health topic answers GET only.")
        return await self.health()

    def _on_request(self, topic: str, message: AicoMessage) -> None:
        self._dispatch(message, lambda request: self._select(topic, request))

    def _select(self, topic: str, request: ApiRequest) -> Handler:
        candidates = self._topics.get(topic, [])
        for spec, handler in candidates:
            if spec.method.upper() == request.method.upper():
                return handler
        raise ProblemError(405, "method_not_allowed", f"{request.method} is not allowed on this route.")

    def _dispatch(self, message: AicoMessage, select: Callable[[ApiRequest], Handler]) -> None:
        attributes = message.metadata.attributes
        if not attributes.get(ATTR_REPLY_TO) or not attributes.get(ATTR_CORRELATION_ID):
            self.log.warn("module {name}: dropped a request without reply_to/correlation_id", name=self.name)
            return
        try:
            request = unpack(message, ApiRequest)
        except EnvelopeError as e:
            self.log.warn("module {name}: malformed request: {error}", name=self.name, error=str(e))
            problem = ProblemError(400, "bad_request", "The request is not an ApiRequest.")
            self._reply_safely(message, problem.response().to_proto(""))
            return
        self._handle(RequestContext(self, message, request), select)

    def _handle(self, ctx: RequestContext, select: Callable[[ApiRequest], Handler]) -> None:
        """Run the selected handler for *ctx*; its answer goes to ``ctx._answer``."""
        request = ctx.request
        d: Deferred[HandlerResult]
        try:
            result = select(request)(request, ctx)
            if isinstance(result, Deferred):
                d = result
            elif inspect.iscoroutine(result):
                # Run the handler's first step now: most finish without awaiting anything,
                # and then no Deferred is needed at all (docs/performance.md).
                try:
                    awaited = result.send(None)
                except StopIteration as done:
                    self._answer(ctx, done.value)
                    return
                d = Deferred.fromCoroutine(_resume(result, awaited))
            elif inspect.isawaitable(result):
                d = ensureDeferred(_await(result))
            else:
                self._answer(ctx, result)
                return
        except Exception as e:
            d = fail(e)
        d.addCallbacks(lambda result: self._answer(ctx, result),
                       lambda failure: self._answer_failure(ctx, failure))

    def _answer(self, ctx: RequestContext, result: HandlerResult) -> None:
        # A failure while turning the result into a reply (say, a body that is not
        # JSON-able) is answered like a handler failure.
        try:
            self._finish(ctx, result)
        except Exception:
            self._answer_failure(ctx, Failure())

    def _answer_failure(self, ctx: RequestContext, failure: Failure) -> None:
        try:
            self._fail(ctx, failure)
        except Exception:
            self.log.failure("module {name}: could not reply", name=self.name)

    def _finish(self, ctx: RequestContext, result: HandlerResult) -> None:
        request_id = ctx.request.request_id
        if isinstance(result, ApiResponse):
            response = result
            if not response.request_id:
                response.request_id = request_id
        elif isinstance(result, Response):
            response = result.to_proto(request_id)
        elif result is None:
            response = Response(200 if ctx.chunks_sent else 204).to_proto(request_id)
        else:
            response = Response(200, result).to_proto(request_id)
        if ctx.chunks_sent:
            if response.body:
                # A body returned after chunks is the last chunk.
                last = ApiResponse(request_id=request_id, status=ctx.stream_status)
                last.body = response.body
                ctx._answer(last, "chunk")
            end = ApiResponse(request_id=request_id, status=ctx.stream_status)
            ctx.finished = True
            ctx._answer(end, "end")
        else:
            ctx.finished = True
            ctx._answer(response)

    def _fail(self, ctx: RequestContext, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, ProblemError):
            problem = error
        else:
            self.log.failure(
                "module {name}: handler failed on {method} {path}",
                failure=failure,
                name=self.name,
                method=ctx.request.method,
                path=ctx.request.path,
            )
            problem = internal_error()
        response = problem.response(ctx.request.request_id).to_proto(ctx.request.request_id)
        ctx.finished = True
        # After chunks, the error rides on the end message (the caller already has 200).
        ctx._answer(response, "end" if ctx.chunks_sent else "")


async def _await(awaitable: Awaitable[HandlerResult]) -> HandlerResult:
    return await awaitable


@types.coroutine
def _resume(coro: Coroutine[Any, Any, HandlerResult],
            awaited: Any) -> Generator[Any, Any, HandlerResult]:
    """Drive on a handler coroutine that already ran to its first ``await`` (which gave
    *awaited*): every value and exception Twisted's coroutine runner sends in is passed
    on to *coro*, every object *coro* awaits is passed out — what ``yield from`` does for
    a coroutine that has not started."""
    while True:
        try:
            value = yield awaited
        except BaseException as e:  # thrown in by the runner: the awaited Deferred failed
            try:
                awaited = coro.throw(e)
            except StopIteration as done:
                return cast(HandlerResult, done.value)
        else:
            try:
                awaited = coro.send(value)
            except StopIteration as done:
                return cast(HandlerResult, done.value)


def uptime_payload(started_at: float, clock: IReactorTime) -> dict[str, Any]:
    """``{status: ok, uptime_s, pid}``: the health answer of a process-level module."""
    return {
        "status": "ok",
        "uptime_s": round(clock.seconds() - started_at, 3),
        "pid": os.getpid(),
    }


__all__ = [
    "BackendModule",
    "Handler",
    "HandlerResult",
    "ProblemError",
    "RequestContext",
    "Response",
    "RouteSpec",
    "internal_error",
    "route",
    "uptime_payload",
]
