"""The ZeroMQ IPC adapter: ROUTER sockets for local clients (docs/protocols.md §2).

Two ROUTER endpoints, both bound by default: ``ipc://STATE_DIR/gateway.ipc`` and the TCP
fallback (``tcp://127.0.0.1:8775``) for clients that cannot use ``ipc://``. Both are
CurveZMQ servers with the gateway's key pair (``curve/gateway.key_secret``; clients pin
the public ``curve/gateway.key``); ``curve_on_ipc=False`` turns Curve off on ``ipc://``
only. There is no ZAP handler on these sockets: any client that knows the server key
may connect, and every request is authenticated by its bearer token, through the same
dispatcher and security chain as REST.

A client's DEALER sends one frame: an ``AicoMessage`` holding an ``ApiRequest``. The
reply is one frame: an ``AicoMessage`` holding an ``ApiResponse``, with the request's
``correlation_id`` attribute copied. Control methods: ``SUBSCRIBE``/``UNSUBSCRIBE`` (the
path is the topic prefix; events then arrive as ``AicoMessage(ApiEvent)`` frames on the
same socket) and ``HEARTBEAT``. Attribute ``oneway = "1"`` asks for no reply at all
(fire and forget). Whatever arrives that is not such a frame is answered with a 400
``ApiResponse`` — never a crash — whose detail says what was wrong, carrying the
``correlation_id`` whenever the ``AicoMessage`` itself could be read. ``type_url`` is
matched on the part after its last ``/`` (:func:`aico.proto.unpack`). Every reply's
header names are lower case (:func:`~aico.gateway.adapters.session.frame_headers`).

Each peer (a routing id on one socket) owns a :class:`~aico.gateway.adapters.session.
Session`: requests, subscriptions and fair share are the session layer's. One ROUTER
socket serves every peer, so a peer cannot be "not read": its requests beyond
``limits.max_inflight`` wait in a queue of ``limits.inflight_queue`` and past it are
refused at once with 429.

The sockets are plain pyzmq sockets read by :class:`~aico.zmqreactor.SocketReader` (the
reactor watches their edge-triggered ``ZMQ_FD``), as the bus client's are; a full peer
queue (``ROUTER_MANDATORY``) is reported instead of dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import zmq
from google.protobuf.message import DecodeError
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from aico.bus.curve import CurveLayout, load_pair
from aico.bus.interfaces import ATTR_CORRELATION_ID, ATTR_STREAM
from aico.gateway.adapters.session import Session, SessionServices, frame_headers, relay_stream
from aico.gateway.connections import ConnectionInfo, Event, IConnection
from aico.gateway.errors import (
    PROBLEM_CONTENT_TYPE,
    ApiError,
    BackendUnavailable,
    BadRequest,
    problem_body,
)
from aico.gateway.listeners import IListener, ListenerError
from aico.gateway.routing.messages import Request, Response, request_id_from
from aico.net import is_loopback_endpoint
from aico.proto import AicoMessage, ApiEvent, ApiRequest, ApiResponse, EnvelopeError, unpack, wrap
from aico.zmqreactor import SocketReader, send_frames

__all__ = ["IpcBindError", "IpcListener", "IpcPeer"]

#: Attributes of the IPC envelope (docs/protocols.md); the bus's own where they match.
ATTR_ONEWAY = "oneway"
ATTR_NOTICE = "notice"

#: Messages queued per peer before a send fails (then the peer is a slow consumer).
HIGH_WATER_MARK = 10_000
#: Largest frame accepted; libzmq disconnects a peer that sends more.
MAX_MESSAGE_SIZE = 4 * 1024 * 1024
#: Seconds after which a silent peer without subscriptions is forgotten.
PEER_IDLE = 300.0


class IpcBindError(ListenerError):
    """An IPC endpoint could not be bound; the message names the address."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        super().__init__(f"cannot bind the IPC endpoint {address}: {reason}")


class _Router:
    """One bound ROUTER socket and its reader."""

    def __init__(self, sock: zmq.Socket[bytes], transport_name: str) -> None:
        self.sock = sock
        self.transport_name = transport_name
        self.address = ""
        self.loopback = True
        self.reader: SocketReader | None = None
        self.closed = False


@implementer(IConnection)
class IpcPeer:
    """One DEALER (or REQ) peer of a ROUTER socket, known by its routing id."""

    def __init__(self, listener: IpcListener, router: _Router, identity: bytes,
                 envelope: list[bytes], since: float) -> None:
        self.listener = listener
        self.router = router
        self.identity = identity
        self.envelope = envelope
        self.info = ConnectionInfo(transport=router.transport_name,
                                   peer=f"{router.address}#{identity.hex()}", since=since)
        self.last_seen = since
        self.core = Session(listener.services, self, self, name=router.transport_name,
                            peer_host="127.0.0.1" if router.loopback else "",
                            loopback=router.loopback,
                            queue_limit=listener.services.limits().inflight_queue)

    # SessionTransport: one ROUTER socket serves every peer; a peer is never "not read".
    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    # IConnection
    def deliver(self, event: Event) -> None:
        self.listener.push(self, event.frame("ipc", _event_frame), event=True)

    def auth_ended(self, error: ApiError) -> None:
        kind = "auth_expired" if error.code == "token_expired" else "auth_revoked"
        response = _problem_response(error, "")
        self.listener.push(self, wrap(response, source="gateway",
                                      attributes={ATTR_NOTICE: kind}).SerializeToString())

    def close(self, code: int, reason: str) -> None:
        self.listener.forget(self)


def _event_frame(event: Event) -> bytes:
    return wrap(ApiEvent(topic=event.topic, body=event.body), source="gateway").SerializeToString()


def _problem_response(error: ApiError, request_id: str) -> ApiResponse:
    out = ApiResponse(request_id=request_id, status=error.status, body=problem_body(error, request_id))
    out.headers.update(frame_headers(error.headers))
    out.headers["content-type"] = PROBLEM_CONTENT_TYPE
    return out


def _to_api_response(response: Response, request_id: str) -> ApiResponse:
    out = ApiResponse(request_id=request_id, status=response.status, body=response.body)
    headers = out.headers  # item by item: a protobuf map's update() is MutableMapping's
    for name, value in frame_headers(response.headers).items():
        headers[name] = value
    headers["content-type"] = response.content_type
    return out


@implementer(IListener)
class IpcListener:
    """The IPC ROUTER endpoints as one listener (see the module docstring)."""

    log = Logger()
    name = "ipc"

    def __init__(
        self,
        services: SessionServices,
        layout: CurveLayout,
        ipc_endpoint: str,
        fallback: str,
        curve_on_ipc: bool,
        reactor: Any,
        *,
        peer_idle: float = PEER_IDLE,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        self.services = services
        self.connections = services.connections
        self.layout = layout
        if ipc_endpoint == "default":
            path = str(layout.state_dir / "gateway.ipc")
            limit = getattr(zmq, "IPC_PATH_MAX_LEN", 107) or 107
            if len(path) > limit:
                # Clients then use the TCP fallback (docs/protocols.md §2.1).
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
        self._context = context
        self._routers: list[_Router] = []
        self._peers: dict[tuple[int, bytes], IpcPeer] = {}
        self._bound: dict[str, str] = {}
        #: False once the listener stops accepting (new requests are refused with 503).
        self.accepting = True
        #: Counters for tests and metrics.
        self.dropped_replies = 0
        self.slow_consumers = 0
        self.overloaded = 0

    @property
    def endpoints(self) -> dict[str, str]:
        """The bound endpoints for ``ports.json``: ``{"endpoint": …, "fallback": …}``."""
        return dict(self._bound)

    @property
    def peers(self) -> int:
        return len(self._peers)

    @property
    def sweep_interval(self) -> float:
        """Seconds between sweeps of idle peers (a periodic job calls :meth:`sweep`)."""
        return min(60.0, self.peer_idle)

    # -- IListener ---------------------------------------------------------------------

    def listen(self) -> None:
        """Bind every enabled endpoint now; raise :class:`IpcBindError` naming the address."""
        public, secret = load_pair(self.layout.gateway_secret, self.layout.keystore)
        context = self._context if self._context is not None else zmq.Context.instance()
        try:
            for key, address, transport, curve in (
                ("endpoint", self.ipc_endpoint, "ipc", self.curve_on_ipc),
                ("fallback", self.fallback, "ipc-tcp", True),
            ):
                if not address:
                    continue
                sock = context.socket(zmq.ROUTER)
                router = _Router(sock, transport)
                self._routers.append(router)
                sock.linger = 0
                sock.sndhwm = HIGH_WATER_MARK
                sock.rcvhwm = HIGH_WATER_MARK
                sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
                sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_SIZE)
                if curve:
                    sock.curve_secretkey = secret
                    sock.curve_publickey = public
                    sock.curve_server = True
                try:
                    sock.bind(address)
                except zmq.ZMQError as e:
                    raise IpcBindError(address, e.strerror) from e
                bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
                router.address = bound
                router.loopback = transport == "ipc" or is_loopback_endpoint(bound)
                self._bound[key] = bound
                router.reader = SocketReader(self.reactor, sock, self._receiver(router),
                                             f"aico-ipc-{key}")
        except BaseException:
            self._close_sockets()
            raise
        self.log.info("IPC listening on {endpoints}", endpoints=", ".join(self._bound.values()))

    def address(self) -> dict[str, Any]:
        return self.endpoints

    def stop_accepting(self) -> None:
        """New requests are refused with 503; those in flight finish (SIGTERM's drain)."""
        self.accepting = False

    def close_connections(self) -> Deferred[None]:
        return self.stop()

    def stop(self) -> Deferred[None]:
        """Close both sockets and forget every peer."""
        self.accepting = False
        for peer in list(self._peers.values()):
            self.forget(peer)
        self._close_sockets()
        return succeed(None)

    def _close_sockets(self) -> None:
        for router in self._routers:
            router.closed = True
            if router.reader is not None:
                router.reader.close()
            router.sock.close(0)
        self._routers = []
        self._bound.clear()

    def sweep(self) -> None:
        """Forget peers without subscriptions that have been silent for ``peer_idle``."""
        now = self.reactor.seconds()
        for peer in list(self._peers.values()):
            if (not peer.info.subscriptions and not peer.core.in_flight
                    and now - peer.last_seen > self.peer_idle):
                self.forget(peer)

    # -- peers -------------------------------------------------------------------------

    def _peer(self, router: _Router, identity: bytes, envelope: list[bytes]) -> IpcPeer:
        key = (id(router), identity)
        peer = self._peers.get(key)
        now = self.reactor.seconds()
        if peer is None:
            peer = self._peers[key] = IpcPeer(self, router, identity, envelope, now)
            self.connections.add(peer)
        peer.envelope = envelope
        peer.last_seen = now
        return peer

    def forget(self, peer: IpcPeer) -> None:
        """Forget *peer*: its subscriptions, its session's queued requests."""
        if self._peers.pop((id(peer.router), peer.identity), None) is not None:
            peer.core.close()
            self.connections.remove(peer)

    def push(self, peer: IpcPeer, frame: bytes, event: bool = False) -> bool:
        """Send *frame* to *peer*; False (and the peer handled) when it cannot take it."""
        router = peer.router
        if router.closed:
            return False
        try:
            send_frames(router.sock, [peer.identity, *peer.envelope, frame])
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
                self.forget(peer)  # the peer went away
                return False
            raise
        finally:
            # A send may consume the FD's edge: look for messages on the next turn.
            if router.reader is not None:
                router.reader.kick()
        peer.info.bytes_out += len(frame)
        peer.info.messages_out += 1
        return True

    # -- receiving ---------------------------------------------------------------------

    def _receiver(self, router: _Router) -> Callable[[list[bytes]], None]:
        def receive(frames: list[bytes]) -> None:
            self._received(router, frames)

        return receive

    def _received(self, router: _Router, frames: list[bytes]) -> None:
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
        except DecodeError:
            self._error(peer, "", "", BadRequest(
                "the frame is not a protobuf aico.core.AicoMessage (whose any_payload packs an "
                f"{ApiRequest.DESCRIPTOR.full_name})"))
            return
        # From here on the envelope was readable: every reply carries its correlation_id.
        attributes = message.metadata.attributes
        correlation: str | None = attributes.get(ATTR_CORRELATION_ID, "")
        if attributes.get(ATTR_ONEWAY) == "1":
            correlation = None
        try:
            api = unpack(message, ApiRequest)
        except EnvelopeError as e:
            self._error(peer, correlation, "", BadRequest(str(e)))
            return
        method = api.method.upper()
        request_id = request_id_from(api.request_id or api.headers.get("x-request-id"))
        if not self.accepting:
            self._error(peer, correlation, request_id,
                        BackendUnavailable("the gateway is shutting down"))
            return
        try:
            if method == "SUBSCRIBE":
                self._control(peer, correlation, request_id, peer.core.subscribe(
                    api.path, _authorization(api), request_id))
            elif method == "UNSUBSCRIBE":
                self._control(peer, correlation, request_id, peer.core.unsubscribe(
                    api.path, _authorization(api), request_id))
            elif method == "HEARTBEAT":
                self._json(peer, correlation, request_id,
                           {"subscriptions": sorted(peer.info.subscriptions)})
            else:
                self._dispatch(peer, api, correlation, request_id,
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
        self.push(peer, wrap(response, source="gateway", attributes=attributes).SerializeToString())

    def _error(self, peer: IpcPeer, correlation: str | None, request_id: str, error: ApiError) -> None:
        self._reply(peer, correlation, _problem_response(error, request_id or ""))

    def _json(self, peer: IpcPeer, correlation: str | None, request_id: str, value: Any) -> None:
        body = json.dumps(value, separators=(",", ":")).encode()
        out = ApiResponse(request_id=request_id, status=200, body=body)
        out.headers["content-type"] = "application/json"
        self._reply(peer, correlation, out)

    def _control(self, peer: IpcPeer, correlation: str | None, request_id: str,
                 d: Deferred[Response]) -> None:
        def answered(response: Response) -> None:
            self._reply(peer, correlation, _to_api_response(response, request_id))
            peer.core.refused(response)

        d.addCallback(answered)

    # -- requests ----------------------------------------------------------------------

    def _dispatch(self, peer: IpcPeer, api: ApiRequest, correlation: str | None,
                  request_id: str, stream_ok: bool) -> None:
        request = peer.core.build_request(
            api.method, api.path, headers=dict(api.headers), query=dict(api.query),
            body=api.body, token=None, request_id=request_id, accepts_stream=False)
        request.accepts_stream = (request.query.get("stream") == "true"
                                  and (stream_ok or correlation is not None))
        if not peer.core.dispatch(
                request, lambda response: self._respond(response, peer, correlation, request)):
            self.overloaded += 1
            error = peer.core.overloaded()
            self.services.dispatcher.finished(request, error.status, 0)
            self._error(peer, correlation, request_id, error)

    def _respond(self, response: Response, peer: IpcPeer, correlation: str | None,
                 request: Request) -> Deferred[None] | None:
        if not peer.info.subscriptions and request.principal is not None:
            peer.info.principal = request.principal
        request_id = request.request_id
        if response.stream is None:
            self._reply(peer, correlation, _to_api_response(response, request_id))
            return None
        status, content_type = response.status, response.content_type

        def on_chunk(chunk: bytes) -> None:
            out = ApiResponse(request_id=request_id, status=status, body=chunk)
            out.headers["content-type"] = "application/json"
            self._reply(peer, correlation, out, stream="chunk")

        def ended() -> None:
            out = ApiResponse(request_id=request_id, status=status)
            out.headers["content-type"] = content_type
            self._reply(peer, correlation, out, stream="end")

        def broke(failure: Failure) -> None:
            problem = self.services.dispatcher.convert(failure, request)
            self._reply(peer, correlation, _to_api_response(problem, request_id), stream="end")

        return relay_stream(response, on_chunk, ended, broke)


def _authorization(api: ApiRequest) -> str | None:
    """The request's ``authorization`` header, its name in any case (as for requests)."""
    for name, value in api.headers.items():
        if name.lower() == "authorization" and value:
            return value
    return None
