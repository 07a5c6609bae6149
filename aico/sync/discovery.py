"""Finding sync peers on the LAN over mDNS (``_aico-sync._tcp``).

:class:`SyncAdvertiser` registers ``INSTANCE._aico-sync._tcp.local.`` with the ``sync``
listener's port and a TXT record ``{"v": "1", "id": IDENTITY}`` — this gateway's sync
identity (its device-CA fingerprint in device-ID form, or its node id): public, never a
secret. :class:`SyncBrowser` browses the same type, resolves what it sees, and reports
``on_found(identity, host, port)`` and ``on_lost(identity)``; it ignores its own record.

An advertisement only says *where* a peer may be. Whom to trust is decided by mutual TLS
against the certificates exchanged at ``sync join`` (SPEC §6), never by a TXT record: a
forged advertisement can at worst make us dial an address where the TLS handshake fails.

``zeroconf`` runs its own thread and asyncio loop. Every blocking zeroconf call here
(creating and closing ``Zeroconf``, registering, resolving) runs on the reactor's thread
pool; the browser's callbacks, which zeroconf fires on its browser thread, only hand the
name to the reactor with ``reactor.callFromThread``; ``on_found`` / ``on_lost`` are always
called on the reactor thread. Both services close their ``Zeroconf`` in ``stopService``,
off the reactor thread. Both can be restricted to interfaces (``interfaces=["192.168.1.10"]``;
tests use ``["127.0.0.1"]`` so nothing reaches the real network).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "SERVICE_TYPE",
    "FoundPeer",
    "SyncAdvertiser",
    "SyncBrowser",
    "peer_of",
    "sync_addresses",
]

SERVICE_TYPE = "_aico-sync._tcp.local."
#: The TXT record's version: a browser ignores records of another version.
TXT_VERSION = "1"
#: The longest identity accepted from the network (a device ID is 63 characters).
MAX_IDENTITY = 128
#: Milliseconds one resolution may wait for the records it lacks.
RESOLVE_TIMEOUT_MS = 3000

log = Logger(namespace="aico.sync.discovery")


def sync_addresses(interfaces: Sequence[str]) -> list[str]:
    """The addresses put in the A/AAAA records: *interfaces* when given, else every
    non-loopback address of the machine."""
    if interfaces:
        return list(interfaces)
    from aico.gateway.devices.mdns import lan_addresses

    return lan_addresses()


def _zeroconf_interfaces(interfaces: Sequence[str]) -> Any:
    from zeroconf import InterfaceChoice

    return list(interfaces) or InterfaceChoice.All


# --------------------------------------------------------------------------- advertiser


class SyncAdvertiser(Service):
    """Advertises this gateway's ``sync`` listener as ``_aico-sync._tcp``.

    *port* is the listener's port, or a function returning it (called on the reactor
    thread in ``startService``, so a listener on port 0 can be advertised once bound);
    :meth:`update_port` changes it later. *identity* goes in the TXT record as ``id``.
    """

    name = "sync-mdns"

    def __init__(self, reactor: Any, identity: str, port: int | Callable[[], int],
                 interfaces: Sequence[str] = (), *, instance: str = "") -> None:
        if not identity or len(identity) > MAX_IDENTITY:
            raise ValueError(f"a sync identity is 1 to {MAX_IDENTITY} characters")
        self.reactor = reactor
        self.identity = identity
        self.port = port
        self.interfaces = tuple(interfaces)
        self.instance = instance or socket.gethostname().split(".")[0]
        self._zc: Any = None
        self._info: Any = None
        self._lock = DeferredLock()
        #: The (port, TXT) last published (read on the reactor thread; tests use it).
        self.published: tuple[int, dict[str, str]] | None = None

    def _run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return self._lock.run(deferToThreadPool, self.reactor, self.reactor.getThreadPool(),
                              fn, *args)

    def _txt(self) -> dict[str, str]:
        return {"v": TXT_VERSION, "id": self.identity}

    def _service_info(self, port: int) -> Any:
        from zeroconf import ServiceInfo

        short = "".join(c for c in self.identity if c.isalnum())[:7].lower() or "peer"
        label = f"{self.instance[:40]} {short}"
        return ServiceInfo(SERVICE_TYPE, f"{label}.{SERVICE_TYPE}", port=port,
                           properties=self._txt(), server=f"aico-sync-{short}.local.",
                           parsed_addresses=sync_addresses(self.interfaces))

    def startService(self) -> Deferred[None]:
        Service.startService(self)
        port = self.port() if callable(self.port) else self.port
        d: Deferred[None] = self._run(self._register_blocking, port)
        d.addCallback(lambda _: self._published(port))
        return d.addErrback(lambda f: log.failure("mDNS: could not advertise sync", f))

    def _register_blocking(self, port: int) -> None:
        from zeroconf import Zeroconf

        zc = Zeroconf(interfaces=_zeroconf_interfaces(self.interfaces))
        self._zc = zc
        info = self._service_info(port)
        zc.register_service(info, allow_name_change=True)
        self._info = info
        log.info("mDNS: advertising sync as {name} on port {port}", name=info.name, port=port)

    def _published(self, port: int) -> None:
        self.published = (port, self._txt())

    def update_port(self, port: int) -> Deferred[None]:
        """Advertise *port* from now on (e.g. the listener was rebound)."""
        self.port = port
        if not self.running:
            return succeed(None)
        d: Deferred[None] = self._run(self._update_blocking, port)
        d.addCallback(lambda _: self._published(port))
        return d.addErrback(lambda f: log.failure("mDNS: could not update the sync advertisement", f))

    def _update_blocking(self, port: int) -> None:
        from zeroconf import ServiceInfo

        if self._zc is None or self._info is None:
            return
        old = self._info
        info = ServiceInfo(old.type, old.name, port=port, properties=self._txt(),
                           server=old.server, parsed_addresses=old.parsed_addresses())
        self._zc.update_service(info)
        self._info = info

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        d: Deferred[None] = self._run(self._close_blocking)
        d.addCallback(lambda _: setattr(self, "published", None))
        return d.addErrback(lambda f: log.failure("mDNS: could not close", f))

    def _close_blocking(self) -> None:
        zc, self._zc = self._zc, None
        self._info = None
        if zc is not None:
            try:
                zc.unregister_all_services()  # goodbye packets: browsers see us go
            finally:
                zc.close()


# --------------------------------------------------------------------------- browser


@dataclass(frozen=True)
class FoundPeer:
    """What one advertisement says: who, and where to dial."""

    identity: str
    host: str
    port: int


def peer_of(info: Any) -> FoundPeer | None:
    """The peer a resolved ``ServiceInfo`` advertises, or None when it is not a valid
    sync advertisement (wrong version, no or odd identity, no address, bad port)."""
    from zeroconf import IPVersion

    props = info.properties or {}
    version, identity = props.get(b"v"), props.get(b"id")
    if version != TXT_VERSION.encode() or not isinstance(identity, bytes):
        return None
    try:
        text = identity.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text or len(text) > MAX_IDENTITY or not text.isprintable():
        return None
    port = info.port
    if not isinstance(port, int) or not 0 < port < 65536:
        return None
    addresses = info.parsed_addresses(IPVersion.V4Only) or info.parsed_addresses()
    if not addresses:
        return None
    return FoundPeer(text, addresses[0], port)


class SyncBrowser(Service):
    """Browses ``_aico-sync._tcp`` and reports peers, on the reactor thread.

    ``on_found(identity, host, port)`` is called when a peer's advertisement is first
    resolved and again whenever its host or port changes; ``on_lost(identity)`` when it
    is withdrawn. zeroconf reports a withdrawal about a second after the peer's goodbye
    packet (sent when its advertiser stops); a peer that vanishes without one (killed,
    unplugged) is reported lost only when its PTR record expires, which zeroconf lets
    live up to 75 minutes (RFC 6762) — so ``on_lost`` is a hint, and a peer's
    reachability is decided by its client's connection attempts, never by mDNS. Our own
    record (*own_identity*) is never reported. Stopping the browser reports nothing.
    Exceptions raised by the callbacks are logged.
    """

    name = "sync-mdns-browser"

    def __init__(self, reactor: Any, own_identity: str,
                 on_found: Callable[[str, str, int], object],
                 on_lost: Callable[[str], object],
                 interfaces: Sequence[str] = ()) -> None:
        self.reactor = reactor
        self.own_identity = own_identity
        self.on_found = on_found
        self.on_lost = on_lost
        self.interfaces = tuple(interfaces)
        self._zc: Any = None
        self._browser: Any = None
        self._lock = DeferredLock()
        #: Instance name → the peer it advertises (reactor thread only).
        self._names: dict[str, FoundPeer] = {}
        #: Instance name → events seen, so a slow resolution never undoes a later removal.
        self._generation: dict[str, int] = {}
        #: Runs a blocking function off the reactor thread (tests replace it).
        self.in_thread: Callable[..., Deferred[Any]] = self._in_pool

    def _in_pool(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

    @property
    def peers(self) -> dict[str, FoundPeer]:
        """The peers currently advertised, by identity."""
        return {p.identity: p for p in self._names.values()}

    def startService(self) -> Deferred[None]:
        Service.startService(self)
        d: Deferred[None] = self._lock.run(self.in_thread, self._start_blocking)
        return d.addErrback(lambda f: log.failure("mDNS: could not browse for sync peers", f))

    def _start_blocking(self) -> None:
        from zeroconf import ServiceBrowser, Zeroconf

        zc = Zeroconf(interfaces=_zeroconf_interfaces(self.interfaces))
        self._zc = zc
        self._browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[self._changed])

    def _changed(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        """zeroconf's handler, on its browser thread: hand the event to the reactor."""
        from zeroconf import ServiceStateChange

        if state_change is ServiceStateChange.Removed:
            self.reactor.callFromThread(self.removed, name)
        else:
            self.reactor.callFromThread(self.seen, name)

    # Everything below runs on the reactor thread.

    def seen(self, name: str) -> None:
        """An advertisement appeared or changed: resolve it off the reactor thread."""
        if not self.running:
            return
        generation = self._generation.get(name, 0) + 1
        self._generation[name] = generation
        d: Deferred[Any] = self.in_thread(self._resolve_blocking, name)
        d.addCallback(self._resolved, name, generation)
        d.addErrback(self._resolve_failed, name)

    def _resolve_blocking(self, name: str) -> FoundPeer | None:
        zc = self._zc
        if zc is None:
            return None
        info = zc.get_service_info(SERVICE_TYPE, name, timeout=RESOLVE_TIMEOUT_MS)
        return None if info is None else peer_of(info)

    def _resolve_failed(self, failure: Failure, name: str) -> None:
        if self.running:
            log.failure("mDNS: could not resolve {name}", failure, name=name)

    def _resolved(self, peer: FoundPeer | None, name: str, generation: int) -> None:
        if not self.running or self._generation.get(name) != generation:
            return  # stopped, or removed/updated again meanwhile
        if peer is None or peer.identity == self.own_identity:
            return
        before = self._names.get(name)
        self._names[name] = peer
        if before is not None and before.identity != peer.identity:
            self._lost_if_gone(before.identity)
        if before != peer:
            self._call(self.on_found, peer.identity, peer.host, peer.port)

    def removed(self, name: str) -> None:
        """An advertisement was withdrawn."""
        self._generation[name] = self._generation.get(name, 0) + 1
        peer = self._names.pop(name, None)
        if peer is not None and self.running:
            self._lost_if_gone(peer.identity)

    def _lost_if_gone(self, identity: str) -> None:
        if all(p.identity != identity for p in self._names.values()):
            self._call(self.on_lost, identity)

    def _call(self, fn: Callable[..., object], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.failure("mDNS: a sync discovery callback failed")

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self._names.clear()
        d: Deferred[None] = self._lock.run(self.in_thread, self._close_blocking)
        return d.addErrback(lambda f: log.failure("mDNS: could not close the browser", f))

    def _close_blocking(self) -> None:
        browser, self._browser = self._browser, None
        zc, self._zc = self._zc, None
        try:
            if browser is not None:
                browser.cancel()
        finally:
            if zc is not None:
                zc.close()
