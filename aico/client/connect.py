"""``connect()``: negotiate a transport to a local gateway and wrap it in a :class:`Client`.

Order (coupled mode, a gateway on this machine): ZeroMQ ``ipc://`` when its socket file
exists, then the ZeroMQ TCP fallback, then the WebSocket on the http listener. Each IPC
candidate is probed with a ``HEARTBEAT`` (a client that cannot reach it, or holds the
wrong server key, hears nothing, so the probe times out and the next one is tried).

Detached mode (a gateway elsewhere, reached through its ``tls`` listener): give
``connect()`` the certificate directory written by pairing (``cert_dir=``) and optionally
the ``url`` (``https://host:port``, by default the host and ``tls_port`` of
``gateway.json``). It then dials WSS first (requests and events), then HTTPS (treq;
requests only), both with mutual TLS 1.3, our CA only, the pinned server certificate and
a host-name check (:mod:`aico.client.tls`).

The :class:`Client` offers the same ``request()`` and ``subscribe()`` on every transport.
It heartbeats every ``heartbeat_interval`` seconds (which also keeps a WebSocket within
the gateway's idle timeout and re-subscribes whatever the gateway forgot); when the
connection is lost it reconnects — the same negotiation, so it may come back on another
transport — with exponential backoff (``backoff_base`` doubling up to ``backoff_max``,
±20 % jitter), then authenticates and subscribes again.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from aico.client.tls import PairedGateway, PinnedPolicy
from aico.client.transports import (
    ClientError,
    ClientResponse,
    HttpsTransport,
    IpcTransport,
    TransportUnavailable,
    WebSocketTransport,
    load_server_key,
)

Transport = IpcTransport | WebSocketTransport | HttpsTransport
DEFAULT_ORDER = ("ipc", "ipc-tcp", "websocket")
#: Detached mode: a WebSocket over TLS first (events), then plain HTTPS requests.
DETACHED_ORDER = ("wss", "https")


@dataclass(frozen=True)
class Endpoints:
    """Where a local gateway listens (from ``STATE_DIR/ports.json``)."""

    ipc: str = ""
    fallback: str = ""
    #: Base URL of the http listener, ``http://127.0.0.1:8771``.
    http: str = ""
    #: Z85 public key of ``curve/gateway.key`` (``None``: no Curve).
    server_key: bytes | None = None
    #: Whether ``ipc://`` uses Curve (the fallback always does).
    ipc_curve: bool = True

    @classmethod
    def from_state_dir(cls, state_dir: str | Path, ipc_curve: bool = True) -> Endpoints:
        root = Path(state_dir)
        try:
            ports = json.loads((root / "ports.json").read_text())
        except (OSError, ValueError) as e:
            raise TransportUnavailable(f"cannot read {root / 'ports.json'}: {e}") from e
        ipc = ports.get("ipc") or {}
        http = ports.get("http") or {}
        key_file = root / "curve" / "gateway.key"
        return cls(
            ipc=str(ipc.get("endpoint") or ""),
            fallback=str(ipc.get("fallback") or ""),
            http=f"http://{_host(http['host'])}:{http['port']}" if http else "",
            server_key=load_server_key(key_file) if key_file.exists() else None,
            ipc_curve=ipc_curve,
        )


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class Client:
    """Requests and subscriptions to one gateway, over whichever transport was found."""

    log = Logger()

    def __init__(self, reactor: Any, transport: Transport, dial: Callable[[], Deferred[Transport]],
                 token: str = "", *, heartbeat_interval: float = 30.0, backoff_base: float = 0.5,
                 backoff_max: float = 30.0) -> None:
        self.reactor = reactor
        self.token = token
        self._dial = dial
        self.heartbeat_interval = heartbeat_interval
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._handlers: dict[str, list[Callable[[str, Any], None]]] = {}
        self._closed = False
        self._retry: IDelayedCall | None = None
        self._beat: IDelayedCall | None = None
        self._attempt = 0
        self.transport: Transport | None = None
        self.reconnects = 0
        #: Called with ("auth_expired" | "auth_revoked", problem) when the gateway says so.
        self.on_notice: Callable[[str, dict[str, Any]], None] = lambda kind, problem: None
        self._use(transport)

    @property
    def transport_name(self) -> str:
        return self.transport.name if self.transport is not None else ""

    def _use(self, transport: Transport) -> None:
        self.transport = transport
        transport.on_event = self._event
        transport.on_notice = lambda kind, problem: self.on_notice(kind, problem)
        transport.on_lost = self._lost
        self._schedule_beat()

    # -- requests ----------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *,
                headers: Mapping[str, str] | None = None, query: Mapping[str, str] | None = None,
                timeout: float = 10.0, oneway: bool = False) -> Deferred[ClientResponse]:
        """One request; fires with the response whatever its status (errors are problems)."""
        transport = self.transport
        if transport is None:
            raise ClientError("not connected (reconnecting)")
        raw = b"" if body is None else json.dumps(body).encode()
        hdrs = {k.lower(): v for k, v in (headers or {}).items()}
        if isinstance(transport, IpcTransport):
            if self.token:
                hdrs.setdefault("authorization", f"Bearer {self.token}")
            if raw:
                hdrs.setdefault("content-type", "application/json")
        return transport.request(method.upper(), path, raw, hdrs, query, timeout, oneway)

    # -- subscriptions -----------------------------------------------------------------

    def subscribe(self, topic: str, handler: Callable[[str, Any], None]) -> Deferred[None]:
        """Call *handler(topic, body)* for events whose topic starts with *topic*."""
        handlers = self._handlers.setdefault(topic, [])
        handlers.append(handler)
        if len(handlers) > 1 or self.transport is None:
            return succeed(None)

        def refused(failure: Any) -> Any:
            self._remove(topic, handler)
            return failure

        d = self.transport.subscribe(topic, self.token)
        return d.addCallbacks(lambda _: None, refused)

    def unsubscribe(self, topic: str, handler: Callable[[str, Any], None]) -> Deferred[None]:
        if self._remove(topic, handler) and self.transport is not None:
            return self.transport.unsubscribe(topic).addCallback(lambda _: None)
        return succeed(None)

    def _remove(self, topic: str, handler: Callable[[str, Any], None]) -> bool:
        handlers = self._handlers.get(topic, [])
        if handler in handlers:
            handlers.remove(handler)
        if not handlers:
            self._handlers.pop(topic, None)
            return True
        return False

    def _event(self, topic: str, body: bytes) -> None:
        try:
            value = json.loads(body) if body else None
        except ValueError:
            value = body.decode("utf-8", "replace")
        for prefix, handlers in list(self._handlers.items()):
            if topic.startswith(prefix):
                for handler in list(handlers):
                    try:
                        handler(topic, value)
                    except Exception:
                        self.log.failure("event handler for {prefix} failed", prefix=prefix)

    async def _resubscribe(self, known: Sequence[str] = ()) -> None:
        for topic in list(self._handlers):
            if topic in known or self.transport is None:
                continue
            try:
                await self.transport.subscribe(topic, self.token)
            except ClientError as e:
                self.log.warn("could not subscribe again to {topic}: {error}", topic=topic, error=str(e))

    # -- liveness and reconnection -----------------------------------------------------

    def _schedule_beat(self) -> None:
        if self._beat is not None and self._beat.active():
            self._beat.cancel()
        if not self._closed and self.heartbeat_interval > 0:
            self._beat = self.reactor.callLater(self.heartbeat_interval, self._heartbeat)

    def _heartbeat(self) -> None:
        self._beat = None
        transport = self.transport
        if transport is None:
            return

        def alive(answer: Any) -> Any:
            self._schedule_beat()
            if isinstance(answer, ClientResponse):  # IPC: the gateway lists what it holds
                held = (answer.json() or {}).get("subscriptions", [])
                return Deferred.fromCoroutine(self._resubscribe(held))
            return None

        def dead(failure: Any) -> None:
            if self.transport is transport and not self._closed:
                self.log.info("gateway silent on {transport}: reconnecting", transport=transport.name)
                transport.on_lost = lambda: None
                transport.close()
                self._lost()

        transport.heartbeat(timeout=min(5.0, self.heartbeat_interval)).addCallbacks(alive, dead)

    def _lost(self) -> None:
        if self._closed:
            return
        self.transport = None
        if self._beat is not None and self._beat.active():
            self._beat.cancel()
        delay = min(self.backoff_max, self.backoff_base * 2 ** self._attempt)
        delay *= random.uniform(0.8, 1.2)  # jitter, not security
        self._attempt += 1
        self._retry = self.reactor.callLater(delay, self._redial)

    def _redial(self) -> None:
        self._retry = None

        def ok(transport: Transport) -> Deferred[None]:
            if self._closed:
                return transport.close()
            self._attempt = 0
            self.reconnects += 1
            self._use(transport)
            self.log.info("reconnected over {transport}", transport=transport.name)
            return Deferred.fromCoroutine(self._resubscribe())

        def failed(failure: Any) -> None:
            self._lost()

        self._dial().addCallbacks(ok, failed)

    def close(self) -> Deferred[None]:
        self._closed = True
        for call in (self._retry, self._beat):
            if call is not None and call.active():
                call.cancel()
        transport, self.transport = self.transport, None
        if transport is None:
            return succeed(None)
        transport.on_lost = lambda: None
        return transport.close()


async def _dial(reactor: Any, endpoints: Endpoints, token: str, order: Sequence[str],
                probe_timeout: float) -> Transport:
    tried: list[str] = []
    for name in order:
        if name == "ipc" and endpoints.ipc:
            path = endpoints.ipc[len("ipc://"):]
            if not Path(path).exists():
                tried.append(f"{endpoints.ipc}: no such socket")
                continue
            key = endpoints.server_key if endpoints.ipc_curve else None
            transport: Transport = IpcTransport(reactor, endpoints.ipc, key, name="ipc")
        elif name == "ipc-tcp" and endpoints.fallback:
            transport = IpcTransport(reactor, endpoints.fallback, endpoints.server_key, name="ipc-tcp")
        elif name == "websocket" and endpoints.http:
            ws = WebSocketTransport(reactor, "ws" + endpoints.http[4:] + "/ws", token,
                                    connect_timeout=max(probe_timeout, 5.0))
            try:
                return await ws.connect()
            except (TransportUnavailable, ClientError) as e:
                tried.append(str(e))
                await ws.close()
                continue
        else:
            continue
        assert isinstance(transport, IpcTransport)
        try:
            await transport.heartbeat(timeout=probe_timeout)
        except ClientError as e:
            tried.append(str(e))
            await transport.close()
            continue
        return transport
    raise TransportUnavailable("no transport to the gateway: " + ("; ".join(tried) or "none configured"))


async def _dial_detached(reactor: Any, paired: PairedGateway, url: str, token: str,
                         order: Sequence[str], connect_timeout: float) -> Transport:
    tried: list[str] = []
    host = urlsplit(url).hostname or ""
    for name in order:
        if name == "wss":
            ws = WebSocketTransport(reactor, "wss" + url[len("https"):] + "/ws", token,
                                    connect_timeout=connect_timeout,
                                    tls=paired.creator(host))
            try:
                return await ws.connect()
            except (TransportUnavailable, ClientError) as e:
                tried.append(str(e))
                await ws.close()
        elif name == "https":
            # No probe: the TLS handshake (and a refusal of it) happens on the first request.
            return HttpsTransport(reactor, url, PinnedPolicy(paired), token)
    raise TransportUnavailable("no transport to the gateway: " + ("; ".join(tried) or "none configured"))


def _https_base(url: str) -> str:
    parts = urlsplit(url.rstrip("/"))
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "https" or not parts.hostname or port is None or parts.path not in ("", "/api/v1"):
        raise ValueError(f"a detached gateway URL looks like https://host:port, not {url!r}")
    return f"https://{parts.netloc}"


def connect(reactor: Any = None, state_dir: str | Path | None = None, *,
            endpoints: Endpoints | None = None, token: str = "",
            order: Sequence[str] | None = None, probe_timeout: float = 1.0,
            url: str = "", cert_dir: str | Path | None = None,
            **client_options: Any) -> Deferred[Client]:
    """Connect to the gateway of *state_dir* (or at *endpoints*): IPC first, then WebSocket.

    With *cert_dir* (a paired certificate directory), connect in detached mode to *url*
    (``https://host:port``; by default from ``gateway.json``): WSS, then HTTPS.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    if cert_dir is not None:
        paired = PairedGateway.load(cert_dir)
        base = _https_base(url or paired.url)
        detached_order = order or DETACHED_ORDER
        timeout = max(probe_timeout, 5.0)

        def dial_detached() -> Deferred[Transport]:
            return Deferred.fromCoroutine(
                _dial_detached(reactor, paired, base, token, detached_order, timeout))

        def made_detached(transport: Transport) -> Client:
            return Client(reactor, transport, dial_detached, token, **client_options)

        return dial_detached().addCallback(made_detached)
    if order is None:
        order = DEFAULT_ORDER
    if endpoints is None:
        if state_dir is None:
            raise ValueError("connect() needs a state_dir or endpoints")
        endpoints = Endpoints.from_state_dir(state_dir)
    found, coupled_order = endpoints, order

    def dial() -> Deferred[Transport]:
        return Deferred.fromCoroutine(_dial(reactor, found, token, coupled_order, probe_timeout))

    def made(transport: Transport) -> Client:
        return Client(reactor, transport, dial, token, **client_options)

    return dial().addCallback(made)
