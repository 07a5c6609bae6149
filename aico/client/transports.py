"""The transports of ``aico.client``: ZeroMQ IPC (DEALER), WebSocket (Autobahn; WSS with
mutual TLS in detached mode) and HTTPS (treq, detached mode, requests only).

Both speak the gateway's wire contract (docs/protocols.md) and offer the same small
surface to :class:`aico.client.connect.Client`: ``request``, ``subscribe``,
``unsubscribe``, ``close``, an ``on_event(topic, body)`` hook, an ``on_notice(kind,
problem)`` hook for ``auth_expired``/``auth_revoked``, and ``on_lost`` when the
connection is gone. Only ``aico.proto`` is shared with the server.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from google.protobuf.message import DecodeError
from treq import content as read_body
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from aico.proto import AicoMessage, ApiEvent, ApiRequest, ApiResponse, EnvelopeError, unpack, wrap
from aico.zmqreactor import SocketReader

EventHandler = Callable[[str, bytes], None]
NoticeHandler = Callable[[str, dict[str, Any]], None]


class ClientError(Exception):
    """A request could not be made (no connection, timeout); not an HTTP error status."""


class TransportUnavailable(ClientError):
    """A transport could not be reached (connect() then tries the next one)."""


@dataclass
class ClientResponse:
    """A gateway response, the same whatever the transport."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def ok(self) -> bool:
        return self.status < 400


def load_server_key(path: Path) -> bytes:
    """The Z85 public key of the gateway certificate at *path* (``curve/gateway.key``)."""
    public, _ = zmq.auth.load_certificate(path)
    return public


def _problem(value: bytes) -> dict[str, Any]:
    try:
        out = json.loads(value)
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


class _Base:
    name = ""

    def __init__(self) -> None:
        self.on_event: EventHandler = lambda topic, body: None
        self.on_notice: NoticeHandler = lambda kind, problem: None
        self.on_lost: Callable[[], None] = lambda: None


# --------------------------------------------------------------------------- IPC


class IpcTransport(_Base):
    """A DEALER on ``ipc://`` or the TCP fallback, Curve client of the gateway's key.

    Its routing id is fixed for its lifetime, so the gateway keeps its subscriptions
    across libzmq's automatic reconnects (100 ms, backing off to 5 s).
    """

    log = Logger()

    def __init__(self, reactor: Any, endpoint: str, server_key: bytes | None, *,
                 name: str = "ipc") -> None:
        super().__init__()
        self.reactor = reactor
        self.endpoint = endpoint
        self.name = name
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = self._sock = self._context.socket(zmq.DEALER)
        sock.linger = 0
        sock.routing_id = uuid.uuid4().bytes
        sock.reconnect_ivl = 100
        sock.reconnect_ivl_max = 5000
        if server_key is not None:
            public, secret = zmq.curve_keypair()
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = server_key
        sock.connect(endpoint)
        self._pending: dict[str, tuple[Deferred[ClientResponse], IDelayedCall, list[bytes], float]] = {}
        self._reader = SocketReader(reactor, sock, self._received, "aico-client-ipc")

    @property
    def _closed(self) -> bool:
        return self._reader.closed

    def _received(self, frames: list[bytes]) -> None:
        if len(frames) != 1:
            return
        message = AicoMessage()
        try:
            message.ParseFromString(frames[0])
        except DecodeError:
            return
        attrs = message.metadata.attributes
        if message.any_payload.TypeName() == ApiEvent.DESCRIPTOR.full_name:
            event = unpack(message, ApiEvent)
            self.on_event(event.topic, event.body)
            return
        try:
            response = unpack(message, ApiResponse)
        except EnvelopeError:
            return
        notice = attrs.get("notice")
        if notice:
            self.on_notice(notice, _problem(response.body))
            return
        entry = self._pending.get(attrs.get("correlation_id", ""))
        if entry is None:
            return
        d, timer, chunks, timeout = entry
        if attrs.get("stream") == "chunk":
            chunks.append(response.body)
            if timer.active():
                timer.reset(timeout)  # every chunk restarts the timeout
            return
        del self._pending[attrs["correlation_id"]]
        if timer.active():
            timer.cancel()
        body = response.body
        if chunks:
            body = b"".join(c + b"\n" for c in [*chunks, *([body] if body else [])])
        d.callback(ClientResponse(response.status, body, dict(response.headers)))

    def request(self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None,
                query: Mapping[str, str] | None = None, timeout: float = 10.0,
                oneway: bool = False) -> Deferred[ClientResponse]:
        if self._closed:
            raise ClientError("the IPC transport is closed")
        api = ApiRequest(request_id=uuid.uuid4().hex, method=method, path=path, body=body)
        api.headers.update(headers or {})
        api.query.update(query or {})
        correlation = uuid.uuid4().hex
        attributes = {"correlation_id": correlation}
        if oneway:
            attributes["oneway"] = "1"
        if (query or {}).get("stream") == "true":
            attributes["stream"] = "1"
        frame = wrap(api, source="aico.client", attributes=attributes).SerializeToString()
        try:
            self._sock.send(frame, zmq.NOBLOCK)
        except zmq.Again as e:
            raise ClientError("the IPC send queue is full") from e
        finally:
            self._reader.kick()
        if oneway:
            return succeed(ClientResponse(202))
        d: Deferred[ClientResponse] = Deferred(lambda _: self._forget(correlation))
        timer = self.reactor.callLater(timeout, self._expire, correlation, timeout)
        self._pending[correlation] = (d, timer, [], timeout)
        return d

    def _forget(self, correlation: str) -> None:
        entry = self._pending.pop(correlation, None)
        if entry is not None and entry[1].active():
            entry[1].cancel()

    def _expire(self, correlation: str, timeout: float) -> None:
        entry = self._pending.pop(correlation, None)
        if entry is not None:
            entry[0].errback(ClientError(f"no answer from {self.endpoint} within {timeout} s"))

    async def _control(self, method: str, topic: str, token: str, timeout: float) -> ClientResponse:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        response = await self.request(method, topic, headers=headers, timeout=timeout)
        if not response.ok:
            raise ClientError(f"{method} {topic} refused: {response.status} "
                              f"{(response.json() or {}).get('code', '')}")
        return response

    def subscribe(self, topic: str, token: str, timeout: float = 10.0) -> Deferred[ClientResponse]:
        return Deferred.fromCoroutine(self._control("SUBSCRIBE", topic, token, timeout))

    def unsubscribe(self, topic: str, timeout: float = 10.0) -> Deferred[ClientResponse]:
        return Deferred.fromCoroutine(self._control("UNSUBSCRIBE", topic, "", timeout))

    def heartbeat(self, timeout: float = 1.0) -> Deferred[ClientResponse]:
        return self.request("HEARTBEAT", "/", timeout=timeout)

    def close(self) -> Deferred[None]:
        if not self._closed:
            self._reader.close()
            for correlation in list(self._pending):
                d, timer, _, _ = self._pending.pop(correlation)
                if timer.active():
                    timer.cancel()
                d.errback(ClientError("the client was closed"))
            self._sock.close(0)
            self._context.term()
        return succeed(None)


# --------------------------------------------------------------------------- WebSocket


class _WsProtocol(WebSocketClientProtocol):
    owner: WebSocketTransport

    def onOpen(self) -> None:
        self.owner._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            frame = json.loads(payload)
        except ValueError:
            return
        if isinstance(frame, dict):
            self.owner._frame(frame)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.owner._closed_by_peer(code, reason)


class WebSocketTransport(_Base):
    """A JSON-framed WebSocket to ``/ws`` (Autobahn client)."""

    name = "websocket"
    log = Logger()

    def __init__(self, reactor: Any, url: str, token: str = "", *, connect_timeout: float = 5.0,
                 tls: IOpenSSLClientConnectionCreator | None = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.url = url
        #: Client TLS for ``wss://`` (detached mode: :class:`aico.client.tls.PinnedClientTLS`).
        self.tls = tls
        if tls is not None:
            self.name = "wss"
        self.token = token
        self.connect_timeout = connect_timeout
        self.proto: _WsProtocol | None = None
        self.close_code: int | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[Deferred[Any], IDelayedCall | None, list[bytes]]] = {}
        self._ready: Deferred[WebSocketTransport] = Deferred()
        self._closing = False

    def connect(self) -> Deferred[WebSocketTransport]:
        factory = WebSocketClientFactory(self.url)  # type: ignore[no-untyped-call]
        factory.setProtocolOptions(  # type: ignore[no-untyped-call]
            maxMessagePayloadSize=0, maxFramePayloadSize=0)
        owner = self

        class Proto(_WsProtocol):
            def __init__(self) -> None:
                super().__init__()
                self.owner = owner

        factory.protocol = Proto
        hostport = self.url.split("//", 1)[1].split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        if self.tls is not None:
            self._connector = self.reactor.connectSSL(host.strip("[]"), int(port), factory, self.tls,
                                                      timeout=self.connect_timeout)
        else:
            self._connector = self.reactor.connectTCP(host.strip("[]"), int(port), factory,
                                                      timeout=self.connect_timeout)
        def failed(connector: Any, reason: Failure) -> None:
            self._fail_ready(reason.value or ConnectionError("connection failed"))

        factory.clientConnectionFailed = failed  # type: ignore[method-assign]
        timer = self.reactor.callLater(self.connect_timeout, self._fail_ready,
                                       TransportUnavailable(f"{self.url}: no welcome in time"))
        self._ready.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return self._ready

    def _fail_ready(self, error: BaseException) -> None:
        refused = getattr(self.tls, "last_error", None)  # our pin or name check said no
        if refused is not None:
            error = refused
        if not self._ready.called:
            self._ready.errback(TransportUnavailable(f"{self.url}: {error}"))
            self._connector.disconnect()

    def _opened(self, proto: _WsProtocol) -> None:
        self.proto = proto

    def _send(self, frame: dict[str, Any]) -> None:
        if self.proto is None or self.close_code is not None:
            raise ClientError("the WebSocket is not connected")
        self.proto.sendMessage(json.dumps(frame).encode())  # type: ignore[no-untyped-call]

    def _await(self, frame: dict[str, Any], timeout: float | None) -> Deferred[Any]:
        frame_id = next(self._ids)
        frame["id"] = frame_id
        def cancel(_: Deferred[Any]) -> None:
            self._pending.pop(frame_id, None)

        d: Deferred[Any] = Deferred(cancel)
        timer = None
        if timeout is not None:
            timer = self.reactor.callLater(timeout, self._expire, frame_id, timeout)
        self._pending[frame_id] = (d, timer, [])
        self._send(frame)
        return d

    def _expire(self, frame_id: int, timeout: float) -> None:
        entry = self._pending.pop(frame_id, None)
        if entry is not None:
            entry[0].errback(ClientError(f"no answer on {self.url} within {timeout} s"))

    def _settle(self, frame_id: Any) -> tuple[Deferred[Any], list[bytes]] | None:
        entry = self._pending.pop(frame_id, None) if isinstance(frame_id, int) else None
        if entry is None:
            return None
        d, timer, chunks = entry
        if timer is not None and timer.active():
            timer.cancel()
        return d, chunks

    def _frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "welcome":
            if self.token:
                self._await({"type": "auth", "token": self.token}, self.connect_timeout).addCallbacks(
                    lambda _: self._ready.callback(self) if not self._ready.called else None,
                    lambda f: self._fail_ready(f.value))
            elif not self._ready.called:
                self._ready.callback(self)
        elif kind == "event":
            body = frame.get("body")
            self.on_event(str(frame.get("topic", "")), json.dumps(body).encode())
        elif kind in ("auth_expired", "auth_revoked"):
            self.on_notice(kind, frame.get("problem") or {})
        elif kind == "chunk":
            entry = self._pending.get(frame.get("id"))  # type: ignore[arg-type]
            if entry is not None:
                entry[2].append(json.dumps(frame.get("body")).encode())
        elif kind == "response":
            settled = self._settle(frame.get("id"))
            if settled is not None:
                d, chunks = settled
                body = frame.get("body")
                raw = b"" if body is None else json.dumps(body).encode()
                if chunks:
                    raw = b"".join(c + b"\n" for c in [*chunks, *([raw] if raw else [])])
                d.callback(ClientResponse(int(frame.get("status", 0)), raw,
                                          dict(frame.get("headers") or {})))
        elif kind in ("auth_success", "subscribed", "unsubscribed", "heartbeat_ack"):
            settled = self._settle(frame.get("id"))
            if settled is not None:
                settled[0].callback(frame)
        elif kind == "error":
            settled = self._settle(frame.get("id"))
            problem = frame.get("problem") or {}
            if settled is not None:
                settled[0].errback(ClientError(
                    f"{problem.get('status')} {problem.get('code')}: {problem.get('detail')}"))

    def request(self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None,
                query: Mapping[str, str] | None = None, timeout: float = 10.0,
                oneway: bool = False) -> Deferred[ClientResponse]:
        frame: dict[str, Any] = {"type": "request", "method": method, "path": path}
        if body:
            frame["body"] = json.loads(body)
        if headers:
            frame["headers"] = dict(headers)
        if query:
            frame["query"] = dict(query)
        return self._await(frame, timeout)

    def subscribe(self, topic: str, token: str, timeout: float = 10.0) -> Deferred[Any]:
        return self._await({"type": "subscribe", "topic": topic}, timeout)

    def unsubscribe(self, topic: str, timeout: float = 10.0) -> Deferred[Any]:
        return self._await({"type": "unsubscribe", "topic": topic}, timeout)

    def heartbeat(self, timeout: float = 5.0) -> Deferred[Any]:
        return self._await({"type": "heartbeat"}, timeout)

    def _closed_by_peer(self, code: int | None, reason: str | None) -> None:
        self.close_code = code or 1006
        self._fail_ready(ConnectionError(f"closed: {code} {reason}"))
        for frame_id in list(self._pending):
            settled = self._settle(frame_id)
            if settled is not None:
                settled[0].errback(ClientError(f"the WebSocket closed ({code})"))
        if not self._closing:
            self.on_lost()

    def close(self) -> Deferred[None]:
        self._closing = True
        if self.proto is not None and self.close_code is None:
            done: Deferred[None] = Deferred()
            previous = self.proto.onClose

            def closed(wasClean: bool, code: int | None, reason: str | None) -> None:
                previous(wasClean, code, reason)
                done.callback(None)

            self.proto.onClose = closed  # type: ignore[method-assign,unused-ignore]
            self.proto.sendClose(1000)
            return done
        if self.proto is None and hasattr(self, "_connector"):
            self._connector.disconnect()
        return succeed(None)


# --------------------------------------------------------------------------- HTTPS


def _tls_reason(failure: Failure, policy: Any) -> str:
    """The most telling reason of a failed HTTPS exchange (our pin/name refusal first)."""
    creator = getattr(policy, "last", None)
    error = getattr(creator, "last_error", None)
    if error is not None:
        return str(error)
    value = failure.value
    reasons = getattr(value, "reasons", None)  # ResponseNeverReceived, RequestTransmissionFailed
    if reasons:
        return "; ".join(str(r.value) or r.type.__name__ for r in reasons)
    return str(value) or type(value).__name__


class HttpsTransport(_Base):
    """REST over HTTPS with treq (detached mode): ``request()`` only.

    Events need a socket: :meth:`subscribe` is refused (``connect()`` prefers ``wss``).
    Each request carries ``Authorization: Bearer`` when a token was given.
    """

    name = "https"
    log = Logger()

    def __init__(self, reactor: Any, base_url: str, policy: Any, token: str = "") -> None:
        super().__init__()
        self.reactor = reactor
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.policy = policy
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.retryAutomatically = False
        self._http = HTTPClient(Agent(reactor, contextFactory=policy, pool=self._pool))
        self._closed = False

    async def _request(self, method: str, path: str, body: bytes, headers: Mapping[str, str],
                       query: Mapping[str, str] | None, timeout: float) -> ClientResponse:
        if self._closed:
            raise ClientError("the HTTPS transport is closed")
        hdrs = {k.lower(): v for k, v in headers.items()}
        if self.token:
            hdrs.setdefault("authorization", f"Bearer {self.token}")
        if body:
            hdrs.setdefault("content-type", "application/json")
        sent: dict[bytes | str, bytes | str] = {k: v for k, v in hdrs.items()}
        try:
            response = await self._http.request(
                method, self.base_url + path, data=body or None,
                headers=sent, params=dict(query or {}),
                timeout=timeout)
            raw = await read_body(response)
        except Exception as e:  # treq reports TLS refusals, resets and timeouts alike
            raise TransportUnavailable(f"{self.base_url}: {_tls_reason(Failure(e), self.policy)}") from e
        out = {name.decode("latin-1").lower(): b", ".join(values).decode("latin-1")
               for name, values in response.headers.getAllRawHeaders()}
        return ClientResponse(int(response.code), raw, out)

    def request(self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None,
                query: Mapping[str, str] | None = None, timeout: float = 10.0,
                oneway: bool = False) -> Deferred[ClientResponse]:
        return Deferred.fromCoroutine(self._request(method, path, body, headers or {}, query, timeout))

    def subscribe(self, topic: str, token: str, timeout: float = 10.0) -> Deferred[Any]:
        return fail(ClientError("events need a WebSocket: connect over wss to subscribe"))

    def unsubscribe(self, topic: str, timeout: float = 10.0) -> Deferred[Any]:
        return succeed(None)

    def heartbeat(self, timeout: float = 5.0) -> Deferred[Any]:
        """Any HTTP answer to ``GET /api/v1/health`` means the gateway is there."""
        d = self.request("GET", "/api/v1/health", timeout=timeout)
        return d.addCallback(lambda r: {"type": "heartbeat_ack", "status": r.status})

    def close(self) -> Deferred[None]:
        self._closed = True
        done: Deferred[None] = self._pool.closeCachedConnections()
        return done
