"""The ZeroMQ IPC adapter: ROUTER sockets for local clients (SPEC §7, docs/protocols.md).

Two ROUTER endpoints, both bound by default: ``ipc://STATE_DIR/gateway.ipc`` and the TCP
fallback (``tcp://127.0.0.1:8775``) for clients that cannot use ``ipc://``. Both are
CurveZMQ servers with the gateway's key pair (``curve/gateway.key_secret``; clients pin
the public ``curve/gateway.key``); ``curve_on_ipc=False`` turns Curve off on ``ipc://``
only. There is no ZAP handler on these sockets: any client that knows the server key
may connect, and every request is authenticated by its bearer token, through the same
:class:`Dispatcher` (and security chain) as REST.

A client's DEALER sends one frame: an ``AicoMessage`` holding an ``ApiRequest``. The
reply is one frame: an ``AicoMessage`` holding an ``ApiResponse``, with the request's
``correlation_id`` attribute copied. Control methods: ``SUBSCRIBE``/``UNSUBSCRIBE`` (the
path is the topic prefix; events then arrive as ``AicoMessage(ApiEvent)`` frames on the
same socket) and ``HEARTBEAT``. Attribute ``oneway = "1"`` asks for no reply at all
(fire and forget). Whatever arrives that is not such a frame is answered with a 400
``ApiResponse`` — never a crash.

The sockets are driven by txZMQ (wrapped here: nothing else imports it), with its
``send`` replaced so that it never touches the global reactor and reports a full peer
queue (``ROUTER_MANDATORY``) instead of dropping silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import zmq
from google.protobuf.message import DecodeError
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from aico.bus.curve import CurveLayout, load_pair
from aico.gateway.connections import ConnectionInfo, ConnectionManager, Event, IConnection
from aico.gateway.errors import (
    PROBLEM_CONTENT_TYPE,
    ApiError,
    BadRequest,
    Forbidden,
    Unauthenticated,
    problem_body,
)
from aico.gateway.lifecycle import InFlight
from aico.gateway.routing.dispatch import Dispatcher
from aico.gateway.routing.messages import Principal, Request, Response, request_id_from
from aico.net import is_loopback_endpoint
from aico.proto import AicoMessage, ApiEvent, ApiRequest, ApiResponse, EnvelopeError, unpack, wrap

#: Attributes of the IPC envelope (docs/protocols.md).
ATTR_CORRELATION_ID = "correlation_id"
ATTR_ONEWAY = "oneway"
ATTR_STREAM = "stream"
ATTR_NOTICE = "notice"

#: Messages queued per peer before a send fails (then the peer is a slow consumer).
HIGH_WATER_MARK = 10_000
#: Largest frame accepted; libzmq disconnects a peer that sends more.
MAX_MESSAGE_SIZE = 4 * 1024 * 1024
#: Subscriptions one peer may hold.
MAX_SUBSCRIPTIONS = 64
#: Seconds after which a silent peer without subscriptions is forgotten.
PEER_IDLE = 300.0

Authenticate = Callable[[str], Principal]
MaySubscribe = Callable[[Principal | None, str], bool]


class IpcBindError(RuntimeError):
    """An IPC endpoint could not be bound; the message names the address."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        super().__init__(f"cannot bind the IPC endpoint {address}: {reason}")


@implementer(IConnection)
class IpcPeer:
    """One DEALER (or REQ) peer of a ROUTER socket, known by its routing id."""

    def __init__(self, listener: IpcListener, router: Any, identity: bytes, envelope: list[bytes],
                 since: float) -> None:
        self.listener = listener
        self.router = router
        self.identity = identity
        self.envelope = envelope
        self.info = ConnectionInfo(transport=router.transport_name,
                                   peer=f"{router.address}#{identity.hex()}", since=since)
        self.last_seen = since

    def deliver(self, event: Event) -> None:
        frame = event.frame("ipc", _event_frame)
        self.listener._push(self, frame, event=True)

    def auth_ended(self, error: ApiError) -> None:
        kind = "auth_expired" if error.code == "token_expired" else "auth_revoked"
        response = _problem_response(error, "")
        self.listener._push(self, wrap(response, source="gateway",
                                       attributes={ATTR_NOTICE: kind}).SerializeToString())

    def close(self, code: int, reason: str) -> None:
        self.listener._forget(self)


def _event_frame(event: Event) -> bytes:
    return wrap(ApiEvent(topic=event.topic, body=event.body), source="gateway").SerializeToString()


def _problem_response(error: ApiError, request_id: str) -> ApiResponse:
    out = ApiResponse(request_id=request_id, status=error.status, body=problem_body(error, request_id))
    out.headers.update(error.headers)
    out.headers["content-type"] = PROBLEM_CONTENT_TYPE
    return out


def _to_api_response(response: Response, request_id: str) -> ApiResponse:
    out = ApiResponse(request_id=request_id, status=response.status, body=response.body)
    out.headers.update(response.headers)
    out.headers["content-type"] = response.content_type
    return out


class IpcListener:
    """The IPC ROUTER endpoints; ``start()`` binds, ``stop()`` closes (see module doc)."""

    log = Logger()

    def __init__(
        self,
        dispatcher: Dispatcher,
        authenticate: Authenticate,
        may_subscribe: MaySubscribe,
        connections: ConnectionManager,
        layout: CurveLayout,
        ipc_endpoint: str,
        fallback: str,
        curve_on_ipc: bool = True,
        reactor: Any = None,
        *,
        peer_idle: float = PEER_IDLE,
        inflight: InFlight | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.dispatcher = dispatcher
        self.authenticate = authenticate
        self.may_subscribe = may_subscribe
        self.connections = connections
        self.layout = layout
        if ipc_endpoint == "default":
            path = str(layout.state_dir / "gateway.ipc")
            limit = getattr(zmq, "IPC_PATH_MAX_LEN", 107) or 107
            if len(path) > limit:
                # Clients then use the TCP fallback (the design's "falls back to TCP").
                self.log.warn("ipc:// is off: {path} is longer than a Unix socket path may "
                              "be ({limit} bytes); clients use the TCP fallback",
                              path=path, limit=limit)
                ipc_endpoint = ""
            else:
                ipc_endpoint = "ipc://" + path
        self.ipc_endpoint = ipc_endpoint
        self.fallback = fallback
        self.curve_on_ipc = curve_on_ipc
        self.reactor = reactor
        self.peer_idle = peer_idle
        #: Requests in progress (SIGTERM waits for them before the sockets close).
        self.inflight = inflight or InFlight()
        self._factory: Any = None
        self._routers: list[Any] = []
        self._peers: dict[tuple[int, bytes], IpcPeer] = {}
        self._sweep_call: IDelayedCall | None = None
        self._bound: dict[str, str] = {}
        #: Counters for tests and metrics.
        self.dropped_replies = 0
        self.slow_consumers = 0

    @property
    def endpoints(self) -> dict[str, str]:
        """The bound endpoints for ``ports.json``: ``{"endpoint": …, "fallback": …}``."""
        return dict(self._bound)

    @property
    def peers(self) -> int:
        return len(self._peers)

    # -- start / stop ------------------------------------------------------------------

    def start(self) -> None:
        """Bind every enabled endpoint now; raise :class:`IpcBindError` naming the address."""
        import txzmq

        public, secret = load_pair(self.layout.gateway_secret)
        factory = txzmq.ZmqFactory()
        factory.reactor = self.reactor
        factory.lingerPeriod = 0
        self._factory = factory
        listener = self
        reactor = self.reactor

        class Router(txzmq.ZmqRouterConnection):  # type: ignore[misc]
            highWaterMark = HIGH_WATER_MARK
            transport_name = "ipc"
            address = ""
            loopback = True
            read_scheduled: Any = None

            def messageReceived(self, message: list[bytes]) -> None:
                listener._received(self, message)

            def send(self, message: list[bytes]) -> None:
                # Never the global reactor; let ZMQError (EAGAIN, EHOSTUNREACH) through.
                self.socket.send_multipart(message, zmq.NOBLOCK)
                if self.read_scheduled is None:
                    self.read_scheduled = reactor.callLater(0, self._scheduled_read)

            def _scheduled_read(self) -> None:
                self.read_scheduled = None
                if self.factory is not None:
                    self.doRead()

        try:
            for key, address, transport, curve in (
                ("endpoint", self.ipc_endpoint, "ipc", self.curve_on_ipc),
                ("fallback", self.fallback, "ipc-tcp", True),
            ):
                if not address:
                    continue
                router: Any = Router(factory)
                router.transport_name = transport
                sock = router.socket
                sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
                sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_SIZE)
                if curve:
                    sock.curve_secretkey = secret
                    sock.curve_publickey = public
                    sock.curve_server = True
                self._routers.append(router)
                try:
                    router.addEndpoints([txzmq.ZmqEndpoint(txzmq.ZmqEndpointType.bind, address)])
                except zmq.ZMQError as e:
                    raise IpcBindError(address, e.strerror) from e
                bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
                router.address = bound
                router.loopback = transport == "ipc" or is_loopback_endpoint(bound)
                self._bound[key] = bound
                # The FD is edge-triggered: look for messages that raced the bind.
                if router.read_scheduled is None:
                    router.read_scheduled = reactor.callLater(0, router._scheduled_read)
        except BaseException:
            self._close_sockets()
            raise
        self._schedule_sweep()
        self.log.info("IPC listening on {endpoints}", endpoints=", ".join(self._bound.values()))

    def stop(self) -> Deferred[None]:
        """Close both sockets and forget every peer."""
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        for peer in list(self._peers.values()):
            self._forget(peer)
        self._close_sockets()
        return succeed(None)

    def _close_sockets(self) -> None:
        for router in self._routers:
            if router.read_scheduled is not None and router.read_scheduled.active():
                router.read_scheduled.cancel()
            router.read_scheduled = None
        self._routers = []
        if self._factory is not None:
            factory, self._factory = self._factory, None
            factory.shutdown()
        self._bound.clear()

    def _schedule_sweep(self) -> None:
        self._sweep_call = self.reactor.callLater(min(60.0, self.peer_idle), self._sweep)

    def _sweep(self) -> None:
        now = self.reactor.seconds()
        for peer in list(self._peers.values()):
            if not peer.info.subscriptions and now - peer.last_seen > self.peer_idle:
                self._forget(peer)
        self._schedule_sweep()

    # -- peers -------------------------------------------------------------------------

    def _peer(self, router: Any, identity: bytes, envelope: list[bytes]) -> IpcPeer:
        key = (id(router), identity)
        peer = self._peers.get(key)
        now = self.reactor.seconds()
        if peer is None:
            peer = self._peers[key] = IpcPeer(self, router, identity, envelope, now)
            self.connections.add(peer)
        peer.envelope = envelope
        peer.last_seen = now
        return peer

    def _forget(self, peer: IpcPeer) -> None:
        if self._peers.pop((id(peer.router), peer.identity), None) is not None:
            self.connections.remove(peer)

    def _push(self, peer: IpcPeer, frame: bytes, event: bool = False) -> bool:
        """Send *frame* to *peer*; False (and the peer handled) when it cannot take it."""
        router = peer.router
        if router.factory is None:
            return False
        try:
            router.send([peer.identity, *peer.envelope, frame])
        except zmq.Again:
            if event:
                self.slow_consumers += 1
                self.log.warn("IPC peer {peer} fell behind: its subscriptions are dropped",
                              peer=peer.info.peer)
                self.connections.unsubscribe_all(peer)
            else:
                self.dropped_replies += 1
            return False
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                self._forget(peer)  # the peer went away
                return False
            raise
        peer.info.bytes_out += len(frame)
        peer.info.messages_out += 1
        return True

    # -- receiving ---------------------------------------------------------------------

    def _received(self, router: Any, frames: list[bytes]) -> None:
        identity, parts = frames[0], frames[1:]
        envelope: list[bytes] = []
        if len(parts) == 2 and parts[0] == b"":
            envelope, parts = [b""], parts[1:]  # a REQ socket's empty delimiter
        peer = self._peer(router, identity, envelope)
        peer.info.bytes_in += sum(len(p) for p in parts)
        peer.info.messages_in += 1
        if len(parts) != 1:
            self._error(peer, "", "", BadRequest(
                f"an IPC message is one frame holding an AicoMessage, got {len(parts)} frames"))
            return
        message = AicoMessage()
        try:
            message.ParseFromString(parts[0])
            api = unpack(message, ApiRequest)
        except (DecodeError, EnvelopeError) as e:
            self._error(peer, "", "", BadRequest(
                f"the frame is not an AicoMessage holding an ApiRequest ({type(e).__name__})"))
            return
        attributes = message.metadata.attributes
        correlation: str | None = attributes.get(ATTR_CORRELATION_ID, "")
        if attributes.get(ATTR_ONEWAY) == "1":
            correlation = None
        method = api.method.upper()
        request_id = request_id_from(api.request_id or api.headers.get("x-request-id"))
        try:
            if method == "SUBSCRIBE":
                self._subscribe(peer, api, correlation, request_id)
            elif method == "UNSUBSCRIBE":
                self.connections.unsubscribe(peer, api.path)
                self._json(peer, correlation, request_id, {"topic": api.path, "subscribed": False})
            elif method == "HEARTBEAT":
                self._json(peer, correlation, request_id,
                           {"subscriptions": sorted(peer.info.subscriptions)})
            else:
                self._dispatch(peer, router, api, method, correlation, request_id,
                               attributes.get(ATTR_STREAM) == "1")
        except ApiError as e:
            self._error(peer, correlation, request_id, e)

    def _reply(self, peer: IpcPeer, correlation: str | None, response: ApiResponse,
               stream: str = "") -> None:
        if correlation is None:
            return  # oneway
        attributes = {ATTR_CORRELATION_ID: correlation} if correlation else {}
        if stream:
            attributes[ATTR_STREAM] = stream
        self._push(peer, wrap(response, source="gateway", attributes=attributes).SerializeToString())

    def _error(self, peer: IpcPeer, correlation: str | None, request_id: str, error: ApiError) -> None:
        self._reply(peer, correlation, _problem_response(error, request_id or ""))

    def _json(self, peer: IpcPeer, correlation: str | None, request_id: str, value: Any) -> None:
        body = json.dumps(value, separators=(",", ":")).encode()
        out = ApiResponse(request_id=request_id, status=200, body=body)
        out.headers["content-type"] = "application/json"
        self._reply(peer, correlation, out)

    # -- control methods ---------------------------------------------------------------

    def _subscribe(self, peer: IpcPeer, api: ApiRequest, correlation: str | None,
                   request_id: str) -> None:
        topic = api.path
        header = api.headers.get("authorization", "") or api.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("SUBSCRIBE needs 'authorization: Bearer <token>'")
        d = maybeDeferred(self.authenticate, token.strip())

        def ok(principal: Principal) -> None:
            current = peer.info.principal
            if peer.info.subscriptions and current is not None and current.subject != principal.subject:
                raise Forbidden("a peer cannot change its subject while subscribed")
            if not self.may_subscribe(principal, topic):
                raise Forbidden(f"not allowed to subscribe to {topic[:256]!r}")
            if (topic not in peer.info.subscriptions
                    and len(peer.info.subscriptions) >= MAX_SUBSCRIPTIONS):
                raise BadRequest(f"at most {MAX_SUBSCRIPTIONS} subscriptions per peer")
            self.connections.authenticated(peer, principal)
            self.connections.subscribe(peer, topic)
            self._json(peer, correlation, request_id, {"topic": topic, "subscribed": True})

        def refused(failure: Failure) -> None:
            error = failure.value
            if not isinstance(error, ApiError):
                self.log.failure("IPC SUBSCRIBE failed", failure)
                error = Unauthenticated("the token could not be checked")
            self._error(peer, correlation, request_id, error)

        d.addCallback(ok).addErrback(refused)

    # -- requests ----------------------------------------------------------------------

    def _dispatch(self, peer: IpcPeer, router: Any, api: ApiRequest, method: str,
                  correlation: str | None, request_id: str, stream_ok: bool) -> None:
        path = api.path
        query = dict(api.query)
        if "?" in path:
            path, _, qs = path.partition("?")
            query = {**dict(parse_qsl(qs, keep_blank_values=True)), **query}
        if not path.startswith("/"):
            raise BadRequest("a request path starts with '/'")
        headers = {k.lower(): v for k, v in api.headers.items()
                   if k.lower() not in ("cookie", "host")}
        if api.body and "content-type" not in headers:
            headers["content-type"] = "application/json"
        request = Request(
            method=method,
            path=path,
            request_id=request_id,
            transport=router.transport_name,
            peer_host="127.0.0.1" if router.loopback else "",
            loopback=router.loopback,
            headers=headers,
            query=query,
            body=api.body,
            accepts_stream=query.get("stream") == "true" and (stream_ok or correlation is not None),
            connection_id=peer.info.id,
        )
        self.inflight.enter()
        d = self.dispatcher.handle(request)
        d.addCallback(self._respond, peer, correlation, request)
        d.addBoth(self.inflight.leave)
        d.addErrback(self._respond_failed, peer, correlation, request)

    def _respond(self, response: Response, peer: IpcPeer, correlation: str | None,
                 request: Request) -> Deferred[None] | None:
        if not peer.info.subscriptions and request.principal is not None:
            peer.info.principal = request.principal
        request_id = request.request_id
        if response.stream is None:
            self._reply(peer, correlation, _to_api_response(response, request_id))
            return None
        stream = response.stream
        status, content_type = response.status, response.content_type

        def on_chunk(chunk: bytes) -> None:
            out = ApiResponse(request_id=request_id, status=status, body=chunk.rstrip(b"\n"))
            out.headers["content-type"] = "application/json"
            self._reply(peer, correlation, out, stream="chunk")

        def ended(_: object) -> None:
            out = ApiResponse(request_id=request_id, status=status)
            out.headers["content-type"] = content_type
            self._reply(peer, correlation, out, stream="end")

        def broke(failure: Failure) -> None:
            problem = self.dispatcher.convert(failure, request)
            self._reply(peer, correlation, _to_api_response(problem, request_id), stream="end")

        return stream.subscribe(on_chunk).addCallbacks(ended, broke)

    def _respond_failed(self, failure: Failure, peer: IpcPeer, correlation: str | None,
                        request: Request) -> None:
        self.log.failure("IPC: answering request {request_id} failed", failure,
                         request_id=request.request_id)


__all__ = ["IpcBindError", "IpcListener", "IpcPeer"]
