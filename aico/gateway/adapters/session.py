"""The session layer: what a lasting connection does, whatever its framing.

A WebSocket (:mod:`~aico.gateway.adapters.websocket`, and WSS on the ``tls`` listener)
and an IPC peer (:mod:`~aico.gateway.adapters.ipc`) each own one :class:`Session`. The
adapters only decode and encode their frames; everything else happens here, once:

* **building a request** from a frame (:meth:`Session.build_request`): method and path
  checks, path and query split, header filtering, the socket's token, request IDs;
* **fair share** (:meth:`Session.dispatch`): at most ``limits.max_inflight`` requests of
  one connection in flight. Past it a WebSocket stops being read (its transport's
  ``pauseProducing``) until answers go out, and the frames already read wait in order;
  an IPC peer, whose ROUTER socket is shared by every peer, has a small bounded queue
  (``limits.inflight_queue``) and past it a request is refused at once with 429. One
  client pipelining thousands of frames never delays another client's requests;
* **authentication, subscribing and unsubscribing** (:meth:`Session.authenticate`,
  :meth:`Session.subscribe`, :meth:`Session.unsubscribe`) as control requests through
  the same dispatcher and security chain as requests (authentication, topic
  authorization and rate limiting; a refused token is charged to the rate limiter the
  same way on every transport), with the same error conversion and access log;
* **relaying a streamed response** (:func:`relay_stream`).

Errors become problem objects in one place (the dispatcher's ``convert``, through
:func:`~aico.gateway.errors.to_api_error`): an unexpected error is a 500 on every
transport.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from aico.gateway.config import LimitsSection
from aico.gateway.connections import ConnectionManager, IConnection
from aico.gateway.errors import BadRequest, Forbidden, RateLimited
from aico.gateway.lifecycle import InFlight
from aico.gateway.routing.dispatch import Dispatcher
from aico.gateway.routing.messages import (
    Principal,
    Request,
    Response,
    Step,
    json_response,
    request_id_from,
)
from aico.gateway.routing.table import RouteEntry
from aico.gateway.security.tokens import MAX_TOKEN_BYTES
from aico.gateway.security.topics import MAX_TOPIC_LENGTH

__all__ = [
    "MAX_AUTH_REFUSALS",
    "MAX_PATH",
    "MAX_SUBSCRIPTIONS",
    "MAX_TOKEN_BYTES",
    "Session",
    "SessionServices",
    "relay_stream",
]

#: Subscriptions one connection may hold.
MAX_SUBSCRIPTIONS = 64
#: Refused tokens one connection may present before it is closed: each costs a signature
#: check, so a connection is no free oracle or CPU sink.
MAX_AUTH_REFUSALS = 5
#: Longest request path accepted in a frame.
MAX_PATH = 2048
#: Request headers a frame may not set (the session supplies them).
_SESSION_HEADERS = frozenset({"authorization", "cookie", "host"})
#: Refusals that mean "this token is no good" (they count toward MAX_AUTH_REFUSALS).
TOKEN_REFUSALS = frozenset({"token_invalid", "token_expired", "token_revoked", "unauthenticated"})


class SessionChain(Protocol):
    """The chain steps of the session's control requests (:class:`SecurityChain`)."""

    def token_steps(self) -> list[Step]: ...

    def subscription_steps(self) -> list[Step]: ...

    def unsubscription_steps(self) -> list[Step]: ...


class SessionTransport(Protocol):
    """What the session asks of its adapter."""

    def pause_reading(self) -> None:
        """Stop reading requests from the peer (fair share)."""

    def resume_reading(self) -> None:
        """Read requests again."""


@dataclass
class SessionServices:
    """What every session of one gateway shares (built once by the composition root)."""

    dispatcher: Dispatcher
    chain: SessionChain
    connections: ConnectionManager
    inflight: InFlight
    limits: Callable[[], LimitsSection]
    clock: IReactorTime

    def __post_init__(self) -> None:
        # Control routes: not in the route table; the session runs them through the chain.
        self.auth_route = RouteEntry("POST", "/.session/auth", _authenticated, owner="session",
                                     capability="session", tier="standard")
        self.subscribe_route = RouteEntry("POST", "/.session/subscribe", self._subscribe,
                                          owner="session", capability="session")
        self.unsubscribe_route = RouteEntry("POST", "/.session/unsubscribe", self._unsubscribe,
                                            owner="session", public=True)
        self.auth_steps = self.chain.token_steps()
        self.subscribe_steps = self.chain.subscription_steps()
        self.unsubscribe_steps = self.chain.unsubscription_steps()

    # -- control handlers (shared by every session) ------------------------------------

    def _subscribe(self, request: Request) -> Response | Deferred[Response]:
        conn = self.connections.get(request.connection_id)
        principal = request.principal
        if conn is None or principal is None:
            raise BadRequest("the connection is closed")
        topic = request.path
        info = conn.info
        current = info.principal
        if info.subscriptions and current is not None and current.subject != principal.subject:
            raise Forbidden("a connection cannot change its subject while subscribed")
        if topic not in info.subscriptions and len(info.subscriptions) >= MAX_SUBSCRIPTIONS:
            raise BadRequest(f"at most {MAX_SUBSCRIPTIONS} subscriptions per connection")
        if current is None or current.token_id != principal.token_id:
            self.connections.authenticated(conn, principal)
        self.connections.subscribe(conn, topic)
        answer = json_response({"topic": topic, "subscribed": True})
        ready = self.connections.ready(topic)
        if ready is None:
            return answer
        return ready.addCallback(lambda _: answer)

    def _unsubscribe(self, request: Request) -> Response:
        conn = self.connections.get(request.connection_id)
        if conn is not None:
            self.connections.unsubscribe(conn, request.path)
        return json_response({"topic": request.path, "subscribed": False})


def _authenticated(request: Request) -> Response:
    return Response(status=200)


class Session:
    """One lasting connection's requests, subscriptions and fair share (module doc)."""

    log = Logger()

    def __init__(self, services: SessionServices, conn: IConnection, transport: SessionTransport,
                 *, name: str, peer_host: str, loopback: bool, queue_limit: int | None = None,
                 host: str = "") -> None:
        self.services = services
        self.conn = conn
        self.transport = transport
        #: The router's transport name (``websocket``, ``ipc``, ``ipc-tcp``, ``wss``…).
        self.name = name
        self.peer_host = peer_host
        self.loopback = loopback
        #: The upgrade request's ``Host`` (WebSocket), which every request inherits.
        self.host = host
        #: Requests that may wait behind ``max_inflight``: ``None`` waits without bound
        #: (the adapter stops reading, so the wait is bounded by what was already read).
        self.queue_limit = queue_limit
        self.in_flight = 0
        #: Largest number of requests ever in flight at once (tests, metrics).
        self.max_in_flight_seen = 0
        self.refusals = 0
        # A list, not a deque: an empty deque costs 624 bytes on every idle connection;
        # at most ``queue_limit`` requests wait here.
        self._waiting: list[tuple[Request, Callable[[Response], Any]]] = []
        self._paused = False
        self.closed = False

    # -- requests ----------------------------------------------------------------------

    def build_request(self, method: str, path: str, *, headers: Mapping[str, str] | None = None,
                      query: Mapping[str, str] | None = None, body: bytes = b"",
                      token: str | None = None, request_id: str | None = None,
                      accepts_stream: bool | None = None) -> Request:
        """A router request from a frame's fields; raises ``BadRequest`` for a bad one.

        *token* is the connection's own (a WebSocket's); without it, the frame's own
        ``authorization`` header is kept (IPC carries its token in every request).
        """
        method = method.upper()
        if not method or len(method) > 16 or not method.isalpha():
            raise BadRequest("a request needs a method")
        query = dict(query or {})
        if "?" in path:
            path, _, qs = path.partition("?")
            query = {**dict(parse_qsl(qs, keep_blank_values=True)), **query}
        if not path.startswith("/") or len(path) > MAX_PATH:
            raise BadRequest("a request path starts with '/'")
        out: dict[str, str] = {}
        for name, value in (headers or {}).items():
            lower = name.lower()
            if lower in _SESSION_HEADERS and not (lower == "authorization" and token is None):
                continue
            out[lower] = value
        if self.host:
            out["host"] = self.host
        if token:
            out["authorization"] = "Bearer " + token
        if body and "content-type" not in out:
            out["content-type"] = "application/json"
        info = self.conn.info
        return Request(
            method=method,
            path=path,
            request_id=request_id_from(request_id or out.get("x-request-id")),
            transport=self.name,
            peer_host=self.peer_host,
            loopback=self.loopback,
            headers=out,
            query=query,
            body=body,
            accepts_stream=(query.get("stream") == "true") if accepts_stream is None
            else accepts_stream,
            device_id=info.device_id,
            connection_id=info.id,
            started=self.services.clock.seconds(),
        )

    def dispatch(self, request: Request, respond: Callable[[Response], Any]) -> bool:
        """Answer *request* through the dispatcher and hand the response to *respond*
        (which may return a Deferred: a streamed answer counts as in flight until it
        ends). False when the request was neither started nor queued (an IPC peer's
        queue is full: answer 429 with :meth:`overloaded`)."""
        if self.in_flight < self.services.limits().max_inflight:
            self._start(request, respond)
            return True
        if self.queue_limit is not None and len(self._waiting) >= self.queue_limit:
            return False
        self._waiting.append((request, respond))
        if not self._paused:
            self._paused = True
            self.transport.pause_reading()
        return True

    def overloaded(self) -> RateLimited:
        limits = self.services.limits()
        return RateLimited(
            f"at most {limits.max_inflight} requests in flight and {limits.inflight_queue} "
            "waiting per connection; retry when answers have come back",
            headers={"Retry-After": "1"})

    def _start(self, request: Request, respond: Callable[[Response], Any]) -> None:
        services = self.services
        self.in_flight += 1
        if self.in_flight > self.max_in_flight_seen:
            self.max_in_flight_seen = self.in_flight
        services.inflight.enter()
        # One callback for answer and bookkeeping (the dispatcher's Deferred never fails;
        # respond may return a Deferred: a streamed answer is in flight until it ends).
        out = services.dispatcher.handle_now(request)
        if isinstance(out, Deferred):
            out.addBoth(self._answer, request, respond)
        else:
            self._answer(out, request, respond)

    def _answer(self, response: Response | Failure, request: Request,
                respond: Callable[[Response], Any]) -> None:
        if isinstance(response, Failure):
            self._respond_failed(response, request)
            self._done(None)
            return
        try:
            out = respond(response)
        except Exception:
            self._respond_failed(Failure(), request)
            self._done(None)
            return
        if isinstance(out, Deferred):
            out.addErrback(self._respond_failed, request).addBoth(self._done)
            return
        self._done(None)

    def _respond_failed(self, failure: Failure, request: Request) -> None:
        self.log.failure("{transport} {id}: answering request {request_id} failed", failure,
                         transport=self.name, id=self.conn.info.id, request_id=request.request_id)

    def _done(self, _: object) -> None:
        self.in_flight -= 1
        self.services.inflight.leave()
        if self.closed:
            self._waiting.clear()
            return
        limit = self.services.limits().max_inflight
        while self._waiting and self.in_flight < limit:
            request, respond = self._waiting.pop(0)
            self._start(request, respond)
        if self._paused and not self._waiting:
            self._paused = False
            self.transport.resume_reading()

    # -- control requests --------------------------------------------------------------

    def _control(self, method: str, path: str, authorization: str | None, route: RouteEntry,
                 steps: Any, request_id: str | None) -> tuple[Request, Deferred[Response]]:
        headers = {"authorization": authorization} if authorization else {}
        info = self.conn.info
        request = Request(method=method, path=path, request_id=request_id_from(request_id),
                          transport=self.name, peer_host=self.peer_host, loopback=self.loopback,
                          headers=headers, device_id=info.device_id, connection_id=info.id,
                          started=self.services.clock.seconds())
        return request, self.services.dispatcher.handle_control(request, route, steps)

    def authenticate(self, token: str,
                     request_id: str | None = None) -> Deferred[tuple[Principal | None, Response]]:
        """Check *token* through the chain: ``(principal, response)``; the principal is
        ``None`` when refused (the response is then the problem; the adapter answers,
        then calls :meth:`refused`)."""
        if len(token) > MAX_TOKEN_BYTES:
            token = token[: MAX_TOKEN_BYTES + 1]  # the chain refuses it without parsing
        # Without the connection's ID: a refused token is charged to the peer's address
        # (or its device), as a bad token on REST is, so a new connection is no fresh
        # budget for presenting tokens.
        request = Request(method="AUTH", path="/.session/auth",
                          request_id=request_id_from(request_id), transport=self.name,
                          peer_host=self.peer_host, loopback=self.loopback,
                          headers={"authorization": "Bearer " + token},
                          device_id=self.conn.info.device_id,
                          started=self.services.clock.seconds())
        d = self.services.dispatcher.handle_control(request, self.services.auth_route,
                                                    self.services.auth_steps)

        def done(response: Response) -> tuple[Principal | None, Response]:
            if response.status == 200 and request.principal is not None:
                return request.principal, response
            return None, response

        return d.addCallback(done)

    def subscribe(self, topic: str, authorization: str | None,
                  request_id: str | None = None) -> Deferred[Response]:
        """Subscribe to *topic* (authenticated by the ``Authorization`` value, authorized
        for the topic, rate-limited). The adapter sends the answer, then calls
        :meth:`refused` with it."""
        _, d = self._control("SUBSCRIBE", topic[: MAX_TOPIC_LENGTH + 1], authorization,
                             self.services.subscribe_route, self.services.subscribe_steps,
                             request_id)
        return d

    def unsubscribe(self, topic: str, authorization: str | None,
                    request_id: str | None = None) -> Deferred[Response]:
        """Drop the subscription to *topic* (rate-limited; a bad token is refused)."""
        _, d = self._control("UNSUBSCRIBE", topic[: MAX_TOPIC_LENGTH + 1], authorization,
                             self.services.unsubscribe_route, self.services.unsubscribe_steps,
                             request_id)
        return d

    def refused(self, response: Response) -> None:
        """Count *response* if it refused a token (adapters call this after answering);
        past :data:`MAX_AUTH_REFUSALS` refused tokens the connection is closed."""
        if response.status != 401 or problem_code(response) not in TOKEN_REFUSALS:
            return
        self.refusals += 1
        if self.refusals >= MAX_AUTH_REFUSALS and not self.closed:
            self.conn.close(CLOSE_POLICY, "too many refused tokens")

    def close(self) -> None:
        """The connection ended: queued requests are dropped."""
        self.closed = True
        self._waiting.clear()


#: Close code when a connection presented too many refused tokens (RFC 6455 1008).
CLOSE_POLICY = 1008


def problem_code(response: Response) -> str:
    """The ``code`` of a problem response ("" for anything else)."""
    if response.status < 400 or not response.body:
        return ""
    try:
        value = json.loads(response.body)
    except ValueError:
        return ""
    code = value.get("code") if isinstance(value, dict) else None
    return code if isinstance(code, str) else ""


def problem_of(response: Response) -> dict[str, Any]:
    """A problem response's body as an object (for error frames)."""
    value = json.loads(response.body)
    if not isinstance(value, dict):
        raise ValueError("not a problem object")
    return value


def relay_stream(response: Response, on_chunk: Callable[[bytes], None],
                 on_end: Callable[[], None], on_broken: Callable[[Failure], None]) -> Deferred[None]:
    """Relay a streamed response: each chunk (without its trailing newline), then the
    end, or the failure that broke it off. Fires once the stream is over."""
    stream = response.stream
    assert stream is not None

    def chunk(data: bytes) -> None:
        on_chunk(data.rstrip(b"\n"))

    def ended(_: object) -> None:
        on_end()

    def broke(failure: Failure) -> None:
        on_broken(failure)

    return stream.subscribe(chunk).addCallbacks(ended, broke)


def frame_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Response headers as every response frame carries them (IPC ``ApiResponse``,
    WebSocket ``response``, JSON and protobuf): names in lower case, one rule on every
    transport (``ratelimit``, ``retry-after``; HTTP keeps its own spelling)."""
    return {name.lower(): value for name, value in headers.items()}
