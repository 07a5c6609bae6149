"""Meeting a peer through a transit relay (magic-wormhole's ``magic-wormhole-transit-relay``).

When two gateways cannot reach each other directly, both dial out to a relay that both
can reach. The relay is magic-wormhole's transit relay as it is, unmodified: each side
sends one line, ``please relay TOKEN for side SIDE\\n``; when two connections with the
same TOKEN and different SIDEs are waiting, the relay answers ``ok\\n`` to both and from
then on copies bytes between them. It never sees anything but what the two ends send:
our sync session runs mutual TLS 1.3 end to end *through* it, so it sees ciphertext.

* :func:`relay_token` — the token both peers of a pair compute alike (order-independent).
* :func:`relay_side` — a random side; use ONE per gateway (or per peer client) for every
  attempt, so two of our own attempts can never be paired with each other.
* :class:`RelayClientEndpoint` — an ``IStreamClientEndpoint``: ``connect(factory)`` dials
  the relay, does the handshake, waits (bounded) for ``ok``, then hands the same
  transport to ``factory.buildProtocol(...)``; any protocol runs over it, TLS included.
* :func:`is_tls_server`, :func:`tls_server_factory`, :func:`tls_client_factory` — both
  peers *dial out*, so which one plays the TLS server is a rule both compute alike: the
  peer whose identity sorts first (plain string order) is the TLS server.
* :func:`make_relay_service` and the ``twistd aico-relay`` dropin (:data:`Options`,
  :func:`makeService`) — the transit relay's own service with our defaults.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from aico.files import write_atomic

__all__ = [
    "DEFAULT_BLUR_USAGE",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "Options",
    "RelayClientEndpoint",
    "RelayError",
    "RelayRefused",
    "RelayTimeout",
    "RelayUnreachable",
    "handshake_line",
    "is_tls_server",
    "makeService",
    "make_relay_service",
    "relay_side",
    "relay_token",
    "tls_client_factory",
    "tls_server_factory",
]

log = Logger(namespace="aico.sync.relay")

#: ``twistd aico-relay``'s default endpoint: TCP port 4001 (the transit relay's usual
#: port) on every IPv4 interface — a relay is useful only where both peers can reach it.
DEFAULT_PORT = "tcp:4001"
#: Seconds the relay's usage records are rounded to (sizes are bucketed too): the relay
#: keeps no exact record of who talked when and how much.
DEFAULT_BLUR_USAGE = 3600
#: Seconds :class:`RelayClientEndpoint` waits, by default, for the relay to pair us.
DEFAULT_TIMEOUT = 30.0

#: Domain separation for the token hash (never change it: both peers must agree).
TOKEN_LABEL = b"aico-sync relay token v1"
#: The relay's own limit on a handshake answer line; longer is garbage.
_MAX_LINE = 1024
_TOKEN = re.compile(r"[0-9a-f]{64}")
_SIDE = re.compile(r"[0-9a-f]{16}")


class RelayError(Exception):
    """A relayed connection could not be set up (see the subclasses)."""


class RelayUnreachable(RelayError):
    """The relay itself could not be reached."""


class RelayRefused(RelayError):
    """The relay answered something other than ``ok`` (e.g. ``bad handshake``)."""


class RelayTimeout(RelayError):
    """No peer met us at the relay (with the same token) within the time allowed."""


# --------------------------------------------------------------------------- tokens


def relay_token(a: str, b: str, *, secret: bytes = b"") -> str:
    """The relay token of the pair (*a*, *b*): 64 lower-case hex characters, the same
    whichever order the two stable identities (e.g. each gateway's device ID) come in.

    It is SHA-256 over a fixed label, an optional *secret* both peers share, and the two
    identities sorted. Identities are not secret, so whoever knows both can compute the
    token: they can only occupy the slot (the relay pairs them instead of the peer, TLS
    then fails and the client retries), never read or forge the session, which is
    mutually authenticated TLS end to end. A shared *secret* closes even that.
    """
    if not a or not b:
        raise ValueError("relay_token needs two non-empty identities")
    if a == b:
        raise ValueError("relay_token needs two different identities")
    first, second = sorted((a, b))
    h = hashlib.sha256()
    for part in (TOKEN_LABEL, secret, first.encode("utf-8"), second.encode("utf-8")):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.hexdigest()


def relay_side() -> str:
    """A random side: 16 lower-case hex characters."""
    return secrets.token_hex(8)


def handshake_line(token: str, side: str) -> bytes:
    """The transit relay's handshake: ``please relay TOKEN for side SIDE\\n``."""
    if not _TOKEN.fullmatch(token):
        raise ValueError("a relay token is 64 lower-case hex characters")
    if not _SIDE.fullmatch(side):
        raise ValueError("a relay side is 16 lower-case hex characters")
    return f"please relay {token} for side {side}\n".encode("ascii")


# --------------------------------------------------------------------------- TLS roles


def is_tls_server(own: str, peer: str) -> bool:
    """Whether this gateway (identity *own*) plays the TLS server on a relayed connection
    with *peer*: the identity that sorts first (plain string order) is the server. Both
    sides compute the same answer; the server side runs what its ``sync`` listener would
    (its server certificate, client certificates from its own CA required), the other
    side what its per-peer client would."""
    if own == peer:
        raise ValueError("a gateway cannot relay to itself")
    return own < peer


def tls_client_factory(options: Any, factory: IProtocolFactory) -> TLSMemoryBIOFactory:
    """*factory*'s protocol wrapped in TLS as the client (*options*: an
    ``IOpenSSLClientConnectionCreator`` or a ``CertificateOptions``)."""
    return TLSMemoryBIOFactory(options, True, factory)


def tls_server_factory(options: Any, factory: IProtocolFactory) -> TLSMemoryBIOFactory:
    """*factory*'s protocol wrapped in TLS as the server (*options*: a
    ``CertificateOptions`` such as :func:`aico.gateway.tls.server_options`)."""
    return TLSMemoryBIOFactory(options, False, factory)


# --------------------------------------------------------------------------- the client


class _Handshake(Protocol):
    """Sends the handshake, waits for ``ok``, then passes every byte and the end of the
    connection to the protocol built by the caller's factory (same transport)."""

    def __init__(self, attempt: _Attempt) -> None:
        self.attempt = attempt
        self.buffer = b""
        self.inner: IProtocol | None = None

    def connectionMade(self) -> None:
        self.attempt.connected(self)
        if self.transport is not None:
            self.transport.write(self.attempt.line)

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self.buffer += data
        if b"\n" not in self.buffer:
            if len(self.buffer) > _MAX_LINE:
                self.attempt.fail(RelayRefused("the relay answered an over-long line"))
            return
        line, rest = self.buffer.split(b"\n", 1)
        self.buffer = b""
        if line == b"ok":
            self.attempt.met(self, rest)
        else:
            answer = line[:80].decode("ascii", "replace")
            self.attempt.fail(RelayRefused(f"the relay refused the handshake: {answer!r}"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.inner is not None:
            inner, self.inner = self.inner, None
            inner.connectionLost(reason)
            return
        self.attempt.fail(RelayError(
            "the relay closed the connection before a peer met us "
            f"({reason.getErrorMessage()})"))


class _Attempt(Factory):
    """One ``connect()``: the factory given to the relay endpoint, and the state."""

    def __init__(self, endpoint: RelayClientEndpoint, factory: IProtocolFactory) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.line = handshake_line(endpoint.token, endpoint.side)
        self.result: Deferred[IProtocol] = Deferred(self._cancel)
        self.connecting: Deferred[IProtocol] | None = None
        self.protocol_: _Handshake | None = None
        self.timer: IDelayedCall | None = None

    # The caller's factory is started and stopped with the relay connection.
    def doStart(self) -> None:
        self.factory.doStart()

    def doStop(self) -> None:
        self.factory.doStop()

    def buildProtocol(self, addr: IAddress | None) -> _Handshake:
        return _Handshake(self)

    def start(self) -> Deferred[IProtocol]:
        self.timer = self.endpoint.reactor.callLater(self.endpoint.timeout, self._time_out)
        d = self.endpoint.relay.connect(self)
        self.connecting = d
        d.addErrback(self._unreachable)
        return self.result

    def connected(self, protocol: _Handshake) -> None:
        self.protocol_ = protocol

    def _unreachable(self, failure: Failure) -> None:
        if self.result.called:
            return  # cancelled or timed out: already reported
        self.fail(RelayUnreachable(f"could not reach the relay: {failure.getErrorMessage()}"))

    def _stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _abort(self) -> None:
        protocol = self.protocol_
        if protocol is not None and protocol.transport is not None:
            transport: Any = protocol.transport
            transport.abortConnection()
        elif self.connecting is not None and not self.connecting.called:
            self.connecting.cancel()

    def fail(self, error: RelayError) -> None:
        self._stop_timer()
        if self.result.called:
            return
        self.result.errback(Failure(error))
        self._abort()

    def _time_out(self) -> None:
        self.timer = None
        self.fail(RelayTimeout(
            f"no peer met us at the relay within {self.endpoint.timeout:g} s"))

    def _cancel(self, _: Deferred[IProtocol]) -> None:
        self._stop_timer()
        self._abort()

    def met(self, handshake: _Handshake, rest: bytes) -> None:
        self._stop_timer()
        transport = handshake.transport
        assert transport is not None
        if self.result.called:  # pragma: no cover - timed out in the same turn
            transport.loseConnection()
            return
        inner = self.factory.buildProtocol(transport.getPeer())
        if inner is None:
            self.result.errback(Failure(RelayError("the protocol factory refused the connection")))
            transport.loseConnection()
            return
        handshake.inner = inner
        inner.makeConnection(transport)
        self.result.callback(inner)
        if rest and handshake.inner is not None:
            inner.dataReceived(rest)


@implementer(IStreamClientEndpoint)
class RelayClientEndpoint:
    """Connects to a peer through a transit relay.

    *relay* is the endpoint of the relay itself (e.g. a ``HostnameEndpoint``); *token* the
    pair's :func:`relay_token`, *side* this gateway's :func:`relay_side`. ``connect``
    fires with the caller's protocol once the relay has paired us (its transport is the
    TCP connection to the relay, so ``getPeer()`` names the relay), or fails with
    :class:`RelayUnreachable`, :class:`RelayRefused` or, after *timeout* seconds without
    a peer, :class:`RelayTimeout`. Cancelling the Deferred closes the connection.
    """

    def __init__(self, reactor: IReactorTime, relay: IStreamClientEndpoint, token: str,
                 side: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        handshake_line(token, side)  # validates both
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.reactor = reactor
        self.relay = relay
        self.token = token
        self.side = side
        self.timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return _Attempt(self, protocolFactory).start()


# --------------------------------------------------------------------------- the relay


@implementer(IStreamServerEndpoint)
class _ReportingEndpoint:
    """A server endpoint that tells *on_listening* the port it got (port 0, port files)."""

    def __init__(self, endpoint: IStreamServerEndpoint,
                 on_listening: Callable[[IListeningPort], object]) -> None:
        self.endpoint = endpoint
        self.on_listening = on_listening

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        d = self.endpoint.listen(protocolFactory)

        def report(port: IListeningPort) -> IListeningPort:
            self.on_listening(port)
            return port

        return d.addCallback(report)


def make_relay_service(port: str = DEFAULT_PORT, *, blur_usage: int | None = DEFAULT_BLUR_USAGE,
                       reactor: Any = None,
                       on_listening: Callable[[IListeningPort], object] | None = None,
                       ) -> MultiService:
    """The transit relay's own service (``wormhole_transit_relay.server_tap.makeService``)
    on *port* (a Twisted server endpoint string), with no usage database, no WebSocket
    listener, no per-request logging, and usage records blurred to *blur_usage* seconds.
    *on_listening* is told the listening port once it is bound."""
    from wormhole_transit_relay import server_tap

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config = {"port": port, "websocket": None, "websocket-url": None,
              "blur-usage": blur_usage, "log-fd": None, "usage-db": None}
    service: MultiService = server_tap.makeService(config, reactor=reactor)
    if on_listening is not None:
        for child in service:
            if isinstance(child, StreamServerEndpointService):
                child.endpoint = _ReportingEndpoint(child.endpoint, on_listening)
    return service


def _port_string(value: str) -> str:
    return f"tcp:{value}" if value.isdigit() else value


class Options(usage.Options):
    """``twistd aico-relay`` options."""

    synopsis = "[--port ENDPOINT] [--blur-usage SECONDS] [--port-file PATH]"
    longdesc = ("A magic-wormhole transit relay for aico-gateway sync: two gateways that "
                "cannot reach each other both dial it and it copies bytes between them. "
                "The sync session runs mutual TLS end to end through it; the relay holds "
                "no key and sees only ciphertext.")
    optParameters = [
        ["port", "p", DEFAULT_PORT,
         "Twisted endpoint to listen on, or a port number (default: every IPv4 interface)"],
        ["blur-usage", None, str(DEFAULT_BLUR_USAGE),
         "round usage timestamps to this many seconds and bucket sizes (0: exact)"],
        ["port-file", None, None,
         'once listening, write {"host": ..., "port": ...} as JSON to this file'],
    ]

    def postOptions(self) -> None:
        self["port"] = _port_string(str(self["port"]))
        try:
            blur = int(self["blur-usage"])
        except ValueError:
            raise usage.UsageError("--blur-usage takes a number of seconds") from None
        if blur < 0:
            raise usage.UsageError("--blur-usage must not be negative")
        self["blur-usage"] = blur


def _listening(path: Path | None, port: IListeningPort) -> None:
    address: Any = port.getHost()
    log.info("aico-relay: listening on {host}:{port}", host=address.host, port=address.port)
    if path is not None:
        data = json.dumps({"host": address.host, "port": address.port}) + "\n"
        write_atomic(path, data.encode("utf-8"), 0o644)


class _RelayProcess(MultiService):
    """The relay under ``twistd``: SIGTERM is an orderly stop with exit status 0 (as for
    the gateway; twistd's own handler would end the process by the signal)."""

    def __init__(self, reactor: Any) -> None:
        MultiService.__init__(self)
        self.reactor = reactor
        self._hook: Any = None

    def startService(self) -> None:
        MultiService.startService(self)
        self.reactor.callWhenRunning(self._take_sigterm)

    def _take_sigterm(self) -> None:
        from aico.gateway.lifecycle import SignalHook

        if self.running:
            self._hook = SignalHook(self.reactor, signal.SIGTERM, self._terminate)

    def _terminate(self) -> None:
        log.info("aico-relay: SIGTERM, stopping")
        if getattr(self.reactor, "running", False):
            self.reactor.stop()

    def stopService(self) -> Any:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        return MultiService.stopService(self)


def makeService(options: Options) -> MultiService:
    """``twistd aico-relay``: the transit relay with our defaults."""
    from twisted.internet import reactor

    path = Path(options["port-file"]) if options["port-file"] else None
    root = _RelayProcess(reactor)
    make_relay_service(options["port"], blur_usage=options["blur-usage"] or None,
                       reactor=reactor,
                       on_listening=lambda port: _listening(path, port)).setServiceParent(root)
    return root

