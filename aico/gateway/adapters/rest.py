"""The REST adapter: one ``twisted.web`` resource in front of the shared dispatcher.

Its resource (:class:`_Front`) takes every path: ``/ws`` goes to the WebSocket endpoint,
everything else to :class:`~aico.gateway.routing.dispatch.Dispatcher`; all routing,
security and error conversion happen there. This module only converts
between ``twisted.web`` requests and the router's :class:`Request`/:class:`Response`,
bounds what a request may make the gateway hold in memory (:class:`LimitedRequest`), and
writes streamed bodies chunk by chunk as they arrive.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from weakref import WeakSet

from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server as web_server
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.server import Request as WebRequest

from aico.gateway.errors import ApiError, BadRequest, Forbidden, PayloadTooLarge, problem_body
from aico.gateway.lifecycle import InFlight
from aico.gateway.routing.dispatch import Dispatcher, error_response
from aico.gateway.routing.messages import Request, Response, request_id_from
from aico.gateway.routing.table import RouteEntry
from aico.net import is_loopback

#: The ``Server`` field of every HTTP response (never the framework and its version).
SERVER = b"aico-gateway"


class RequestTimeout(ApiError):
    """The request body did not arrive within ``limits.body_timeout``."""

    status, code, title = 408, "request_timeout", "Request timeout"


class _Discard:
    """A body sink for a request that is already too large."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args: Any) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def read(self, *args: Any) -> bytes:
        return b""

    def close(self) -> None:
        pass


class _HttpDate:
    """``twisted.web.server``'s ``datetimeToString`` for the ``Date`` field of every
    response, formatted once per second instead of once per response (the same bytes:
    the format has no unit below the second)."""

    def __init__(self, original: Callable[..., bytes]) -> None:
        self.original = original
        self._second = -1
        self._text = b""

    def __call__(self, msSinceEpoch: float | None = None) -> bytes:
        if msSinceEpoch is not None:
            return self.original(msSinceEpoch)
        second = int(time.time())
        if second != self._second:
            self._text = self.original(second)
            self._second = second
        return self._text


def cache_http_date() -> None:
    """Install :class:`_HttpDate` in ``twisted.web.server`` (once; the gateway's sites
    call it)."""
    current = getattr(web_server, "datetimeToString")  # noqa: B009 - imported there, not exported
    if not isinstance(current, _HttpDate):
        setattr(web_server, "datetimeToString", _HttpDate(current))  # noqa: B010


class LimitedRequest(WebRequest):
    """A request that stops storing its body past the site's body limit."""

    too_large = False
    _received = 0

    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        get: Callable[[], int] | None = getattr(site, "body_limit", None)
        return get() if get is not None else 1_048_576

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            # Declared too large: answer at once rather than read (and drop) it all.
            self.too_large = True
            self.content = _Discard()
            channel = self.channel
            if isinstance(channel, LimitedChannel):
                channel.refuse(PayloadTooLarge(f"the request body is larger than "
                                               f"{self._limit()} bytes"))
            return
        super().gotLength(length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        content: Any = self.content
        if self._received > self._limit():
            # A chunked body (its length unknown up front) just crossed the limit: answer
            # 413 and close now, rather than read and drop the rest of it.
            self.too_large = True
            content.close()
            self.content = _Discard()
            channel = self.channel
            if isinstance(channel, LimitedChannel):
                channel.refuse(PayloadTooLarge(f"the request body is larger than "
                                               f"{self._limit()} bytes"))
            return
        content.write(data)

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            # Every response that goes through twisted.web (ours, Autobahn's, Twisted's own
            # error pages) names the gateway, not the framework and its version.
            self.responseHeaders.setRawHeaders(b"server", [SERVER])
        super().write(data)  # type: ignore[no-untyped-call]


_CONNECTION_DONE = Failure(ConnectionDone())


class LimitedChannel(HTTPChannel):
    """An HTTP channel whose header count and size limits come from the config."""

    def connectionMade(self) -> None:
        site = getattr(self, "site", None)
        limits: Callable[[], tuple[int, int]] | None = getattr(site, "header_limits", None)
        if limits is not None:
            count, size = limits()
            self.maxHeaders = count
            self.totalHeadersSize = size
            self.MAX_LENGTH = size
        super().connectionMade()  # type: ignore[no-untyped-call]
        channels = getattr(site, "channels", None)
        if channels is not None:
            channels.add(self)
        self._arm_head_deadline()

    # A client has head_timeout seconds for a complete request head, from the connection
    # (or from the end of its previous request): trickling header lines keeps the idle
    # timer alive, not this one (slowloris).
    _head_deadline: Any = None

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        get: Callable[[], float] | None = getattr(getattr(self, "site", None), "head_timeout", None)
        self._head_deadline = self.callLater(  # type: ignore[no-untyped-call]
            get() if get is not None else 10.0, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None and self._head_deadline.active():
            self._head_deadline.cancel()
        self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    # Then body_timeout seconds for the whole body: trickling it a byte at a time keeps
    # the idle timer alive, not this one (a slow body).
    _body_deadline: Any = None

    def allHeadersReceived(self) -> None:
        self._cancel_head_deadline()
        super().allHeadersReceived()  # type: ignore[no-untyped-call]
        if self.length != 0 and self.transport is not None and not self._refused:
            get: Callable[[], float] | None = getattr(getattr(self, "site", None),
                                                      "body_timeout", None)
            self._body_deadline = self.callLater(  # type: ignore[no-untyped-call]
                get() if get is not None else 30.0, self._body_timed_out)

    def allContentReceived(self) -> None:
        self._cancel_body_deadline()
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def _cancel_body_deadline(self) -> None:
        if self._body_deadline is not None and self._body_deadline.active():
            self._body_deadline.cancel()
        self._body_deadline = None

    def _body_timed_out(self) -> None:
        self._body_deadline = None
        if self.transport is not None and not self._refused:
            self.refuse(RequestTimeout("the request body did not arrive in time"))

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)  # type: ignore[no-untyped-call]
        if self.transport is not None and self.persistent:
            self._arm_head_deadline()

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._cancel_head_deadline()
        self._cancel_body_deadline()
        channels = getattr(getattr(self, "site", None), "channels", None)
        if channels is not None:
            channels.discard(self)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        for waiter in self._closed_waiters:
            waiter.callback(None)
        self._closed_waiters = []

    _closed_waiters: list[Deferred[None]] = []

    def close_when_idle(self) -> Deferred[None]:
        """Close this connection gracefully (what was written still goes out); fires once
        it is closed. A connection that a WebSocket took over is not ours to close."""
        transport = self.transport
        if transport is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closed_waiters = [*self._closed_waiters, d]
        transport.loseConnection()
        return d

    def lineLengthExceeded(self, line: bytes) -> None:
        self._respondToBadRequestAndDisconnect()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Requests Twisted refuses before they reach us (too many or too large header
        fields, a malformed request line) get a problem+json body too, not a bare 400."""
        self.refuse(BadRequest("the request line or header fields are malformed or exceed "
                               "the limits"))

    _refused = False

    def refuse(self, error: ApiError) -> None:
        """Answer *error* as problem+json (with its request ID) and close the connection."""
        if self._refused:
            return
        self._refused = True
        self._cancel_head_deadline()
        self._cancel_body_deadline()
        request_id = request_id_from(None)
        body = problem_body(error, request_id)
        finished: Callable[[Request, int, int], None] | None = getattr(
            getattr(self, "site", None), "finished", None)
        if finished is not None:  # the access log has a line for it too
            command = getattr(self, "_command", b"-") or b"-"
            path = getattr(self, "_path", b"-") or b"-"
            peer = getattr(self.transport.getPeer(), "host", "") if self.transport else ""
            finished(Request(method=command.decode("latin-1"),
                             path=path.decode("latin-1").split("?", 1)[0],
                             request_id=request_id, transport="http", peer_host=peer,
                             loopback=is_loopback(peer)), error.status, len(body))
        head = (f"HTTP/1.1 {error.status} {error.title}\r\n"
                "Content-Type: application/problem+json\r\n"
                f"Server: {SERVER.decode()}\r\nCache-Control: no-store\r\n"
                f"X-Request-ID: {request_id}\r\nConnection: close\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        assert self.transport is not None
        self.transport.write(head + body)
        self.loseConnection()  # type: ignore[no-untyped-call]


class GatewaySite(Site):
    """A ``Site`` with the gateway's request and channel classes and live limits."""

    protocol = LimitedChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        body_limit: Callable[[], int],
        header_limits: Callable[[], tuple[int, int]],
        head_timeout: Callable[[], float] = lambda: 10.0,
        reactor: Any = None,
        body_timeout: Callable[[], float] = lambda: 30.0,
        finished: Callable[[Request, int, int], None] | None = None,
    ) -> None:
        # A JSON API never parses form bodies: that saves Twisted's costly e-mail-style
        # parsing of Content-Type on every POST and keeps multipart parsing away from
        # untrusted input.
        super().__init__(resource, requestFactory=LimitedRequest,  # type: ignore[no-untyped-call]
                         parsePOSTFormSubmission=False, reactor=reactor)
        cache_http_date()
        self.body_limit = body_limit
        self.header_limits = header_limits
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        #: Told of requests the channel refuses before any resource sees them.
        self.finished = finished
        #: Open HTTP connections (weakly: one a WebSocket took over is forgotten).
        self.channels: WeakSet[LimitedChannel] = WeakSet()
        self.displayTracebacks = False
        self.noisy = False

    def close_connections(self, clock: IReactorTime, timeout: float = 2.0) -> Deferred[None]:
        """Close every open HTTP connection gracefully — the bytes already written (the end
        of a response that just finished) are flushed first, which the reactor's own
        shutdown would not do — and fire once they are closed, or after *timeout* seconds
        (then the rest are aborted)."""
        channels = [c for c in list(self.channels) if c.transport is not None]
        if not channels:
            return succeed(None)
        waits = DeferredList([c.close_when_idle() for c in channels], consumeErrors=True)
        done: Deferred[None] = Deferred()

        def give_up() -> None:
            for channel in channels:
                transport: Any = channel.transport
                if transport is not None:
                    transport.abortConnection()
            if not done.called:
                done.callback(None)

        timer = clock.callLater(timeout, give_up)

        def closed(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        waits.addCallback(closed)
        return done

    def log(self, request: Any) -> None:
        """The access log is written by the dispatcher's observers (it knows the request
        ID and the principal), not by ``twisted.web``'s combined log."""


#: The lower-case ``str`` form of a request header name as Twisted hands it over (its
#: canonical ``bytes``), converted once per distinct name. Bounded: clients choose names.
_HEADER_NAMES: dict[bytes, str] = {}
_HEADER_NAMES_MAX = 1024


def _header_name(raw: bytes) -> str:
    name = raw.decode("latin-1").lower()
    if len(_HEADER_NAMES) < _HEADER_NAMES_MAX:
        _HEADER_NAMES[raw] = name
    return name


def normalize(request: IRequest, transport: str) -> Request:
    """The router's form of a ``twisted.web`` request."""
    headers: dict[str, str] = {}
    names = _HEADER_NAMES
    for raw, values in request.requestHeaders.getAllRawHeaders():
        name = names.get(raw) or _header_name(raw)
        # Repeated fields are joined with ", " (RFC 9110 §5.3); most come once.
        headers[name] = (values[0].decode("latin-1") if len(values) == 1
                         else ", ".join(v.decode("latin-1") for v in values))
    args = request.args
    query = {
        k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace")
        for k, v in args.items()
        if v
    } if args else {}
    peer = request.getClientAddress()
    host = getattr(peer, "host", "") or ""
    path = request.path.decode("latin-1")
    body = request.content.read() if request.content is not None else b""
    return Request(
        # As sent: methods are case-sensitive (RFC 9110 §9.1), so ``get`` is not GET
        # (no route has it: 405).
        method=request.method.decode("ascii", "replace"),
        path=path,
        request_id=request_id_from(headers.get("x-request-id")),
        transport=transport,
        peer_host=host,
        loopback=is_loopback(host),
        headers=headers,
        query=query,
        body=body,
        accepts_stream=query.get("stream") == "true",
    )


def _bad_target(request: Request) -> Response:
    raise BadRequest("the request target (or Host) is not valid UTF-8 after percent-decoding")


#: The route of a request whose target is not UTF-8: not in the table, it runs the whole
#: chain (so it is rate-limited like any request) and is answered 400.
_BAD_TARGET = RouteEntry("GET", "/.bad-target", _bad_target, owner="rest", public=True,
                         tier="public", raw_body=True)


def _foreign_host(request: Request) -> Response:
    raise Forbidden("this listener answers only requests whose Host is a loopback name or "
                    "one of its allowed_hosts (DNS-rebinding guard)")


#: The route of a request whose ``Host`` the listener does not answer (the DNS-rebinding
#: guard): like :data:`_BAD_TARGET`, it runs the whole chain and is answered 403.
_FOREIGN_HOST = RouteEntry("GET", "/.foreign-host", _foreign_host, owner="rest", public=True,
                           tier="public", raw_body=True)


def _host_of(request: IRequest) -> str | None:
    values = request.requestHeaders.getRawHeaders(b"host")
    return values[0].decode("latin-1") if values else None


def _decodable(request: IRequest) -> bool:
    """Are this request's path and host UTF-8 (the path after percent-decoding)?"""
    try:
        b"/".join(request.postpath or []).decode("utf-8")
        hosts = request.requestHeaders.getRawHeaders(b"host")
        if not (hosts and hosts[0].isascii()):  # an ASCII Host decodes, as its name does
            request.getRequestHostname().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def is_websocket_path(postpath: list[bytes] | None) -> bool:
    """Is this the ``/ws`` endpoint? Exactly the paths the Klein route ``/ws``
    (``branch=False``) took before issue 12: the percent-decoded path, leading slashes
    dropped (Werkzeug's matcher drops them), is ``ws`` — so ``/ws``, ``/ws?x``, ``//ws``
    and ``/%77s`` are, ``/ws/``, ``/ws/x``, ``/WS`` and ``/ws%2F`` are not."""
    if not postpath or not postpath[-1].endswith(b"ws"):  # the cheap refusal of most paths
        return False
    return b"/".join(postpath).lstrip(b"/") == b"ws"


def _gone(request: IRequest) -> bool:
    """Has the request finished, or lost its connection (``notifyFinish`` has fired)?"""
    return bool(getattr(request, "finished", False) or getattr(request, "_disconnected", False))


class _Front(Resource):
    """The site's root, one leaf resource for every path: the Host guard and the target
    check, then ``/ws`` (:func:`is_websocket_path`) to the WebSocket endpoint and every
    other path to the dispatcher, which matches the real route table."""

    isLeaf = True

    def __init__(self, adapter: RestAdapter) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.adapter = adapter

    def render(self, request: IRequest) -> Any:
        decodable = _decodable(request)
        guard = self.adapter.host_allowed
        if decodable and (guard is None or guard(_host_of(request))):
            if is_websocket_path(request.postpath):
                return self.adapter.ws(request)
            if self.adapter.router is not None:
                return self.adapter.router.render(request)
            return self.adapter.serve(request)
        d = self.adapter.refuse_target(request, _BAD_TARGET if not decodable else _FOREIGN_HOST)

        def written(body: bytes) -> None:
            if not _gone(request):
                request.write(body)
                request.finish()

        d.addCallback(written)
        d.addErrback(lambda f: self.adapter.log.failure("answering a bad request target failed", f))
        return NOT_DONE_YET


class RestAdapter:
    """The REST adapter of one listener (``http``; ``tls`` in detached mode; ``admin``):
    :meth:`resource` is the ``twisted.web`` resource its site serves."""

    log = Logger()

    def __init__(
        self,
        dispatcher: Dispatcher,
        transport: str = "http",
        websocket: IResource | None = None,
        inflight: InFlight | None = None,
        identify: Callable[[IRequest], str] | None = None,
        host_allowed: Callable[[str | None], bool] | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        #: The DNS-rebinding guard: may a request with this ``Host`` be served (WebSocket
        #: upgrades included)? ``None``: every ``Host`` is.
        self.host_allowed = host_allowed
        self.transport = transport
        self.websocket = websocket
        self.inflight = inflight or InFlight()
        #: The device ID of a request's connection (the ``tls`` listener's client
        #: certificate); the security chain makes it the principal.
        self.identify = identify
        #: A resource that routes every non-``/ws`` request (after the Host guard and the
        #: target check) instead of :meth:`answer`: the admin site's Klein app. ``None``
        #: (the API listeners): no router in between, the dispatcher matches the table.
        self.router: IResource | None = None

    def _normalize(self, web: IRequest) -> Request:
        request = normalize(web, self.transport)
        if self.identify is not None:
            request.device_id = self.identify(web)
        return request

    def resource(self) -> IResource:
        return _Front(self)

    def refuse_target(self, web: IRequest, route: RouteEntry = _BAD_TARGET) -> Deferred[bytes]:
        """Answer a request whose target is not UTF-8 (400), or whose ``Host`` is foreign
        (403), with problem+json through the dispatcher (rate-limited, access-logged, with
        its request ID)."""
        self.inflight.enter()
        web.notifyFinish().addBoth(lambda _: self.inflight.leave())  # type: ignore[attr-defined]
        request = self._normalize(web)
        d = self.dispatcher.handle_control(request, route, self.dispatcher.steps)
        return d.addCallback(lambda response: self._write_head(web, request, response))

    def ws(self, web: IRequest) -> Any:
        """``/ws``: the WebSocket upgrade, or a 400 problem for a plain request (a site
        without WebSocket, the admin site, serves it as any other path)."""
        # The path's first segment is the endpoint's (as the Klein route left it).
        web.prepath.extend(web.postpath[:1])
        web.postpath = web.postpath[1:]
        if self.websocket is None:
            return self.answer(web, self.handle)
        upgrade = web.requestHeaders.getRawHeaders(b"upgrade") or [b""]
        if upgrade[0].lower() != b"websocket":
            return self.answer(web, self._not_an_upgrade)
        # Autobahn takes the connection over (or answers a bare error itself).
        try:
            return self.websocket.render(web)
        except Exception:
            self._failed(Failure(), web)
            return NOT_DONE_YET

    def _not_an_upgrade(self, web: IRequest) -> bytes:
        normalized = self._normalize(web)
        error = BadRequest("/ws is a WebSocket endpoint: open it with an Upgrade request",
                           headers={"Upgrade": "websocket"})
        response = error_response(error, normalized.request_id)
        self.dispatcher.finished(normalized, response.status, len(response.body))
        return self._write_head(web, normalized, response)

    def answer(self, web: IRequest,
               serve: Callable[[IRequest], Deferred[bytes] | bytes]) -> object:
        """Run *serve* and write the body it gives (at once, or when its Deferred fires),
        then finish the request — what Klein did for its routes: a lost connection
        cancels the Deferred (the streamed-response code relies on ``CancelledError``);
        a failure is answered 500 problem+json through the dispatcher's conversion (and
        logged there), or only logged once the request is gone."""
        try:
            result = serve(web)
        except Exception:
            self._failed(Failure(), web)
            return NOT_DONE_YET
        if not isinstance(result, Deferred):
            self._write(result, web)
            return NOT_DONE_YET
        web.notifyFinish().addErrback(lambda _: result.cancel())  # type: ignore[attr-defined]
        result.addCallbacks(self._write, self._failed, callbackArgs=(web,), errbackArgs=(web,))
        result.addErrback(lambda f: self.log.failure("writing a response failed", f))
        return NOT_DONE_YET

    @staticmethod
    def _write(body: bytes, web: IRequest) -> None:
        if not _gone(web):
            web.write(body)
            web.finish()

    def _failed(self, failure: Failure, web: IRequest) -> None:
        if _gone(web):
            if not failure.check(CancelledError):
                self.log.failure("answering a request failed after it ended", failure)
            return
        host = getattr(web.getClientAddress(), "host", "") or ""
        request = Request(method=web.method.decode("ascii", "replace"),
                          path=web.path.decode("latin-1"),
                          request_id=request_id_from(_header(web, b"x-request-id")),
                          transport=self.transport, peer_host=host, loopback=is_loopback(host))
        response = self.dispatcher.convert(failure, request)  # logs what is unexpected
        try:
            if not getattr(web, "startedWriting", False):
                web.write(self._write_head(web, request, response))
            web.finish()
        except Exception:  # e.g. the connection was taken over (a WebSocket upgrade)
            self.log.failure("answering a failed request failed")

    def serve(self, web: IRequest) -> object:
        """:meth:`handle` and :meth:`answer` in one, with one ``notifyFinish`` per
        request instead of two: in flight until the request finished or the client went
        away (then a pending answer is cancelled)."""
        self.inflight.enter()
        try:
            result = self._serve(web)
        except Exception:
            web.notifyFinish().addBoth(self._left)  # type: ignore[attr-defined]
            self._failed(Failure(), web)
            return NOT_DONE_YET
        if not isinstance(result, Deferred):
            web.notifyFinish().addBoth(self._left)  # type: ignore[attr-defined]
            self._write(result, web)
            return NOT_DONE_YET
        web.notifyFinish().addBoth(self._left, result)  # type: ignore[attr-defined]
        result.addCallbacks(self._write, self._failed, callbackArgs=(web,), errbackArgs=(web,))
        result.addErrback(lambda f: self.log.failure("writing a response failed", f))
        return NOT_DONE_YET

    def _left(self, outcome: object, pending: Deferred[bytes] | None = None) -> None:
        self.inflight.leave()
        if pending is not None and isinstance(outcome, Failure):
            pending.cancel()  # the client went away before its answer

    def handle(self, web: IRequest) -> Deferred[bytes] | bytes:
        """Every path but ``/ws``: through the dispatcher."""
        # In flight until the whole response is written and the request finished (or the
        # client went away): SIGTERM's drain waits for exactly that.
        self.inflight.enter()
        web.notifyFinish().addBoth(lambda _: self.inflight.leave())  # type: ignore[attr-defined]
        return self._serve(web)

    def _serve(self, web: IRequest) -> Deferred[bytes] | bytes:
        request = self._normalize(web)
        if getattr(web, "too_large", False):
            response = error_response(PayloadTooLarge("the request body is too large"),
                                      request.request_id)
            self.dispatcher.finished(request, response.status, len(response.body))
            return self._write_head(web, request, response)
        out = self.dispatcher.handle_now(request)
        if isinstance(out, Deferred):
            return out.addCallback(self._respond, web, request)
        return self._respond(out, web, request)  # type: ignore[no-any-return]

    def _write_head(self, web: IRequest, request: Request, response: Response) -> bytes:
        web.setResponseCode(response.status)
        set_header = web.responseHeaders.setRawHeaders
        for name, value in response.headers.items():
            set_header(name.encode("latin-1"), [value.encode("latin-1")])
        if response.status != 204:  # 204 No Content has no body, so no body type either
            set_header(b"content-type", [response.content_type.encode("latin-1")])
        set_header(b"x-request-id", [request.request_id.encode("ascii")])
        if not isinstance(web, LimitedRequest):  # a LimitedRequest sets it as it writes
            set_header(b"server", [SERVER])  # not the framework and its version
        if not web.responseHeaders.hasHeader(b"cache-control"):
            set_header(b"cache-control", [b"no-store"])
        return response.body

    def _respond(self, response: Response, web: IRequest, request: Request) -> Any:
        body = self._write_head(web, request, response)
        if response.stream is None:
            return body
        stream = response.stream
        lost = web.notifyFinish()  # type: ignore[attr-defined]
        lost.addErrback(lambda _: stream.cancel())

        def on_chunk(chunk: bytes) -> None:
            web.write(chunk.rstrip(b"\n") + b"\n")

        def ended(_: object) -> bytes:
            return b""

        def broke(failure: Failure) -> bytes:
            if failure.check(CancelledError):
                return b""  # the client went away (answer() cancels on a lost connection)
            # Headers are out: the only honest signal left is a final error line.
            problem = self.dispatcher.convert(failure, request)
            web.write(problem.body + b"\n")
            return b""

        return stream.subscribe(on_chunk).addCallbacks(ended, broke)


def _header(web: IRequest, name: bytes) -> str | None:
    values = web.requestHeaders.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None
