"""The network side of sync: the ``sync`` listener's factory and one client per peer.

* :class:`SyncServerFactory` — AMP :class:`~aico.sync.protocol.SyncProtocol` s behind
  :class:`SyncTLSFactory` (mutual TLS 1.3 with this gateway's device CA as the only
  root). At the connection's first read (TLS 1.3 finishes verifying the client only
  then) the peer's certificate is admitted through the :class:`~aico.gateway.tls.DeviceGate`:
  its device must be in the registry, not revoked, and paired for ``sync``; any other
  gets ``DEVICE_NOT_ALLOWED`` to its first command and the connection is closed.
* :class:`PeerLink` — one peer: its connection — direct (mutual TLS to the peer's
  listener at its ``[sync.peers]`` address, else the one mDNS found, else the one
  ``sync join`` recorded), or after ``[sync] direct_attempts`` failures through the
  transit relay (``[sync] relay``, :mod:`aico.sync.relay`), trying direct again
  periodically and switching back when it works; exponential backoff with jitter,
  capped; a round on connect, after local changes (debounced) and periodically, and
  the peer's state for the admin API (``via``: ``direct``/``relay``).
* :class:`SyncService` — the ``sync`` service in the gateway's tree: its children are
  the peers' links and, with ``[sync] mdns``, the mDNS advertiser and browser
  (:mod:`aico.sync.discovery`); :meth:`SyncService.refresh` re-reads ``sync_peers`` (at
  start and whenever another process — ``sync join`` — committed to the registry), and
  :meth:`SyncService.close_device` drops a revoked peer at once.

Over the relay both peers dial out, so the TLS roles follow
:func:`~aico.sync.relay.is_tls_server` on the two sync identities (each gateway's device
CA fingerprint; a peer's is that of its ``their_ca``): the server side runs what its
``sync`` listener runs (its server certificate, admission through the device gate) and
uses that one connection as its session too, so each side drives rounds over it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.python.failure import Failure

from aico.gateway.api.devices.exceptions import DeviceRefused
from aico.gateway.config import split_host_port
from aico.gateway.devices.ca import device_id
from aico.gateway.errors import ApiError
from aico.gateway.tls import SYNC_PEER, DeviceGate, DeviceTLSFactory
from aico.keystore import Keystore
from aico.net import is_loopback
from aico.sync.discovery import SyncAdvertiser, SyncBrowser
from aico.sync.interfaces import ISyncEngine
from aico.sync.peers import PeerStore, SyncPeer, client_options
from aico.sync.protocol import DeviceNotAllowed, SyncError, SyncProtocol
from aico.sync.relay import (
    DEFAULT_TIMEOUT,
    RelayClientEndpoint,
    RelayTimeout,
    is_tls_server,
    relay_side,
    relay_token,
    tls_client_factory,
)

__all__ = [
    "DEBOUNCE",
    "DIRECT_RETRY",
    "PAIRED_FOR",
    "RELAY_WAIT",
    "ROUND_INTERVAL",
    "Address",
    "PeerLink",
    "SyncServerFactory",
    "SyncService",
    "SyncTLSFactory",
    "mdns_interfaces",
]

log = Logger(namespace="aico.sync")

#: The ``paired_for`` of a registry device that is another gateway (sync peer).
PAIRED_FOR = SYNC_PEER
#: Seconds between a local change and the round that carries it (changes coalesce).
DEBOUNCE = 0.2
#: Seconds between periodic rounds with each connected peer.
ROUND_INTERVAL = 30.0
#: A peer added less than FRESH_PEER seconds ago is first dialled after FRESH_PEER_DELAY.
FRESH_PEER = 5.0
FRESH_PEER_DELAY = 1.0
#: Reconnection backoff: first delay, factor, cap (seconds); jitter up to 1 s.
BACKOFF_INITIAL, BACKOFF_FACTOR, BACKOFF_MAX = 1.0, 2.0, 60.0
#: Seconds between direct attempts while a peer is reached (or awaited) through the relay.
DIRECT_RETRY = 60.0
#: Seconds a relayed attempt waits at the relay for the peer.
RELAY_WAIT = DEFAULT_TIMEOUT
#: Seconds a TCP connection (to a peer or to the relay) may take.
CONNECT_TIMEOUT = 10.0
#: Seconds from connected to a peer's ``Hello`` answer (or its admission).
HELLO_TIMEOUT = 20.0


# --------------------------------------------------------------------------- listening side


class _ServerSyncProtocol(SyncProtocol):
    """The listening end: the peer is admitted at the first read."""

    factory: SyncServerFactory
    _admitted = False

    def dataReceived(self, data: bytes) -> None:
        if not self._admitted:
            self._admitted = True
            self.refusal = self.factory.admit(self)
            if self.refusal:
                # Answer the first command with DEVICE_NOT_ALLOWED, then close.
                self.factory.clock.callLater(0, self._close)
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class SyncServerFactory(Factory):
    """Sync connections from peers (wrap it in :class:`SyncTLSFactory`)."""

    noisy = False

    def __init__(self, engine: ISyncEngine, gate: DeviceGate, clock: Any) -> None:
        self.engine = engine
        self.gate = gate
        self.clock = clock
        #: Live admitted connections by the peer's device ID.
        self.live: dict[str, set[SyncProtocol]] = {}

    def buildProtocol(self, addr: Any) -> SyncProtocol:
        p = _ServerSyncProtocol(self.engine, clock=self.clock.seconds)
        p.factory = self
        return p

    def admit(self, proto: SyncProtocol) -> str:
        """The refusal of *proto*'s peer ("" when it is admitted)."""
        try:
            device = self.gate.admit(proto.transport)
        except (DeviceRefused, ApiError) as e:
            return f"device not allowed: {getattr(e, 'detail', '') or e}"
        if device.paired_for != PAIRED_FOR:
            return "device not paired for sync"
        proto.peer_id = device.device_id
        self.live.setdefault(device.device_id, set()).add(proto)
        proto.on_lost.append(self._lost)
        return ""

    def _lost(self, proto: SyncProtocol) -> None:
        live = self.live.get(proto.peer_id)
        if live is not None:
            live.discard(proto)
            if not live:
                del self.live[proto.peer_id]

    def close_device(self, device_id: str) -> int:
        protos = list(self.live.get(device_id, ()))
        for proto in protos:
            if proto.transport is not None:
                proto.transport.loseConnection()
        return len(protos)

    def close_all(self) -> None:
        for protos in list(self.live.values()):
            for proto in list(protos):
                if proto.transport is not None:
                    proto.transport.loseConnection()


class SyncTLSFactory(DeviceTLSFactory):
    """Mutual TLS around :class:`SyncServerFactory`: the ``tls`` listener's TLS factory,
    which tells the gate when a peer's connection ends (the gate cuts a revoked device's
    connections)."""

    def __init__(self, options: CertificateOptions, factory: Any) -> None:
        super().__init__(options, factory, factory.gate)


# --------------------------------------------------------------------------- dialling side


class _ClientFactory(Factory):
    noisy = False

    def __init__(self, link: PeerLink) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> SyncProtocol:
        p = SyncProtocol(self.link.engine, peer_id=self.link.peer.peer_id,
                         clock=self.link.clock.seconds)
        p.factory = self
        p.on_lost.append(self.link._lost)
        return p


class _RelayedServerProtocol(_ServerSyncProtocol):
    """Our end of a relayed connection on which we play the TLS server: admitted at the
    first read like a listener's connection; :attr:`admitted` fires then (or fails)."""

    def __init__(self, engine: ISyncEngine, clock: Callable[[], float]) -> None:
        super().__init__(engine, clock=clock)
        self.admitted: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        first = not self._admitted
        super().dataReceived(data)  # admission, then the boxes (the peer's Hello)
        if first and not self.admitted.called:
            if self.refusal:
                self.admitted.errback(Failure(DeviceNotAllowed(self.refusal)))
            else:
                self.admitted.callback(None)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if not self.admitted.called:
            self.admitted.errback(reason)
        super().connectionLost(reason)


class _RelayServerFactory(Factory):
    """What the ``sync`` listener's factory builds, for one peer's relayed connection."""

    noisy = False

    def __init__(self, link: PeerLink, server: SyncServerFactory) -> None:
        self.link = link
        self.server = server
        self.gate = server.gate

    def buildProtocol(self, addr: Any) -> Any:
        p = _RelayedServerProtocol(self.server.engine, clock=self.server.clock.seconds)
        p.factory = self.server
        p.on_lost.append(self.link._lost)
        return p


@dataclass(frozen=True)
class Address:
    """Where a peer's ``sync`` listener is, and who said so (``static``: ``[sync.peers]``;
    ``mdns``: discovery; ``join``: recorded by ``sync join``)."""

    host: str
    port: int
    source: str


class Paths(Protocol):
    """What a :class:`PeerLink` asks its service (:class:`SyncService` implements it)."""

    def direct_endpoint(self, link: PeerLink) -> Any:
        """A TLS client endpoint to the peer's listener, None when no address is known."""

    def relay_endpoint(self, link: PeerLink) -> tuple[Any, Any] | None:
        """``(relay endpoint, TLS-wrapped factory)`` for a relayed attempt, or None."""

    def direct_attempts(self) -> int:
        """Failed direct attempts in a row before the relay is tried."""


class _NoAddress(Exception):
    pass


class _LinkService(Service):
    """The link in the service tree (started and stopped with the ``sync`` service)."""

    def __init__(self, link: PeerLink) -> None:
        self.link = link
        self.setName(f"peer {link.peer.name}")  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        Service.startService(self)
        self.link.start()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return self.link.shutdown()


class PeerLink:
    """One peer: its connection (direct, else through the relay), its rounds, its state.

    Connecting: direct attempts (mutual TLS to the peer's listener, a ``Hello``
    answered) with exponential backoff; after :meth:`Paths.direct_attempts` failures in
    a row, relayed attempts (each waits up to the relay timeout for the peer), with a
    direct attempt every :attr:`direct_retry` seconds meanwhile — and while on the relay —
    that replaces the relayed session as soon as it works. :meth:`kick` (a new address
    from mDNS) tries direct at once.
    """

    def __init__(self, peer: SyncPeer, engine: ISyncEngine, clock: Any, paths: Paths, *,
                 round_interval: float = ROUND_INTERVAL, debounce: float = DEBOUNCE,
                 direct_retry: float = DIRECT_RETRY) -> None:
        self.peer = peer
        self.engine = engine
        self.clock = clock
        self.paths = paths
        self.round_interval = round_interval
        self.debounce = debounce
        self.direct_retry = direct_retry
        self.proto: SyncProtocol | None = None
        #: How the session runs: "direct", "relay", or None (no session).
        self.via: str | None = None
        self.last_round: float | None = None
        self.last_error: str | None = None
        self.rounds = 0
        #: Failed direct attempts in a row (the relay is tried past the service's limit).
        self.direct_failures = 0
        self._failures = 0  # failed attempts in a row, for the backoff
        self._running = False
        self._again = False
        self._soon: IDelayedCall | None = None
        self._periodic: IDelayedCall | None = None
        self._retry: IDelayedCall | None = None
        self._probe_timer: IDelayedCall | None = None
        self._main: Deferred[None] | None = None  # the attempt under way (direct or relay)
        self._main_via = ""
        self._probe: Deferred[None] | None = None  # a direct attempt beside the relay
        self._kicked = False
        self._half: set[SyncProtocol] = set()  # connected, not (yet) the session
        self._stopped = True
        self._jitter = random.Random()
        self.service = _LinkService(self)
        #: Fired with each finished round's report (tests).
        self.on_round: list[Callable[[Any], object]] = []

    @property
    def connected(self) -> bool:
        return self.proto is not None

    def status(self) -> dict[str, Any]:
        shared = list(self.engine.collections_for(self.peer.peer_id))
        return {"peer_id": self.peer.peer_id, "device_id": self.peer.device_id,
                "name": self.peer.name, "host": self.peer.host, "port": self.peer.port,
                "state": "connected" if self.connected else "disconnected",
                "via": self.via,
                "node_id": self.proto.remote_node if self.proto is not None else None,
                "last_round": self.last_round, "last_error": self.last_error,
                "rounds": self.rounds,
                "collections": {c: self.engine.root(c).hex() for c in shared}}

    # ------------------------------------------------------------------ connecting

    def start(self) -> None:
        self._stopped = False
        # A peer that joined a moment ago has just been written to its registry too: give
        # its gateway's registry watcher (0.25 s) time to admit us, rather than have the
        # first handshake refused and wait out a backoff.
        added = self.peer.added_at
        if added and self.clock.seconds() - added < FRESH_PEER:
            self._schedule(FRESH_PEER_DELAY)
        else:
            self._attempt()

    def _relay_mode(self) -> bool:
        return self.direct_failures >= self.paths.direct_attempts()

    def _attempt(self) -> None:
        self._retry = None
        if self._stopped or self.proto is not None or self._main is not None:
            return
        if self._relay_mode() and self.paths.relay_endpoint(self) is not None:
            self._main_via = "relay"
            self._schedule_probe()
            d = Deferred.fromCoroutine(self._dial_relay())
        else:
            self._main_via = "direct"
            d = Deferred.fromCoroutine(self._dial_direct(probe=False))
        if not d.called:  # (a failure before the first wait has already been handled)
            self._main = d

    def _schedule(self, delay: float) -> None:
        if self._stopped or (self._retry is not None and self._retry.active()):
            return
        self._retry = self.clock.callLater(delay, self._attempt)

    def _backoff(self) -> float:
        n = max(self._failures, 1)
        return min(BACKOFF_MAX, BACKOFF_INITIAL * BACKOFF_FACTOR ** (n - 1)) + self._jitter.random()

    def _schedule_probe(self) -> None:
        if (self._stopped or self.via == "direct" or self._probe is not None
                or (self._probe_timer is not None and self._probe_timer.active())):
            return
        self._probe_timer = self.clock.callLater(self.direct_retry, self._probe_now)

    def _probe_now(self) -> None:
        self._probe_timer = None
        if self._stopped or self.via == "direct" or self._probe is not None:
            return
        if self._main is not None and self._main_via == "direct":
            return
        d = Deferred.fromCoroutine(self._dial_direct(probe=True))
        if not d.called:
            self._probe = d

    def kick(self) -> None:
        """A new address (mDNS): try the direct path now, unless already on it."""
        if self._stopped or self.via == "direct":
            return
        if (self._main is not None and self._main_via == "direct") or self._probe is not None:
            self._kicked = True  # retried at once if the attempt under way fails
            return
        if self.proto is not None or self._main is not None:  # on, or at, the relay
            if self._probe_timer is not None and self._probe_timer.active():
                self._probe_timer.cancel()
            self._probe_now()
            return
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self.direct_failures = self._failures = 0
        self._attempt()

    async def _dial_direct(self, probe: bool) -> None:
        proto: SyncProtocol | None = None
        error: Exception | None = None
        try:
            endpoint = self.paths.direct_endpoint(self)
            if endpoint is None:
                raise _NoAddress("no address known for this peer yet")
            proto = await endpoint.connect(_ClientFactory(self))
            assert isinstance(proto, SyncProtocol)
            self._half.add(proto)
            await Deferred.fromCoroutine(proto.hello_remote()).addTimeout(
                HELLO_TIMEOUT, self.clock)
        except Exception as e:  # every failure is the attempt's
            error = e
            self._abort(proto)
        if probe:
            self._probe = None
        else:
            self._main = None
        if proto is not None:
            self._half.discard(proto)
        if error is not None:
            self._direct_failed(error, probe)
            return
        assert proto is not None
        self._adopt(proto, "direct")

    def _direct_failed(self, error: Exception, probe: bool) -> None:
        if self._stopped or isinstance(error, CancelledError):
            return
        self.direct_failures += 1
        self.last_error = _describe(error)
        log.debug("sync peer {name}: direct attempt failed: {error}", name=self.peer.name,
                  error=self.last_error)
        if self._kicked:
            self._kicked = False
            self.kick()
            return
        if probe:
            self._schedule_probe()
        else:
            self._failures += 1
            self._schedule(self._backoff())

    async def _dial_relay(self) -> None:
        proto: SyncProtocol | None = None
        try:
            relayed = self.paths.relay_endpoint(self)
            if relayed is None:
                raise _NoAddress("no relay")
            endpoint, factory = relayed
            tls = await endpoint.connect(factory)
            proto = tls.wrappedProtocol
            assert isinstance(proto, SyncProtocol)
            self._half.add(proto)
            if isinstance(proto, _RelayedServerProtocol):  # we play the TLS server
                await proto.admitted.addTimeout(HELLO_TIMEOUT, self.clock)
                if proto.peer_id != self.peer.peer_id:
                    raise DeviceNotAllowed("another peer met us at the relay")
            else:
                await Deferred.fromCoroutine(proto.hello_remote()).addTimeout(
                    HELLO_TIMEOUT, self.clock)
        except Exception as e:  # every failure is the attempt's
            self._abort(proto)
            self._main = None
            if proto is not None:
                self._half.discard(proto)
            if self._stopped or isinstance(e, CancelledError):
                return
            self.last_error = _describe(e)
            if isinstance(e, RelayTimeout):
                delay = self._jitter.random()  # waited already: back at once
            else:
                self._failures += 1
                delay = self._backoff()
            self._schedule(delay)
            return
        self._main = None
        self._half.discard(proto)
        self._adopt(proto, "relay")

    def _abort(self, proto: SyncProtocol | None) -> None:
        transport: Any = proto.transport if proto is not None else None
        if transport is not None:
            transport.abortConnection()

    def _adopt(self, proto: SyncProtocol, via: str) -> None:
        """*proto* (Hello done) becomes the session, unless a better one exists."""
        if self._stopped:
            self._abort(proto)
            return
        if self.proto is not None:
            if not (via == "direct" and self.via == "relay"):
                self._abort(proto)
                return
            old, self.proto = self.proto, None  # switch back to the direct path
            log.info("sync peer {name}: direct path works again, leaving the relay",
                     name=self.peer.name)
            self._cancel_timers()
            transport: Any = old.transport
            if transport is not None:
                transport.loseConnection()
        self.proto = proto
        self.via = via
        self.last_error = None
        self._failures = 0
        if via == "direct":
            self.direct_failures = 0
            for d in (self._main, self._probe):
                if d is not None:
                    d.cancel()
            if self._probe_timer is not None and self._probe_timer.active():
                self._probe_timer.cancel()
            self._probe_timer = None
        else:
            self._schedule_probe()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        log.info("sync peer {name}: connected ({via})", name=self.peer.name, via=via)
        self.round_now()

    def _lost(self, proto: SyncProtocol) -> None:
        if self.proto is not proto:
            return
        via, self.proto, self.via = self.via, None, None
        self._cancel_timers()
        if self._stopped:
            return
        if via == "relay":  # the peer may have found the direct path: try it once first
            self.direct_failures = min(self.direct_failures,
                                       max(self.paths.direct_attempts() - 1, 0))
        self._failures = 1
        self._schedule(self._backoff())

    def _cancel_timers(self) -> None:
        for call in (self._soon, self._periodic):
            if call is not None and call.active():
                call.cancel()
        self._soon = self._periodic = None

    def stop(self) -> None:
        self._stopped = True
        self._cancel_timers()
        for call in (self._retry, self._probe_timer):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._probe_timer = None
        for d in (self._main, self._probe):
            if d is not None:
                d.cancel()
        for proto in list(self._half):
            self._abort(proto)

    def close(self) -> None:
        """Drop the connection now (the peer was revoked)."""
        self._abort(self.proto)

    def shutdown(self) -> Deferred[None]:
        """Stop connecting; close the session; fires once it is closed (aborted after
        a second)."""
        self.stop()
        proto = self.proto
        transport: Any = proto.transport if proto is not None else None
        if proto is None or transport is None:
            return succeed(None)
        done: Deferred[None] = Deferred()

        def lost(_: SyncProtocol) -> None:
            if not done.called:
                done.callback(None)

        proto.on_lost.append(lost)
        transport.loseConnection()
        abort = self.clock.callLater(1.0, transport.abortConnection)
        return done.addBoth(lambda r: (abort.active() and abort.cancel(), r)[1])

    # ------------------------------------------------------------------ rounds

    def changed(self) -> None:
        """A local change: a round soon (changes within :attr:`debounce` coalesce)."""
        if self.proto is None or self._stopped or (self._soon is not None
                                                   and self._soon.active()):
            return
        self._soon = self.clock.callLater(self.debounce, self.round_now)

    def round_now(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._round())

    async def _round(self) -> None:
        if self._running:
            self._again = True
            return
        proto = self.proto
        if proto is None:
            return
        self._running = True
        try:
            while True:
                self._again = False
                if self._periodic is not None and self._periodic.active():
                    self._periodic.cancel()
                try:
                    report = await proto.run_round()
                except Exception as e:
                    self.last_error = _describe(e)
                    if self.proto is proto:
                        log.warn("sync round with {peer} failed: {error}", peer=self.peer.name,
                                 error=self.last_error)
                        if isinstance(e, SyncError) and proto.transport is not None:
                            proto.transport.loseConnection()  # reconnect, Hello again
                    break
                self.rounds += 1
                self.last_round = report.finished
                self.last_error = None
                for callback in list(self.on_round):
                    callback(report)
                if not self._again or self.proto is not proto:
                    break
        finally:
            self._running = False
        if self.proto is proto and not self._stopped:
            self._periodic = self.clock.callLater(self.round_interval, self.round_now)


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError | defer.TimeoutError):
        return "TimeoutError: the peer did not answer in time"
    text = str(error) or type(error).__name__
    code = getattr(error, "code", b"")
    if isinstance(code, bytes) and code:
        return f"{code.decode()}: {text}"
    return f"{type(error).__name__}: {text}"


def mdns_interfaces(sync: Any) -> tuple[str, ...] | None:
    """The addresses sync's mDNS runs on, per ``[sync]``; None: no mDNS.

    ``interfaces`` when set; else the listener's host when it is one address; every
    interface (``()``) when it is a wildcard or a host name; none for a loopback host
    (nothing on the LAN could reach that listener).
    """
    if not sync.enabled or not sync.mdns:
        return None
    if sync.interfaces:
        return tuple(sync.interfaces)
    if sync.host in ("0.0.0.0", "::", ""):  # noqa: S104 - the wildcard is what we test
        return ()
    if is_loopback(sync.host):
        return None
    try:
        ipaddress.ip_address(sync.host)
    except ValueError:
        return ()
    return (sync.host,)


class SyncService(MultiService):
    """The ``sync`` service: one :class:`PeerLink` per reachable peer of ``sync_peers``,
    and, with ``[sync] mdns``, the mDNS advertiser and browser (children)."""

    name = "sync"

    def __init__(self, engine: ISyncEngine, peers: PeerStore, keystore: Keystore | None,
                 gate: DeviceGate, reactor: Any,
                 endpoint_for: Callable[[SyncPeer, CertificateOptions], Any] | None = None,
                 *, round_interval: float = ROUND_INTERVAL, debounce: float = DEBOUNCE,
                 config: Callable[[], Any] | None = None, identity: str = "",
                 direct_retry: float = DIRECT_RETRY, relay_wait: float = RELAY_WAIT) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.setName(self.name)  # type: ignore[no-untyped-call]
        self.engine = engine
        self.peers = peers
        self.keystore = keystore
        self.gate = gate
        self.reactor = reactor
        self.round_interval = round_interval
        self.debounce = debounce
        self.direct_retry = direct_retry
        self.relay_wait = relay_wait
        self._config = config or (lambda: None)
        #: This gateway's sync identity (its device CA's fingerprint): the relay token,
        #: the TLS role over the relay, and the mDNS TXT ``id``.
        self.identity = identity
        #: The relay side of every attempt of ours (never paired with itself).
        self.side = relay_side()
        #: The ``sync`` listener's TLS options and port (set when it is built).
        self.server_options: CertificateOptions | None = None
        self.listen_port: Callable[[], int] | None = None
        self._endpoint_for = endpoint_for or self._tls_endpoint
        self.links: dict[str, PeerLink] = {}
        #: The peers of sync_peers (dialable or not), by peer ID.
        self.known: dict[str, SyncPeer] = {}
        #: Addresses mDNS found, by sync identity (in memory).
        self.discovered: dict[str, tuple[str, int]] = {}
        self._identities: dict[str, tuple[str, str]] = {}  # peer ID → (their_ca, identity)
        self._options: dict[str, tuple[SyncPeer, CertificateOptions]] = {}
        self.server = SyncServerFactory(engine, gate, reactor)
        self.advertiser: SyncAdvertiser | None = None
        self.browser: SyncBrowser | None = None
        self._lock = DeferredLock()
        engine.on_change(self._changed)

    def _tls_endpoint(self, peer: SyncPeer, options: CertificateOptions) -> Any:
        return wrapClientTLS(options, HostnameEndpoint(self.reactor, peer.host, peer.port,
                                                       timeout=CONNECT_TIMEOUT))

    @property
    def sync_config(self) -> Any:
        return self._config()

    def startService(self) -> Deferred[None]:
        self._start_mdns()
        super().startService()  # type: ignore[no-untyped-call]
        d = self.refresh()
        d.addErrback(lambda f: log.failure("sync: first look at the peers failed", f))
        return d

    def _start_mdns(self) -> None:
        sync = self.sync_config
        interfaces = mdns_interfaces(sync) if sync is not None else None
        if interfaces is None or not self.identity or self.browser is not None:
            return
        if self.listen_port is not None:
            self.advertiser = SyncAdvertiser(self.reactor, self.identity, self.listen_port,
                                             interfaces)
            self.addService(self.advertiser)  # type: ignore[no-untyped-call]
        self.browser = SyncBrowser(self.reactor, self.identity, self.found, self._mdns_lost,
                                   interfaces)
        self.addService(self.browser)  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None]:
        for link in self.links.values():
            link.stop()
        self.server.close_all()
        d: Deferred[None] = super().stopService()  # type: ignore[no-untyped-call]
        return d

    # ------------------------------------------------------------------ addresses and paths

    def identity_of(self, peer: SyncPeer) -> str:
        """*peer*'s sync identity: the fingerprint of its device CA (``their_ca``)."""
        cached = self._identities.get(peer.peer_id)
        if cached is not None and cached[0] == peer.their_ca:
            return cached[1]
        try:
            identity = device_id(x509.load_pem_x509_certificate(peer.their_ca.encode("ascii")))
        except ValueError:
            identity = ""
        self._identities[peer.peer_id] = (peer.their_ca, identity)
        return identity

    def address(self, peer: SyncPeer) -> Address | None:
        """Where to dial *peer*: ``[sync.peers]``, else mDNS, else what join recorded."""
        sync = self.sync_config
        static = getattr(sync, "peers", None) or {}
        entry = static.get(peer.peer_id) or static.get(peer.name)
        if entry is not None:
            return Address(entry.host, entry.port, "static")
        identity = self.identity_of(peer)
        found = self.discovered.get(identity)
        if found is None and self.browser is not None:  # advertised before it was joined
            seen = self.browser.peers.get(identity)
            found = (seen.host, seen.port) if seen is not None else None
        if found is not None:
            return Address(found[0], found[1], "mdns")
        if peer.dialable:
            return Address(peer.host, peer.port, "join")
        return None

    def _relay_address(self) -> tuple[str, int] | None:
        relay = getattr(self.sync_config, "relay", "")
        return split_host_port(relay) if relay else None

    def direct_attempts(self) -> int:
        return int(getattr(self.sync_config, "direct_attempts", 2))

    def direct_endpoint(self, link: PeerLink) -> Any:
        address = self.address(link.peer)
        options = self._options.get(link.peer.peer_id)
        if address is None or options is None:
            return None
        peer = dataclasses.replace(link.peer, host=address.host, port=address.port)
        return self._endpoint_for(peer, options[1])

    def relay_endpoint(self, link: PeerLink) -> tuple[Any, Any] | None:
        relay = self._relay_address()
        theirs = self.identity_of(link.peer)
        options = self._options.get(link.peer.peer_id)
        if relay is None or not self.identity or not theirs or theirs == self.identity \
                or options is None:
            return None
        if is_tls_server(self.identity, theirs):
            if self.server_options is None:
                return None
            factory: Any = SyncTLSFactory(self.server_options,
                                          _RelayServerFactory(link, self.server))
        else:
            factory = tls_client_factory(options[1], _ClientFactory(link))
        endpoint = RelayClientEndpoint(
            self.reactor, HostnameEndpoint(self.reactor, relay[0], relay[1],
                                           timeout=CONNECT_TIMEOUT),
            relay_token(self.identity, theirs), self.side, self.relay_wait)
        return endpoint, factory

    def _reachable(self, peer: SyncPeer) -> bool:
        return self.address(peer) is not None or self._relay_address() is not None

    # ------------------------------------------------------------------ mDNS

    def found(self, identity: str, host: str, port: int) -> None:
        """mDNS found a peer (reactor thread): remember where, and try it now."""
        matching = [p for p in self.known.values() if self.identity_of(p) == identity]
        if not matching:
            return  # not one of our peers: an advertisement never makes one
        self.discovered[identity] = (host, port)
        for peer in matching:
            log.info("sync peer {name} found by mDNS at {host}:{port}", name=peer.name,
                     host=host, port=port)
            link = self.links.get(peer.peer_id)
            if link is not None:
                link.kick()
            else:
                self._start_link(peer)

    def _mdns_lost(self, identity: str) -> None:
        # A hint only: the address stays; the connection attempts decide reachability.
        log.debug("sync: mDNS advertisement {identity} withdrawn", identity=identity)

    # ------------------------------------------------------------------ peers

    def refresh(self) -> Deferred[None]:
        """Re-read ``sync_peers``: start links for new peers, stop removed or revoked ones."""
        return self._lock.run(lambda: Deferred.fromCoroutine(self._refresh()))

    async def _refresh(self) -> None:
        rows = {p.peer_id: p for p in await self.peers.list()}
        self.known = rows
        for peer_id, link in list(self.links.items()):
            row = rows.get(peer_id)
            if row is None or row != link.peer or not self._allowed(peer_id):
                await self._drop(peer_id)
        for peer in rows.values():
            self._start_link(peer)

    def _start_link(self, peer: SyncPeer) -> None:
        peer_id = peer.peer_id
        if (peer_id in self.links or not self._allowed(peer_id) or not self._reachable(peer)
                or self.keystore is None):
            return
        try:
            options = client_options(peer, self.keystore)
        except Exception as e:
            log.error("sync peer {name}: cannot use its credentials: {error}",
                      name=peer.name, error=str(e))
            return
        self._options[peer_id] = (peer, options)
        link = PeerLink(peer, self.engine, self.reactor, self,
                        round_interval=self.round_interval, debounce=self.debounce,
                        direct_retry=self.direct_retry)
        self.links[peer_id] = link
        if self.running:
            link.service.setServiceParent(self)  # type: ignore[no-untyped-call]
        else:
            self.addService(link.service)  # type: ignore[no-untyped-call]
        address = self.address(peer)
        log.info("sync peer {name} ({peer_id}) at {where}", name=peer.name, peer_id=peer_id,
                 where=f"{address.host}:{address.port} ({address.source})"
                 if address is not None else "no address yet (relay)")

    def _allowed(self, peer_id: str) -> bool:
        device = self.gate.get(peer_id)
        return device is not None and not device.revoked and device.paired_for == PAIRED_FOR

    async def _drop(self, peer_id: str) -> None:
        link = self.links.pop(peer_id, None)
        self._options.pop(peer_id, None)
        if link is None:
            return
        link.stop()
        link.close()
        if link.service.parent is not None:
            await link.service.disownServiceParent()  # type: ignore[no-untyped-call]

    def close_device(self, device_id: str) -> int:
        """The device was revoked: drop its connections both ways at once."""
        n = self.server.close_device(device_id)
        link = self.links.get(device_id)
        if link is not None:
            # A relayed session we serve is one of the server's too: counted once.
            n += int(link.connected and not isinstance(link.proto, _ServerSyncProtocol))
            link.close()
            Deferred.fromCoroutine(self._drop(device_id)).addErrback(
                lambda f: log.failure("sync: could not stop a revoked peer", f))
        return n

    # ------------------------------------------------------------------ rounds and state

    def _changed(self, collection: str) -> None:
        for link in self.links.values():
            if collection in self.engine.collections_for(link.peer.peer_id):
                link.changed()

    def status(self) -> list[dict[str, Any]]:
        """Every peer, for ``GET /admin/api/sync``."""
        out = []
        for peer_id, peer in sorted(self.known.items()):
            link = self.links.get(peer_id)
            if link is not None:
                entry = link.status()
            else:
                shared = list(self.engine.collections_for(peer_id))
                incoming = peer_id in self.server.live
                entry = {"peer_id": peer_id, "device_id": peer.device_id, "name": peer.name,
                         "host": peer.host, "port": peer.port, "node_id": None,
                         "state": "connected" if incoming else "disconnected",
                         "via": "direct" if incoming else None,
                         "last_round": peer.last_round, "last_error": peer.last_error,
                         "rounds": 0,
                         "collections": {c: self.engine.root(c).hex() for c in shared}}
            address = self.address(peer)
            entry["address"] = None if address is None else dataclasses.asdict(address)
            entry["incoming"] = len(self.server.live.get(peer_id, ()))
            entry["revoked"] = not self._allowed(peer_id)
            out.append(entry)
        return out
