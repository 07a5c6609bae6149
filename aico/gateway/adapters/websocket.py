"""The WebSocket adapter: ``/ws`` on the http (and tls) listener, Autobahn in the same site.

One :class:`WebSocketSession` per socket. It only translates frames: a ``request`` frame
becomes a router :class:`Request` for the shared :class:`Dispatcher` (same route table,
same security chain as REST: the socket's token travels in ``authorization``), and the
:class:`Response` becomes a ``response`` frame. ``docs/protocols.md`` is the contract.

Two framings share everything but the codec: JSON text frames (the default, or the
subprotocol ``aico.v1.json``) and protobuf binary frames (``aico.v1.proto``, each frame a
``SocketFrame``).

Session states (:data:`SessionMachine`, an Automat machine, declares them and their
transitions in one place; the session only asks it questions, see :class:`SessionInputs`)::

    connecting --opened--> anonymous --token accepted--> authenticated --token ended--> auth_lost
                                                          ^      |  ^                     |
                                            token accepted+------+  +---token accepted----+
    connecting / anonymous / authenticated / auth_lost --closed--> closed (final)

    the auth timeout closes an anonymous or auth_lost socket (4001)

Every socket closes after ``idle_timeout`` without a frame from the client (4002).
Outgoing frames go straight to the TCP transport while it keeps up; when the transport
pauses us (its buffer is full), frames queue, and past ``send_buffer`` queued bytes the
socket is closed as a slow consumer (4004) and the queue dropped. Pongs too: while the
transport is full only the latest ping is answered (once it drains), and the pongs owed
count toward ``send_buffer`` (a ping flood is closed with 1008). Memory per socket is
bounded by the transport's buffer plus ``send_buffer``.

Refused upgrades are answered as problem+json (:meth:`WebSocketSession.failHandshake`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FunctionType
from typing import Any, Protocol
from urllib.parse import parse_qsl

import autobahn.websocket.protocol as autobahn_protocol
import txaio.tx
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from automat import TypeMachine, TypeMachineBuilder
from google.protobuf.message import DecodeError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from zope.interface import implementer

from aico import fastjson
from aico.gateway import connections as connections_module
from aico.gateway.adapters import session as session_layer
from aico.gateway.adapters import wsmask
from aico.gateway.adapters.session import Session, SessionServices, problem_of, relay_stream
from aico.gateway.adapters.wsframes import WholeFrames
from aico.gateway.config import WebSocketSection
from aico.gateway.connections import ConnectionInfo, Event, IConnection
from aico.gateway.errors import (
    PROBLEM_CONTENT_TYPE,
    ApiError,
    BadRequest,
    Forbidden,
    InternalError,
    MalformedJson,
    MethodNotAllowed,
    PayloadTooLarge,
    problem_body,
    to_api_error,
)
from aico.gateway.routing.messages import Principal, Request, Response, request_id_from
from aico.gateway.security.topics import may_subscribe
from aico.gateway.security.validate import loads as strict_json
from aico.net import is_loopback, write_now
from aico.proto import ApiEvent, ApiResponse
from aico.proto.aico.gateway.v1.gateway_pb2 import SocketFrame

#: Subprotocol names (``Sec-WebSocket-Protocol``).
SUBPROTOCOL_JSON = "aico.v1.json"
SUBPROTOCOL_PROTO = "aico.v1.proto"
PROTOCOL_VERSION = 1

#: Close codes (docs/protocols.md).
CLOSE_GOING_AWAY = 1001
CLOSE_AUTH_TIMEOUT = 4001
CLOSE_IDLE_TIMEOUT = 4002
CLOSE_DEVICE_REVOKED = connections_module.CLOSE_DEVICE_REVOKED
CLOSE_SLOW_CONSUMER = 4004
#: Too many refused tokens on one socket (RFC 6455 policy violation).
CLOSE_POLICY = session_layer.CLOSE_POLICY
#: Refused tokens one socket may present before it is closed (the session layer's rule).
MAX_AUTH_REFUSALS = session_layer.MAX_AUTH_REFUSALS
#: Subscriptions one socket may hold (the session layer's rule).
MAX_SUBSCRIPTIONS = session_layer.MAX_SUBSCRIPTIONS
_MAX_ID = 128
_JSON_TYPES = ("application/json", "application/problem+json")
#: Bytes of a server's pong frame around its payload (unmasked, payload <= 125 bytes).
_PONG_OVERHEAD = 2
#: The ``Server`` field of the upgrade's answers (never the library and its version).
SERVER_NAME = "aico-gateway"


def _handshake_error(reason: str, code: int) -> ApiError:
    """The gateway's problem for an upgrade Autobahn refused itself. Its *reason* may
    quote what the client sent (an Origin, a key): it is never echoed back."""
    lowered = reason.lower()
    if code == 405:
        return MethodNotAllowed(["GET"])
    if code >= 500:
        return InternalError()
    if "origin" in lowered and "not allowed" in lowered:
        return Forbidden("this Origin may not open a WebSocket to the gateway "
                         "([websocket] allowed_origins)")
    if "origin" in lowered:
        return BadRequest("the Origin header is malformed")
    if "sec-websocket-key" in lowered:
        return BadRequest("the Sec-WebSocket-Key header is missing or malformed")
    if "sec-websocket-version" in lowered or "websocket version" in lowered or "hixie" in lowered:
        return BadRequest("only WebSocket version 13 is supported",
                          headers={"Sec-WebSocket-Version": "13"})
    if "sec-websocket-protocol" in lowered or "protocol" in lowered:
        return _subprotocol_error()
    return BadRequest("the WebSocket upgrade request is malformed")


def _subprotocol_error() -> BadRequest:
    return BadRequest(f"no supported WebSocket subprotocol offered: the gateway speaks "
                      f"{SUBPROTOCOL_JSON} and {SUBPROTOCOL_PROTO} (or none, for JSON)",
                      extra={"supported": [SUBPROTOCOL_JSON, SUBPROTOCOL_PROTO]})


class FrameError(Exception):
    """A client frame the session cannot act on; answered with an ``error`` frame."""

    def __init__(self, error: ApiError, frame_id: Any = None) -> None:
        super().__init__(error.detail)
        self.error = error
        self.frame_id = frame_id


@dataclass
class ClientFrame:
    """A decoded client frame, whatever the framing."""

    type: str
    id: Any = None
    token: str = ""
    method: str = ""
    path: str = ""
    body: bytes = b""
    #: The ``body`` member as the strict decoder read it (``body`` is its serialisation);
    #: ``None`` when the frame carried no body or the framing is not JSON.
    body_value: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    topic: str = ""


_CLIENT_TYPES = frozenset({"auth", "request", "subscribe", "unsubscribe", "heartbeat"})


def _is_json(content_type: str) -> bool:
    base = content_type.split(";", 1)[0].strip().lower()
    return base in _JSON_TYPES or base.endswith("+json")


def _body_value(response: Response) -> Any:
    if not response.body:
        return None
    if _is_json(response.content_type):
        try:
            return fastjson.loads(response.body)
        except ValueError:
            pass
    return response.body.decode("utf-8", "replace")


def _split_path(path: str, query: dict[str, str]) -> tuple[str, dict[str, str]]:
    if "?" in path:
        path, _, qs = path.partition("?")
        merged = dict(parse_qsl(qs, keep_blank_values=True))
        merged.update(query)
        query = merged
    return path, query


def _check_request(frame: ClientFrame) -> ClientFrame:
    if frame.id is None:
        raise FrameError(BadRequest("a request frame needs an id"))
    method = frame.method.upper()
    if not method or len(method) > 16 or not method.isalpha():
        raise FrameError(BadRequest("a request frame needs a method"), frame.id)
    if not frame.path.startswith("/") or len(frame.path) > session_layer.MAX_PATH:
        raise FrameError(BadRequest("a request path starts with '/'"), frame.id)
    frame.method = method
    frame.path, frame.query = _split_path(frame.path, frame.query)
    return frame


def _check_topic(frame: ClientFrame) -> ClientFrame:
    if not frame.topic:
        raise FrameError(BadRequest(f"a {frame.type} frame needs a topic"), frame.id)
    return frame


class JsonCodec:
    """JSON text frames (the default framing)."""

    binary = False
    name = "json"

    def decode(self, payload: bytes, is_binary: bool) -> ClientFrame:
        if is_binary:
            raise FrameError(BadRequest(
                f"binary frames need the {SUBPROTOCOL_PROTO} subprotocol"))
        try:
            obj = strict_json(payload)
        except (ValueError, RecursionError) as e:
            raise FrameError(MalformedJson("the frame is not JSON (or nests too deeply)")) from e
        if not isinstance(obj, dict):
            raise FrameError(BadRequest("a frame is a JSON object"))
        frame_id = obj.get("id")
        if frame_id is not None and not (
            (isinstance(frame_id, str) and len(frame_id) <= _MAX_ID)
            or (isinstance(frame_id, int) and not isinstance(frame_id, bool))
        ):
            raise FrameError(BadRequest("a frame id is a string (up to 128 characters) or an integer"))
        kind = obj.get("type")
        if not isinstance(kind, str) or not kind:
            raise FrameError(BadRequest("the frame has no type"), frame_id)
        if kind not in _CLIENT_TYPES:
            raise FrameError(BadRequest(f"unknown frame type {kind[:64]!r}"), frame_id)
        frame = ClientFrame(type=kind, id=frame_id)
        if kind == "auth":
            token = obj.get("token")
            if not isinstance(token, str) or not token:
                raise FrameError(BadRequest("an auth frame needs a token"), frame_id)
            frame.token = token
        elif kind == "request":
            method, path = obj.get("method"), obj.get("path")
            frame.method = method if isinstance(method, str) else ""
            frame.path = path if isinstance(path, str) else ""
            frame.headers = self._strings(obj.get("headers"), "headers", frame_id)
            frame.query = self._strings(obj.get("query"), "query", frame_id)
            body = obj.get("body")
            if body is not None:
                frame.body = fastjson.dumps(body)
                frame.body_value = body
            return _check_request(frame)
        elif kind in ("subscribe", "unsubscribe"):
            topic = obj.get("topic")
            frame.topic = topic if isinstance(topic, str) else ""
            return _check_topic(frame)
        return frame

    @staticmethod
    def _strings(value: Any, name: str, frame_id: Any) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise FrameError(BadRequest(f"{name} is an object of strings"), frame_id)
        return value

    @staticmethod
    def _dump(obj: dict[str, Any]) -> bytes:
        return fastjson.dumps(obj)

    @staticmethod
    def _with_id(obj: dict[str, Any], frame_id: Any) -> dict[str, Any]:
        if frame_id is not None:
            obj["id"] = frame_id
        return obj

    def welcome(self, session_id: str, settings: WebSocketSection, authenticated: bool) -> bytes:
        return self._dump({
            "type": "welcome", "version": PROTOCOL_VERSION, "session_id": session_id,
            "auth_timeout": settings.auth_timeout, "idle_timeout": settings.idle_timeout,
            "max_message_size": settings.max_message_size, "authenticated": authenticated,
        })

    def auth_success(self, principal: Principal, session_id: str, frame_id: Any) -> bytes:
        return self._dump(self._with_id({
            "type": "auth_success", "subject": principal.subject,
            "roles": list(principal.roles), "session_id": session_id,
            "expires_at": principal.expires_at or None,
        }, frame_id))

    def response(self, frame_id: Any, request_id: str, response: Response) -> bytes:
        obj: dict[str, Any] = {"type": "response", "id": frame_id, "status": response.status,
                               "request_id": request_id, "body": _body_value(response)}
        if response.headers:
            obj["headers"] = session_layer.frame_headers(response.headers)
        return self._dump(obj)

    def chunk(self, frame_id: Any, status: int, body: bytes) -> bytes:
        value: Any
        try:
            value = fastjson.loads(body) if body else None
        except ValueError:
            value = body.decode("utf-8", "replace")
        return self._dump({"type": "chunk", "id": frame_id, "status": status, "body": value})

    def subscription(self, kind: str, topic: str, frame_id: Any, reason: str = "") -> bytes:
        obj = self._with_id({"type": kind, "topic": topic}, frame_id)
        if reason:
            obj["reason"] = reason
        return self._dump(obj)

    def event(self, event: Event) -> bytes:
        return event.frame("json", lambda e: self._dump(
            {"type": "event", "topic": e.topic, "body": e.json_body()}))

    def heartbeat_ack(self, frame_id: Any, now: float) -> bytes:
        return self._dump(self._with_id({"type": "heartbeat_ack", "time": now}, frame_id))

    def error(self, frame_id: Any, problem: dict[str, Any]) -> bytes:
        return self._dump(self._with_id({"type": "error", "problem": problem}, frame_id))

    def auth_ended(self, kind: str, problem: dict[str, Any]) -> bytes:
        return self._dump({"type": kind, "problem": problem})


class ProtoCodec:
    """Binary ``SocketFrame`` messages (subprotocol ``aico.v1.proto``)."""

    binary = True
    name = "proto"

    def decode(self, payload: bytes, is_binary: bool) -> ClientFrame:
        if not is_binary:
            raise FrameError(BadRequest(f"the {SUBPROTOCOL_PROTO} subprotocol uses binary frames"))
        msg = SocketFrame()
        try:
            msg.ParseFromString(payload)
        except DecodeError as e:
            raise FrameError(BadRequest("the frame is not a SocketFrame")) from e
        kind = msg.WhichOneof("frame")
        if kind is None:
            raise FrameError(BadRequest("the frame has no type"))
        if kind not in _CLIENT_TYPES:
            raise FrameError(BadRequest(f"{kind!r} is not a client frame"))
        if kind == "auth":
            if not msg.auth.token:
                raise FrameError(BadRequest("an auth frame needs a token"))
            return ClientFrame(type=kind, token=msg.auth.token)
        if kind == "request":
            r = msg.request
            frame = ClientFrame(type=kind, id=r.request_id or None, method=r.method, path=r.path,
                                body=r.body, headers=dict(r.headers), query=dict(r.query))
            return _check_request(frame)
        if kind in ("subscribe", "unsubscribe"):
            t = getattr(msg, kind)
            return _check_topic(ClientFrame(type=kind, id=t.id or None, topic=t.topic))
        return ClientFrame(type=kind, id=msg.heartbeat.id or None)

    @staticmethod
    def _id(frame_id: Any) -> str:
        return "" if frame_id is None else str(frame_id)

    def welcome(self, session_id: str, settings: WebSocketSection, authenticated: bool) -> bytes:
        f = SocketFrame()
        w = f.welcome
        w.session_id, w.version = session_id, PROTOCOL_VERSION
        w.auth_timeout, w.idle_timeout = settings.auth_timeout, settings.idle_timeout
        w.max_message_size, w.authenticated = settings.max_message_size, authenticated
        return f.SerializeToString()

    def auth_success(self, principal: Principal, session_id: str, frame_id: Any) -> bytes:
        f = SocketFrame()
        a = f.auth_success
        a.subject, a.session_id, a.expires_at = principal.subject, session_id, principal.expires_at
        a.roles.extend(principal.roles)
        return f.SerializeToString()

    def response(self, frame_id: Any, request_id: str, response: Response) -> bytes:
        f = SocketFrame()
        self._fill(f.response, frame_id, response.status, response.body)
        f.response.headers.update(session_layer.frame_headers(response.headers))
        f.response.headers["content-type"] = response.content_type
        f.response.headers["x-request-id"] = request_id
        return f.SerializeToString()

    def chunk(self, frame_id: Any, status: int, body: bytes) -> bytes:
        f = SocketFrame()
        self._fill(f.chunk, frame_id, status, body)
        return f.SerializeToString()

    def _fill(self, out: ApiResponse, frame_id: Any, status: int, body: bytes) -> None:
        out.request_id, out.status, out.body = self._id(frame_id), status, body

    def subscription(self, kind: str, topic: str, frame_id: Any, reason: str = "") -> bytes:
        f = SocketFrame()
        t = getattr(f, kind)
        t.topic, t.id, t.reason = topic, self._id(frame_id), reason
        return f.SerializeToString()

    def event(self, event: Event) -> bytes:
        def make(e: Event) -> bytes:
            f = SocketFrame()
            f.event.CopyFrom(ApiEvent(topic=e.topic, body=e.body))
            return f.SerializeToString()

        return event.frame("proto", make)

    def heartbeat_ack(self, frame_id: Any, now: float) -> bytes:
        f = SocketFrame()
        f.heartbeat_ack.id = self._id(frame_id)
        return f.SerializeToString()

    def error(self, frame_id: Any, problem: dict[str, Any]) -> bytes:
        f = SocketFrame()
        f.error.id = self._id(frame_id)
        f.error.problem = json.dumps(problem, separators=(",", ":")).encode()
        return f.SerializeToString()

    def auth_ended(self, kind: str, problem: dict[str, Any]) -> bytes:
        f = SocketFrame()
        getattr(f, kind).problem = json.dumps(problem, separators=(",", ":")).encode()
        return f.SerializeToString()


Codec = JsonCodec | ProtoCodec


class SessionInputs(Protocol):
    """What happens to a WebSocket session, and what the session asks of its state.

    The first four are events (they may change the state); the rest are questions, which
    every state answers without changing. An event a state does not declare is refused
    with :class:`automat.NoTransition` (a bug in the caller: e.g. ``opened`` twice, or
    ``token_ended`` on a socket that holds no token). Once ``closed``, the late events a
    closing socket can still meet (an auth check answering, a token expiring, a second
    close) are ignored and answered ``False``.
    """

    def opened(self) -> None:
        """The handshake finished: connecting → anonymous."""

    def token_accepted(self) -> bool:
        """A token was accepted: anonymous / authenticated / auth_lost → authenticated.

        ``True`` if the session now acts on it; ``False`` (ignored) once closed.
        """

    def token_ended(self) -> bool:
        """The token expired or was revoked: authenticated → auth_lost.

        ``True`` if the session lost its authentication; ``False`` (ignored) once closed.
        """

    def closed(self) -> bool:
        """The socket closed: any state → closed.

        ``True`` if the session had opened (the connection manager knows it), ``False``
        if it never opened or was closed already.
        """

    def may_handle_frames(self) -> bool:
        """Is a client frame acted on (anonymous, authenticated, auth_lost)?"""

    def is_closed(self) -> bool:
        """Has the socket closed?"""

    def auth_timer_applies(self) -> bool:
        """Does the auth timeout close the socket now (anonymous, auth_lost)?"""

    def state_name(self) -> str:
        """The state's name (``connecting``, ``anonymous``, ``authenticated``, …)."""


def _problem_error(response: Response) -> ApiError:
    """An :class:`ApiError` that answers as *response* (a problem of the chain) does."""
    problem = problem_of(response)

    class Refused(ApiError):
        status = response.status
        code = str(problem.get("code", "bad_request"))
        title = str(problem.get("title", "Bad request"))

    extra = {k: v for k, v in problem.items()
             if k not in ("type", "title", "status", "detail", "code", "request_id")}
    return Refused(str(problem.get("detail", "")), headers=dict(response.headers), extra=extra)


class _NoCore:
    """The machine only decides; the session acts on its answers, so it needs no core."""


def _build_session_machine() -> TypeMachine[SessionInputs, _NoCore]:
    builder = TypeMachineBuilder(SessionInputs, _NoCore)
    connecting = builder.state("connecting")  # the first state is the initial one
    anonymous = builder.state("anonymous")
    authenticated = builder.state("authenticated")
    auth_lost = builder.state("auth_lost")
    closed = builder.state("closed")
    live = (anonymous, authenticated, auth_lost)

    # -- events (docs/protocols.md §1.3) --
    connecting.upon(SessionInputs.opened).to(anonymous).returns(None)
    for state in live:
        state.upon(SessionInputs.token_accepted).to(authenticated).returns(True)
    authenticated.upon(SessionInputs.token_ended).to(auth_lost).returns(True)
    connecting.upon(SessionInputs.closed).to(closed).returns(False)
    for state in live:
        state.upon(SessionInputs.closed).to(closed).returns(True)
    closed.upon(SessionInputs.token_accepted).loop().returns(False)
    closed.upon(SessionInputs.token_ended).loop().returns(False)
    closed.upon(SessionInputs.closed).loop().returns(False)

    # -- questions: name, may handle frames, is closed, auth timer applies --
    answers = (
        (connecting, "connecting", False, False, False),
        (anonymous, "anonymous", True, False, True),
        (authenticated, "authenticated", True, False, False),
        (auth_lost, "auth_lost", True, False, True),
        (closed, "closed", False, True, False),
    )
    for state, name, frames, is_closed, auth_timer in answers:
        state.upon(SessionInputs.state_name).loop().returns(name)
        state.upon(SessionInputs.may_handle_frames).loop().returns(frames)
        state.upon(SessionInputs.is_closed).loop().returns(is_closed)
        state.upon(SessionInputs.auth_timer_applies).loop().returns(auth_timer)
    return builder.build()


#: The session state machine's factory (see :class:`SessionInputs`).
SessionMachine = _build_session_machine()


def session_machine() -> SessionInputs:
    """A new session state machine, in ``connecting``."""
    return SessionMachine(_NoCore())


#: Autobahn's protocol module, whose ``pformat`` name :meth:`WebSocketSession._connectionMade`
#: swaps (an attribute it imports, not one it exports).
_AUTOBAHN: Any = autobahn_protocol
_pformat = _AUTOBAHN.pformat


def _unformatted(obj: object, *args: Any, **kwargs: Any) -> str:
    """What replaces ``pformat`` for a debug line nobody will see."""
    return ""


def _autobahn_debug_off(log: Any) -> bool:
    """True when Autobahn's (txaio's) logger drops debug lines: txaio binds a disabled
    level's method to its no-op function. Anything else (a txaio that works otherwise)
    counts as on, and nothing is skipped."""
    return getattr(log, "debug", None) is getattr(txaio.tx, "_no_op", object())


@implementer(IConnection, IPushProducer)
class WebSocketSession(WholeFrames, WebSocketServerProtocol):  # type: ignore[misc]
    """One WebSocket connection (see the module docstring for its states).

    Requests, authentication, subscriptions and fair share are the session layer's
    (:class:`~aico.gateway.adapters.session.Session`, in :attr:`core`); this class
    decodes frames, encodes answers, runs the socket's states and timers and its
    outgoing flow control.
    """

    #: Ours: Autobahn's own ``log`` (txaio, info level) must stay, since its debug lines
    #: include the upgrade request's headers — the bearer token among them.
    _log = Logger()
    factory: GatewayWebSocketFactory
    #: Mirrors the machine's leaving ``connecting`` (set in :meth:`onOpen`); a class
    #: default, so an idle socket pays nothing for it until it opens.
    _opened = False

    def _connectionMade(self) -> None:
        # Autobahn pretty-prints its ~35 options (pprint.pformat) for a debug line on every
        # new socket, whether its debug level is on or not: 27 % of an upgrade's CPU time
        # (~0.65 ms; docs/performance.md). With that level off (always, unless an operator
        # turns txaio's debug on), the line is dropped anyway: the formatting is skipped
        # for this one call. The name is swapped in the reactor thread for the duration of
        # Autobahn's synchronous set-up, which calls nothing of ours.
        if not _autobahn_debug_off(self.log):
            super()._connectionMade()
            return
        _AUTOBAHN.pformat = _unformatted
        try:
            super()._connectionMade()
        finally:
            _AUTOBAHN.pformat = _pformat

    def __init__(self) -> None:
        super().__init__()
        self.codec: Codec = JsonCodec()
        self.info = ConnectionInfo(transport="websocket", peer="", since=0.0)
        self._machine = session_machine()
        #: Mirrors the machine's ``closed`` state for the per-frame send path, where asking
        #: the machine (an Automat call, ~4 µs) on every frame would cost too much; set only
        #: where the machine makes that transition (:meth:`_closed`).
        self._ended = False
        self.token = ""
        self.lost: ApiError | None = None
        self.close_code: int | None = None
        self._upgrade_principal: Principal | None = None
        self._auth_timer: IDelayedCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self._paused = False
        # A list, not a deque: an empty deque costs 624 bytes on every idle socket, and
        # this queue holds frames only while the client does not read (bounded).
        self._queue: list[bytes] = []
        self._queued = 0
        #: While the transport's buffer is full, only the latest ping is answered once it
        #: drains (RFC 6455 §5.5.3), but every pong owed counts toward ``send_buffer``.
        self._pong: bytes | None = None
        self._pong_owed = 0
        #: The gateway's own refusal of the upgrade (see :meth:`failHandshake`).
        self._deny: ApiError | None = None
        #: Largest number of bytes ever queued on this socket (for tests and metrics).
        self.max_queued = 0
        self._streams: dict[int, Any] = {}
        self.core: Session | None = None
        #: True while the session layer holds reading back (fair share).
        self.reading_paused = False

    @property
    def session_state(self) -> str:
        """The state's name (``connecting``, ``anonymous``, ``authenticated``, ``auth_lost``,
        ``closed``), for tests and listings; the machine itself decides."""
        return self._machine.state_name()

    # -- handshake ---------------------------------------------------------------------

    def _make_core(self, host: str) -> Session:
        f = self.factory
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        peer_host = getattr(peer, "host", "") or ""
        self.info.transport = f.transport_name
        self.info.peer = f"{peer_host}:{getattr(peer, 'port', '')}"
        if f.device_id_of is not None:
            self.info.device_id = f.device_id_of(self.transport)
        return Session(f.services, self, self, name=f.transport_name, peer_host=peer_host,
                       loopback=is_loopback(peer_host), host=host)

    def _refuse(self, error: ApiError) -> ConnectionDeny:
        """Refuse the upgrade with *error* (answered by :meth:`failHandshake`)."""
        self._deny = error
        return ConnectionDeny(error.status, error.detail)  # type: ignore[no-untyped-call]

    def onConnect(self, request: ConnectionRequest) -> Any:
        protocols = list(request.protocols or [])
        chosen: str | None = None
        if SUBPROTOCOL_PROTO in protocols:
            self.codec, chosen = ProtoCodec(), SUBPROTOCOL_PROTO
        elif SUBPROTOCOL_JSON in protocols:
            chosen = SUBPROTOCOL_JSON
        elif protocols:
            # Only unknown ones: an upgrade without a subprotocol would be aborted by a
            # browser anyway; say which ones the gateway speaks.
            raise self._refuse(_subprotocol_error())
        self.core = core = self._make_core(str(request.headers.get("host", "")))
        header = request.headers.get("authorization")
        if not header:
            # WSS: a device's socket is authenticated by its certificate from the start.
            f = self.factory
            if f.device_principal is not None and self.info.device_id:
                self._upgrade_principal = f.device_principal(self.info.device_id)
            return chosen, {}
        scheme, _, token = str(header).strip().partition(" ")
        # A malformed header goes through the chain as well (an empty token): it is
        # refused as on REST, and charged to the rate limiter like any refused token.
        token = token.strip() if scheme.lower() == "bearer" else ""

        def decided(outcome: tuple[Principal | None, Response]) -> tuple[str | None, dict[str, str]]:
            principal, response = outcome
            if principal is None:
                raise self._refuse(_problem_error(response))
            self._upgrade_principal = principal
            self.token = token
            return chosen, {}

        return core.authenticate(token).addCallback(decided)

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """Every refused upgrade is answered like any gateway error: problem+json with
        the gateway's code and an ``X-Request-ID``, one access-log line, and nothing of
        what the client sent echoed back (Autobahn's own answer is a bare status line
        quoting it)."""
        error, self._deny = self._deny or _handshake_error(reason, code), None
        self.wasNotCleanReason = error.detail
        sent: dict[str, str] = getattr(self, "http_headers", None) or {}
        request_id = request_id_from(sent.get("x-request-id"))
        body = problem_body(error, request_id)
        lines = [f"HTTP/1.1 {error.status} {error.title}", f"Server: {SERVER_NAME}",
                 f"Content-Type: {PROBLEM_CONTENT_TYPE}", "Cache-Control: no-store",
                 f"X-Request-ID: {request_id}"]
        lines += [f"{name}: {value}" for name, value in error.headers.items()]
        lines += ["Connection: close", f"Content-Length: {len(body)}"]
        self.sendData(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        f = self.factory
        peer = getattr(self.transport.getPeer(), "host", "") if self.transport else ""
        path = getattr(self, "http_request_path", "") or "/ws"
        f.services.dispatcher.finished(
            Request(method="GET", path=path, request_id=request_id, transport=f.transport_name,
                    peer_host=peer, loopback=is_loopback(peer)),
            error.status, len(body))
        self.dropConnection(abort=False)

    def onOpen(self) -> None:
        f = self.factory
        assert self.core is not None
        self.info.since = f.clock.seconds()
        self._take_producer()
        self._machine.opened()
        self._opened = True
        f.connections.add(self)
        # The opening handshake is done: Autobahn does not read its copy of the request
        # again, so an idle socket does not keep it (~1 KiB).
        self.http_request_data = b""
        self.http_headers = {}
        settings = f.settings()
        self._emit(self.codec.welcome(self.info.id, settings, self._upgrade_principal is not None))
        if self._upgrade_principal is not None:
            self._authenticated(self._upgrade_principal, None)
            self._upgrade_principal = None
        else:
            self._arm_auth_timer()
        self._idle_timer = f.clock.callLater(settings.idle_timeout, self._idle)

    def _take_producer(self) -> None:
        transport: Any = self.transport
        try:
            if getattr(transport, "producer", None) is not None:
                transport.unregisterProducer()  # twisted.web's HTTP channel, now gone
            transport.registerProducer(self, True)
        except (AttributeError, RuntimeError):
            self._log.warn("websocket {id}: no flow control on this transport", id=self.info.id)

    # -- SessionTransport (fair share: the session layer holds reading back) -------------

    def pause_reading(self) -> None:
        self.reading_paused = True
        transport: Any = self.transport
        if transport is not None:
            transport.pauseProducing()

    def resume_reading(self) -> None:
        self.reading_paused = False
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self.factory.settings().idle_timeout)
        transport: Any = self.transport
        if transport is not None and not self._ended:
            transport.resumeProducing()

    # -- IPushProducer (the TCP transport tells us when its buffer is full) -------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        binary = self.codec.binary
        while self._queue and not self._paused and not self._ended:
            payload = self._queue.pop(0)
            self._queued -= len(payload)
            self.sendMessage(payload, isBinary=binary)  # type: ignore[no-untyped-call]
        if self._pong is not None and not self._paused and not self._queue and not self._ended:
            pong, self._pong, self._pong_owed = self._pong, None, 0
            self.sendPong(pong)  # type: ignore[no-untyped-call]

    def stopProducing(self) -> None:
        self._paused = True

    # -- sending -----------------------------------------------------------------------

    def _emit(self, payload: bytes) -> None:
        if self._ended or self.close_code is not None:
            return
        self.info.bytes_out += len(payload)
        self.info.messages_out += 1
        if self._paused or self._queue:
            self._queue.append(payload)
            self._queued += len(payload)
            if self._queued > self.max_queued:
                self.max_queued = self._queued
            if self._queued + self._pong_owed > self.factory.settings().send_buffer:
                self._slow_consumer()
            return
        self.send_whole(payload, self.codec.binary)

    def _slow_consumer(self) -> None:
        self._log.warn("websocket {id} ({peer}) fell behind by {bytes} bytes: dropped",
                      id=self.info.id, peer=self.info.peer, bytes=self._queued)
        self._queue.clear()
        self._queued = 0
        self.close(CLOSE_SLOW_CONSUMER, "slow consumer")

    def _error(self, frame_id: Any, error: ApiError, request_id: str | None = None) -> None:
        self._emit(self.codec.error(frame_id, error.problem(request_id or uuid.uuid4().hex)))

    def _problem(self, frame_id: Any, response: Response) -> None:
        """An error frame from a problem response of the session layer."""
        self._emit(self.codec.error(frame_id, problem_of(response)))

    # -- receiving ---------------------------------------------------------------------

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Autobahn's sendData without the debug line's arguments it builds on every frame
        # (~4 µs), the bytes handed to the socket at once when nothing waits before them
        # (aico.net.write_now): the common case written out, anything else Autobahn's.
        if sync or (chopsize and chopsize > 0) or self.send_queue:
            super().sendData(data, sync, chopsize)
            return
        write_now(self.transport, data)
        if self.state == self.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif self.state in (self.STATE_CONNECTING, self.STATE_PROXY_CONNECTING):
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)
        if self.logOctets:  # type: ignore[attr-defined]
            self.logTxOctets(data, False)

    def frame_limit(self) -> int:
        # Larger messages go through Autobahn's parser and the oversize answer below.
        return self.factory.settings().max_message_size

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        self._oversize = False

    def onMessageFrameBegin(self, length: int) -> None:
        super().onMessageFrameBegin(length)
        if self.message_data_total_length > self.factory.settings().max_message_size:
            self._oversize = True
            self.message_data.clear()

    def onMessageFrameData(self, payload: bytes) -> None:
        if not self._oversize:
            super().onMessageFrameData(payload)

    def onMessageFrameEnd(self) -> None:
        if self._oversize:
            self.frame_data = None  # type: ignore[assignment]
            return
        super().onMessageFrameEnd()

    def onMessageEnd(self) -> None:
        if self._oversize:
            self.message_data = None  # type: ignore[assignment]
            self._oversize = False
            self._touch(self.message_data_total_length)
            limit = self.factory.settings().max_message_size
            self._error(None, PayloadTooLarge(f"a frame may hold at most {limit} bytes"))
            return
        super().onMessageEnd()

    def onPing(self, payload: bytes) -> None:
        self._touch(0)
        if self._ended or self.close_code is not None:
            return
        if not self._paused and not self._queue:
            super().onPing(payload)
            return
        # The transport's buffer is full (the client is not reading): a pong written now
        # would pile up in it without bound. Keep only the latest (RFC 6455 §5.5.3 lets
        # an endpoint answer just the most recent ping), sent once the buffer drains, and
        # count every pong owed toward send_buffer: a flood of pings from a client that
        # does not read is closed as a policy violation.
        self._pong = payload
        self._pong_owed += len(payload) + _PONG_OVERHEAD
        if self._queued + self._pong_owed > self.factory.settings().send_buffer:
            self._log.warn("websocket {id} ({peer}) sent {bytes} bytes of pings without "
                           "reading the pongs: closed", id=self.info.id, peer=self.info.peer,
                           bytes=self._pong_owed)
            self._queue.clear()
            self._queued = 0
            self.close(CLOSE_POLICY, "ping flood")

    def buffered_bytes(self) -> int:
        """What the gateway holds for this socket: the transport's pending write buffer,
        the queued frames and the pong owed (for tests and metrics)."""
        transport: Any = self.transport
        pending = 0
        if transport is not None:
            data_buffer = getattr(transport, "dataBuffer", b"")
            pending = (len(data_buffer) - int(getattr(transport, "offset", 0))
                       + int(getattr(transport, "_tempDataLen", 0)))
            pending += int(getattr(transport, "pending", 0))  # the in-memory transport
        return pending + self._queued + (len(self._pong) + _PONG_OVERHEAD if self._pong else 0)

    def _touch(self, size: int) -> None:
        self.info.bytes_in += size
        self.info.messages_in += 1
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self.factory.settings().idle_timeout)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self._touch(len(payload))
        # The machine's may_handle_frames (anonymous, authenticated, auth_lost) is "opened
        # and not closed": mirrored here rather than asked per frame (tests check both).
        if not self._opened or self._ended:
            return
        try:
            frame = self.codec.decode(payload, isBinary)
        except FrameError as e:
            self._error(e.frame_id, e.error)
            return
        try:
            self._handle_frame(frame)
        except ApiError as e:
            self._error(frame.id, e)
        except Exception as e:  # a bad frame must never end the socket
            self._log.failure("websocket {id}: frame handling failed", id=self.info.id)
            self._error(frame.id, to_api_error(e))

    def _handle_frame(self, frame: ClientFrame) -> None:
        if frame.type == "request":
            self._request(frame)
        elif frame.type == "auth":
            self._auth(frame)
        elif frame.type == "subscribe":
            self._subscribe(frame)
        elif frame.type == "unsubscribe":
            self._unsubscribe(frame)
        else:
            self._emit(self.codec.heartbeat_ack(frame.id, self.factory.clock.seconds()))

    # -- authentication ----------------------------------------------------------------

    def _auth(self, frame: ClientFrame) -> None:
        assert self.core is not None
        core = self.core

        def decided(outcome: tuple[Principal | None, Response]) -> None:
            principal, response = outcome
            if self._machine.is_closed():
                return
            if principal is None:
                self._problem(frame.id, response)
                core.refused(response)
                return
            current = self.info.principal
            if current is not None and current.subject != principal.subject:
                self._error(frame.id, Forbidden("a socket cannot change its subject"))
                return
            self.token = frame.token
            self._authenticated(principal, frame.id)

        core.authenticate(frame.token).addCallback(decided)

    def _authenticated(self, principal: Principal, frame_id: Any) -> None:
        f = self.factory
        if not self._machine.token_accepted():
            return
        self.lost = None
        self._cancel_auth_timer()
        f.connections.authenticated(self, principal)
        # Capabilities may have changed with the new token: keep only what is still allowed.
        for topic in sorted(self.info.subscriptions):
            if not may_subscribe(principal, topic):
                f.connections.unsubscribe(self, topic)
                self._emit(self.codec.subscription("unsubscribed", topic, None, "forbidden"))
        self._emit(self.codec.auth_success(principal, self.info.id, frame_id))

    def auth_ended(self, error: ApiError) -> None:
        """IConnection: the token expired or was revoked (the manager forgot it already)."""
        if not self._machine.token_ended():
            return
        self.token = ""
        self.lost = error
        kind = "auth_expired" if error.code == "token_expired" else "auth_revoked"
        self._emit(self.codec.auth_ended(kind, error.problem(uuid.uuid4().hex)))
        self._arm_auth_timer()

    def _arm_auth_timer(self) -> None:
        self._cancel_auth_timer()
        f = self.factory
        self._auth_timer = f.clock.callLater(f.settings().auth_timeout, self._auth_timeout)

    def _cancel_auth_timer(self) -> None:
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        self._auth_timer = None

    def _auth_timeout(self) -> None:
        self._auth_timer = None
        if self._machine.auth_timer_applies():
            self.close(CLOSE_AUTH_TIMEOUT, "authentication timeout")

    def _idle(self) -> None:
        self._idle_timer = None
        if self.reading_paused:
            # The gateway holds this socket's reading back (fair share): its frames wait
            # unread, so silence says nothing about the client. The clock starts again
            # when reading resumes.
            self._idle_timer = self.factory.clock.callLater(
                self.factory.settings().idle_timeout, self._idle)
            return
        self.close(CLOSE_IDLE_TIMEOUT, "idle timeout")

    # -- requests ----------------------------------------------------------------------

    def _request(self, frame: ClientFrame) -> None:
        if self.lost is not None:
            self._error(frame.id, self.lost)
            return
        assert self.core is not None
        request = self.core.build_request(
            frame.method, frame.path, headers=frame.headers, query=frame.query, body=frame.body,
            token=self.token)
        if frame.body and frame.body_value is not None:
            # A JSON frame was read with the chain's strict decoder: validation checks
            # that value rather than reading the body's bytes again.
            request.body_value = frame.body_value
        frame_id = frame.id
        # Never refused: a WebSocket's requests wait while its reading is held back.
        self.core.dispatch(request, lambda response: self._respond(response, frame_id, request))

    def _respond(self, response: Response, frame_id: Any, request: Request) -> Deferred[None] | None:
        if response.stream is None:
            self._emit(self.codec.response(frame_id, request.request_id, response))
            return None
        key = id(response.stream)
        self._streams[key] = response.stream
        status = response.status

        def on_chunk(chunk: bytes) -> None:
            self._emit(self.codec.chunk(frame_id, status, chunk))

        def ended() -> None:
            self._emit(self.codec.response(frame_id, request.request_id,
                                           Response(status=status, body=b"")))

        def broke(failure: Failure) -> None:
            problem = self.factory.services.dispatcher.convert(failure, request)
            self._emit(self.codec.response(frame_id, request.request_id, problem))

        d = relay_stream(response, on_chunk, ended, broke)
        return d.addBoth(lambda _: self._streams.pop(key, None) and None)

    # -- subscriptions -----------------------------------------------------------------

    def _subscribe(self, frame: ClientFrame) -> None:
        if self.lost is not None:
            self._error(frame.id, self.lost)
            return
        assert self.core is not None
        core = self.core

        def answered(response: Response) -> None:
            if response.status == 200:
                self._emit(self.codec.subscription("subscribed", frame.topic, frame.id))
            else:
                self._problem(frame.id, response)
                core.refused(response)

        core.subscribe(frame.topic, self._authorization()).addCallback(answered)

    def _unsubscribe(self, frame: ClientFrame) -> None:
        assert self.core is not None
        core = self.core

        def answered(response: Response) -> None:
            if response.status == 200:
                self._emit(self.codec.subscription("unsubscribed", frame.topic, frame.id))
            else:
                self._problem(frame.id, response)
                core.refused(response)

        core.unsubscribe(frame.topic, self._authorization()).addCallback(answered)

    def _authorization(self) -> str | None:
        return "Bearer " + self.token if self.token else None

    def deliver(self, event: Event) -> None:
        """IConnection: an event on a topic this socket subscribed to."""
        self._emit(self.codec.event(event))

    # -- closing -----------------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """IConnection: close with *code* (see the module's ``CLOSE_*``)."""
        if self._machine.is_closed() or self.close_code is not None:
            return
        self.close_code = code
        self._queue.clear()
        self._queued = 0
        self._pong, self._pong_owed = None, 0
        self._paused = False
        # sendClose() refuses 1001 (going away); the frame itself is fine for a server.
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._closed()

    def _closed(self) -> None:
        if self._machine.is_closed():
            return
        was_open = self._machine.closed()
        self._ended = True
        if self.core is not None:
            self.core.close()
        self._cancel_auth_timer()
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        self._queue.clear()
        self._queued = 0
        for stream in list(self._streams.values()):
            stream.cancel()
        self._streams.clear()
        if was_open:
            self.factory.connections.remove(self)


class GatewayWebSocketFactory(WebSocketServerFactory):
    """Builds :class:`WebSocketSession` s sharing the gateway's session services."""

    protocol = WebSocketSession  # type: ignore[assignment]

    def __init__(
        self,
        services: SessionServices,
        settings: Callable[[], WebSocketSection],
        *,
        transport_name: str = "websocket",
        device_id_of: Callable[[Any], str] | None = None,
        device_principal: Callable[[str], Principal | None] | None = None,
    ) -> None:
        super().__init__(server=SERVER_NAME)  # type: ignore[no-untyped-call]
        #: WSS: the principal of a device that opens a socket without a token.
        self.device_principal = device_principal
        self.services = services
        self.connections = services.connections
        self.settings = settings
        self.clock = services.clock
        self.transport_name = transport_name
        self.device_id_of = device_id_of
        # Sizes are enforced by the session (an oversized frame is answered, not fatal).
        self.setProtocolOptions(  # type: ignore[no-untyped-call]
            maxMessagePayloadSize=0,
            maxFramePayloadSize=0,
            closeHandshakeTimeout=1.0,
            openHandshakeTimeout=10.0,
            echoCloseCodeReason=True,
            # No status page on a plain GET (the REST adapter answers it), and only the
            # configured browser origins: a web page elsewhere cannot drive the gateway.
            webStatus=False,
            allowedOrigins=list(settings().allowed_origins),
            versions=[13],  # RFC 6455 only, not the drafts (hybi-10, version 8)
        )
        self._share_options()

    def _share_options(self) -> None:
        """Make the protocol options class attributes of this factory's own protocol
        class (call again after any later ``setProtocolOptions``).

        Autobahn copies each of its ~35 options from the factory into every protocol
        instance it connects, unless the instance already has the attribute; a class
        attribute counts, so the sockets share one copy. That is ~2 KiB less per idle
        socket (a smaller instance dict; docs/performance.md, "Idle WebSocket memory"),
        with the same values and the same snapshot semantics (a socket keeps the class
        it was built with)."""
        base = type(self).protocol
        # A function option (``perMessageCompressionAccept``) stays a plain function.
        shared = {attr: staticmethod(value) if isinstance(value, FunctionType) else value
                  for attr in base.CONFIG_ATTRS for value in (getattr(self, attr),)}
        self.protocol = type(base.__name__, (base,), shared)  # type: ignore[assignment]

    def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "gateway stopping") -> int:
        """Close every WebSocket this factory made (at shutdown); their count."""
        sessions = [c for c in self.connections if isinstance(c, WebSocketSession)
                    and c.factory is self]
        for session in sessions:
            session.close(code, reason)
        return len(sessions)


def websocket_resource(
    services: SessionServices,
    settings: Callable[[], WebSocketSection],
    *,
    transport_name: str = "websocket",
    device_id_of: Callable[[Any], str] | None = None,
    device_principal: Callable[[str], Principal | None] | None = None,
) -> tuple[IResource, GatewayWebSocketFactory]:
    """The resource to mount at ``/ws`` (``RestAdapter(websocket=...)``) and its factory."""
    wsmask.install()
    factory = GatewayWebSocketFactory(services, settings, transport_name=transport_name,
                                      device_id_of=device_id_of,
                                      device_principal=device_principal)
    resource: IResource = WebSocketResource(factory)  # type: ignore[no-untyped-call]
    return resource, factory
