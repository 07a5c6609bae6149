"""The network side of sync: the ``sync`` listener's factory and one client per peer.

* :class:`SyncServerFactory` — AMP :class:`~aico.sync.protocol.SyncProtocol` s behind
  :class:`SyncTLSFactory` (mutual TLS 1.3 with this gateway's device CA as the only
  root). At the connection's first read (TLS 1.3 finishes verifying the client only
  then) the peer's certificate is admitted through the :class:`~aico.gateway.tls.DeviceGate`:
  its device must be in the registry, not revoked, and paired for ``sync``; any other
  gets ``DEVICE_NOT_ALLOWED`` to its first command and the connection is closed.
* :class:`PeerLink` — one peer: a reconnecting
  :class:`~twisted.application.internet.ClientService` (exponential backoff with jitter,
  capped), a round on connect, after local changes (debounced) and periodically, and
  the peer's state for the admin API.
* :class:`SyncService` — the ``sync`` service in the gateway's tree: its children are
  the peers' client services; :meth:`SyncService.refresh` re-reads ``sync_peers`` (at
  start and whenever another process — ``sync join`` — committed to the registry), and
  :meth:`SyncService.close_device` drops a revoked peer at once.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from aico.gateway.api.devices.exceptions import DeviceRefused
from aico.gateway.errors import ApiError
from aico.gateway.tls import SYNC_PEER, DeviceGate
from aico.keystore import Keystore
from aico.sync.interfaces import ISyncEngine
from aico.sync.peers import PeerStore, SyncPeer, client_options
from aico.sync.protocol import SyncError, SyncProtocol

__all__ = [
    "DEBOUNCE",
    "PAIRED_FOR",
    "ROUND_INTERVAL",
    "PeerLink",
    "SyncServerFactory",
    "SyncService",
    "SyncTLSFactory",
]

log = Logger(namespace="aico.sync")

#: The ``paired_for`` of a registry device that is another gateway (sync peer).
PAIRED_FOR = SYNC_PEER
#: Seconds between a local change and the round that carries it (changes coalesce).
DEBOUNCE = 0.2
#: Seconds between periodic rounds with each connected peer.
ROUND_INTERVAL = 30.0
#: Reconnection backoff: first delay, factor, cap (seconds); jitter up to 1 s.
BACKOFF_INITIAL, BACKOFF_FACTOR, BACKOFF_MAX = 1.0, 2.0, 60.0


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


class _SyncTLSProtocol(TLSMemoryBIOProtocol):
    aico_device_id = ""

    def connectionLost(self, reason: Failure | None = None) -> None:
        factory: Any = self.factory
        if self.aico_device_id and factory is not None:
            factory.gate.forget(self)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class SyncTLSFactory(TLSMemoryBIOFactory):
    """Mutual TLS around :class:`SyncServerFactory`; tells the gate when a peer's
    connection ends (the gate cuts a revoked device's connections)."""

    protocol = _SyncTLSProtocol
    noisy = False

    def __init__(self, options: CertificateOptions, factory: SyncServerFactory) -> None:
        super().__init__(options, False, factory)
        self.gate = factory.gate


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


class PeerLink:
    """One peer: its reconnecting client, its rounds, its state."""

    def __init__(self, peer: SyncPeer, engine: ISyncEngine, clock: Any,
                 endpoint: Any, *, round_interval: float = ROUND_INTERVAL,
                 debounce: float = DEBOUNCE) -> None:
        self.peer = peer
        self.engine = engine
        self.clock = clock
        self.round_interval = round_interval
        self.debounce = debounce
        self.proto: SyncProtocol | None = None
        self.last_round: float | None = None
        self.last_error: str | None = None
        self.rounds = 0
        self._running = False
        self._again = False
        self._soon: IDelayedCall | None = None
        self._periodic: IDelayedCall | None = None
        self._stopped = False
        jitter = random.Random()
        policy = backoffPolicy(BACKOFF_INITIAL, BACKOFF_MAX, BACKOFF_FACTOR,
                               jitter=jitter.random)
        self.service = ClientService(endpoint, _ClientFactory(self), retryPolicy=policy,
                                     clock=clock, prepareConnection=self._connected)
        self.service.setName(f"peer {peer.name}")
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
                "node_id": self.proto.remote_node if self.proto is not None else None,
                "last_round": self.last_round, "last_error": self.last_error,
                "rounds": self.rounds,
                "collections": {c: self.engine.root(c).hex() for c in shared}}

    # ------------------------------------------------------------------ connection

    def _connected(self, proxy: Any) -> None:
        # ClientService hands over a proxy around our protocol (it watches its loss).
        proto = getattr(proxy, "_protocol", proxy)
        assert isinstance(proto, SyncProtocol)
        self.proto = proto
        self.last_error = None
        self.round_now()

    def _lost(self, proto: SyncProtocol) -> None:
        if self.proto is proto:
            self.proto = None
        self._cancel_timers()

    def _cancel_timers(self) -> None:
        for call in (self._soon, self._periodic):
            if call is not None and call.active():
                call.cancel()
        self._soon = self._periodic = None

    def stop(self) -> None:
        self._stopped = True
        self._cancel_timers()

    def close(self) -> None:
        """Drop the connection now (the peer was revoked)."""
        transport: Any = self.proto.transport if self.proto is not None else None
        if transport is not None:
            transport.abortConnection()

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
    text = str(error) or type(error).__name__
    code = getattr(error, "code", b"")
    if isinstance(code, bytes) and code:
        return f"{code.decode()}: {text}"
    return f"{type(error).__name__}: {text}"


class SyncService(MultiService):
    """The ``sync`` service: one :class:`PeerLink` per dialable peer of ``sync_peers``."""

    name = "sync"

    def __init__(self, engine: ISyncEngine, peers: PeerStore, keystore: Keystore | None,
                 gate: DeviceGate, reactor: Any,
                 endpoint_for: Callable[[SyncPeer, CertificateOptions], Any] | None = None,
                 *, round_interval: float = ROUND_INTERVAL, debounce: float = DEBOUNCE) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.setName(self.name)  # type: ignore[no-untyped-call]
        self.engine = engine
        self.peers = peers
        self.keystore = keystore
        self.gate = gate
        self.reactor = reactor
        self.round_interval = round_interval
        self.debounce = debounce
        self._endpoint_for = endpoint_for or self._tls_endpoint
        self.links: dict[str, PeerLink] = {}
        #: The peers of sync_peers (dialable or not), by peer ID.
        self.known: dict[str, SyncPeer] = {}
        self.server = SyncServerFactory(engine, gate, reactor)
        self._lock = DeferredLock()
        engine.on_change(self._changed)

    def _tls_endpoint(self, peer: SyncPeer, options: CertificateOptions) -> Any:
        return wrapClientTLS(options, HostnameEndpoint(self.reactor, peer.host, peer.port,
                                                       timeout=10))

    def startService(self) -> Deferred[None]:
        super().startService()  # type: ignore[no-untyped-call]
        d = self.refresh()
        d.addErrback(lambda f: log.failure("sync: first look at the peers failed", f))
        return d

    def stopService(self) -> Deferred[None]:
        for link in self.links.values():
            link.stop()
        self.server.close_all()
        d: Deferred[None] = super().stopService()  # type: ignore[no-untyped-call]
        return d

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
        for peer_id, peer in rows.items():
            if peer_id in self.links or not peer.dialable or not self._allowed(peer_id):
                continue
            if self.keystore is None:
                continue
            try:
                options = client_options(peer, self.keystore)
            except Exception as e:
                log.error("sync peer {name}: cannot use its credentials: {error}",
                          name=peer.name, error=str(e))
                continue
            link = PeerLink(peer, self.engine, self.reactor, self._endpoint_for(peer, options),
                            round_interval=self.round_interval, debounce=self.debounce)
            self.links[peer_id] = link
            if self.running:
                link.service.setServiceParent(self)
            else:
                self.addService(link.service)  # type: ignore[no-untyped-call]
            log.info("sync peer {name} ({peer_id}) at {host}:{port}", name=peer.name,
                     peer_id=peer_id, host=peer.host, port=peer.port)

    def _allowed(self, peer_id: str) -> bool:
        device = self.gate.get(peer_id)
        return device is not None and not device.revoked and device.paired_for == PAIRED_FOR

    async def _drop(self, peer_id: str) -> None:
        link = self.links.pop(peer_id, None)
        if link is None:
            return
        link.stop()
        link.close()
        if link.service.parent is not None:
            await link.service.disownServiceParent()

    def close_device(self, device_id: str) -> int:
        """The device was revoked: drop its connections both ways at once."""
        n = self.server.close_device(device_id)
        link = self.links.get(device_id)
        if link is not None:
            n += int(link.connected)
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
                entry = {"peer_id": peer_id, "device_id": peer.device_id, "name": peer.name,
                         "host": peer.host, "port": peer.port, "node_id": None,
                         "state": "connected" if peer_id in self.server.live else "disconnected",
                         "last_round": peer.last_round, "last_error": peer.last_error,
                         "rounds": 0,
                         "collections": {c: self.engine.root(c).hex() for c in shared}}
            entry["incoming"] = len(self.server.live.get(peer_id, ()))
            entry["revoked"] = not self._allowed(peer_id)
            out.append(entry)
        return out
