"""Detached mode: the ``tls`` listener (HTTPS + WSS with mutual TLS 1.3) and its devices.

* :func:`server_options` — Twisted TLS options from ``cryptography`` objects: TLS 1.3
  only, the gateway's server certificate, a client certificate *required* and verified
  against the device CA (the only trust root).
* :class:`DeviceGate` — the in-memory cache of the device registry (loaded at start,
  updated by the gateway's own changes and by :class:`~aico.gateway.devices.registry.ChangeWatcher`
  when another process such as the CLI changed it), so the hot path never waits on
  SQLite; it admits a connection's device, tracks every live TLS connection per device,
  and cuts them all when the device is revoked; ``last_seen`` is written, throttled,
  through :meth:`DeviceStore.touch <aico.gateway.devices.registry.DeviceStore.touch>`.
* :class:`DeviceSite` / :class:`DeviceChannel` — the ``twisted.web`` site of the ``tls``
  listener: the same resource, limits and security chain as ``http``; at the first
  read of a connection (TLS 1.3 finishes verifying the client only then) the device is
  looked up, and an unknown or revoked one is answered 403 ``device_not_allowed`` and
  the connection closed.
* :class:`DeviceTLSFactory` — wraps the site in TLS and tells the gate when a
  connection ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory, IReactorTime
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from zope.interface import implementer

from aico.gateway.adapters.rest import GatewaySite, LimitedChannel
from aico.gateway.api.devices.exceptions import DeviceRefused
from aico.gateway.devices.ca import device_id as device_id_of
from aico.gateway.devices.registry import Device, DeviceStore
from aico.gateway.errors import ApiError

__all__ = [
    "ABORT_AFTER",
    "TOUCH_INTERVAL",
    "DeviceChannel",
    "DeviceGate",
    "DeviceSite",
    "DeviceTLSFactory",
    "device_id_of_request",
    "device_id_of_transport",
    "server_options",
]

#: Seconds between two ``last_seen`` writes for one device.
TOUCH_INTERVAL = 60.0
#: Seconds a revoked device's connections get to close gracefully (the WebSocket close
#: frame, the TLS close_notify) before they are aborted: well within the promised 1 s.
ABORT_AFTER = 0.5


@implementer(IOpenSSLTrustRoot)
class _DeviceCATrust:
    """Trust exactly the device CA (no system roots)."""

    def __init__(self, ca_cert: x509.Certificate) -> None:
        self.ca_cert = ca_cert

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.get_cert_store().add_cert(X509.from_cryptography(self.ca_cert))  # type: ignore[union-attr]
        # Tell clients which CA we want (CertificateRequest's certificate_authorities).
        context.add_client_ca(self.ca_cert)


def server_options(ca_cert: x509.Certificate, server_cert: x509.Certificate,
                   server_key: ec.EllipticCurvePrivateKey) -> CertificateOptions:
    """TLS 1.3 only; a client certificate issued by *ca_cert* required."""
    key: Any = server_key  # pyOpenSSL takes cryptography objects (typed as its own)
    cert: Any = server_cert
    trust: Any = _DeviceCATrust(ca_cert)
    return CertificateOptions(privateKey=key, certificate=cert, trustRoot=trust,
                              raiseMinimumTo=TLSVersion.TLSv1_3)


def device_id_of_transport(transport: Any) -> str:
    """The device ID a TLS connection was admitted with ("" before, or on plain TCP)."""
    return str(getattr(transport, "aico_device_id", "") or "")


def device_id_of_request(request: IRequest) -> str:
    """The device ID of the connection a ``twisted.web`` request came on."""
    channel = getattr(request, "channel", None)
    return device_id_of_transport(getattr(channel, "transport", None))


class DeviceGate:
    """The device registry in memory, and every live TLS connection per device."""

    log = Logger()

    def __init__(self, store: DeviceStore, clock: IReactorTime,
                 close_sessions: Callable[[str], int] = lambda device_id: 0,
                 touch_interval: float = TOUCH_INTERVAL) -> None:
        self.store = store
        self.clock = clock
        #: Closes a device's WebSocket (and later sync) sessions, e.g.
        #: :meth:`ConnectionManager.close_device <aico.gateway.connections.ConnectionManager.close_device>`.
        self.close_sessions = close_sessions
        self.touch_interval = touch_interval
        self._devices: dict[str, Device] = {}
        #: Live TLS connections by device ID.
        self._live: dict[str, set[TLSMemoryBIOProtocol]] = {}
        self._touched: dict[str, float] = {}
        #: Pending aborts of revoked devices' connections (cancelled at stop).
        self._aborts: set[IDelayedCall] = set()

    def stop(self) -> None:
        """Cancel pending aborts (the listeners close every connection anyway)."""
        for call in list(self._aborts):
            if call.active():
                call.cancel()
        self._aborts.clear()

    # -- the cache ---------------------------------------------------------------------

    def load(self) -> Deferred[None]:
        """Read every device (at start, and when another process changed the registry)."""
        return Deferred.fromCoroutine(self._load())

    async def _load(self) -> None:
        devices = await self.store.list()
        self.replace(devices)

    def replace(self, devices: list[Device]) -> None:
        """Take *devices* as the registry; cut the connections of newly revoked ones."""
        before = self._devices
        self._devices = {d.device_id: d for d in devices}
        for did, device in self._devices.items():
            old = before.get(did)
            if device.revoked and (old is None or not old.revoked):
                self.cut(did)
        for did in set(before) - set(self._devices):  # deleted outright
            self.cut(did)

    def refresh(self) -> Deferred[None]:
        """ChangeWatcher listener: another process committed to the registry."""
        return self.load()

    def remember(self, device: Device) -> None:
        """The gateway itself added or changed *device* (pairing, rename, revoke)."""
        old = self._devices.get(device.device_id)
        self._devices[device.device_id] = device
        if device.revoked and (old is None or not old.revoked):
            self.cut(device.device_id)

    def known(self, device_id: str) -> Device | None:
        """The device if it is paired and not revoked (the hot path: a dict lookup)."""
        device = self._devices.get(device_id)
        if device is None or device.revoked:
            return None
        return device

    def lookup(self, device_id: str) -> Device | None:
        """:meth:`known`, noting that the device was seen (the security chain's lookup)."""
        device = self.known(device_id)
        if device is not None:
            self.seen(device_id)
        return device

    def get(self, device_id: str) -> Device | None:
        """The registry entry, revoked or not."""
        return self._devices.get(device_id)

    def revoke(self, device_id: str) -> Deferred[bool]:
        """Revoke in the registry, then cut the device's connections at once."""
        return Deferred.fromCoroutine(self._revoke(device_id))

    async def _revoke(self, device_id: str) -> bool:
        changed = await self.store.revoke(device_id)
        device = await self.store.get(device_id)
        if device is not None:
            self.remember(device)
        return changed

    # -- connections -------------------------------------------------------------------

    def admit(self, transport: Any) -> Device:
        """The device of a TLS connection whose handshake is done; raises
        :class:`DeviceRefused` for a device that is unknown or revoked."""
        did = device_id_of_transport(transport)
        if not did:
            peer = transport.getPeerCertificate() if transport is not None else None
            if peer is None:
                raise DeviceRefused("a client certificate is required")
            did = device_id_of(peer.to_cryptography())
        device = self.known(did)
        if device is None:
            raise DeviceRefused()
        if transport.aico_device_id != did:
            transport.aico_device_id = did
            self._live.setdefault(did, set()).add(transport)
        self.seen(did)
        return device

    def forget(self, transport: TLSMemoryBIOProtocol) -> None:
        """A TLS connection ended."""
        did = device_id_of_transport(transport)
        live = self._live.get(did)
        if live is not None:
            live.discard(transport)
            if not live:
                del self._live[did]

    def live(self, device_id: str) -> int:
        """How many TLS connections *device_id* has open."""
        return len(self._live.get(device_id, ()))

    def cut(self, device_id: str) -> int:
        """Close every connection of *device_id*: WebSocket sessions get their close frame,
        HTTP connections a TLS close; whatever is still open after :data:`ABORT_AFTER`
        seconds is aborted. Returns how many TLS connections there were."""
        sessions = self.close_sessions(device_id)
        transports = list(self._live.get(device_id, ()))
        for transport in transports:
            if isinstance(getattr(transport, "wrappedProtocol", None), LimitedChannel):
                transport.loseConnection()
        if transports:
            call = self.clock.callLater(ABORT_AFTER, self._abort, device_id, transports)
            self._aborts.add(call)
            self.log.info("device {device_id} revoked: closing {n} connection(s) "
                          "({sessions} session(s))", device_id=device_id, n=len(transports),
                          sessions=sessions)
        return len(transports)

    def _abort(self, device_id: str, transports: list[TLSMemoryBIOProtocol]) -> None:
        self._aborts = {c for c in self._aborts if c.active()}
        live = self._live.get(device_id, set())
        for transport in transports:
            if transport in live:
                transport.abortConnection()

    def seen(self, device_id: str) -> None:
        """Note a request of *device_id*; ``last_seen`` is written at most every
        ``touch_interval`` seconds, in the background."""
        now = self.clock.seconds()
        if now - self._touched.get(device_id, -math.inf) < self.touch_interval:
            return
        self._touched[device_id] = now
        d = Deferred.fromCoroutine(self.store.touch(device_id))
        d.addErrback(lambda f: self.log.failure("could not note that {device_id} was seen", f,
                                                device_id=device_id))


#: The ``paired_for`` of a registry device that is another gateway (``sync join``): its
#: certificate opens the ``sync`` listener only, never HTTPS/WSS or the admin site.
SYNC_PEER = "sync"


class DeviceChannel(LimitedChannel):
    """An HTTP channel over mutual TLS: its device is admitted at the first read."""

    device: Device | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.device is None and not self._refused:
            gate: DeviceGate | None = getattr(getattr(self, "site", None), "gate", None)
            try:
                if gate is None:
                    raise DeviceRefused("no device registry")
                device = gate.admit(self.transport)
                if device.paired_for == SYNC_PEER:
                    raise DeviceRefused("a sync peer's certificate opens only the sync listener")
                self.device = device
            except ApiError as error:
                self.refuse(error)
                return
        super().dataReceived(data)  # type: ignore[no-untyped-call]


class DeviceSite(GatewaySite):
    """The ``tls`` listener's site: :class:`GatewaySite` with device admission."""

    protocol = DeviceChannel

    def __init__(self, *args: Any, gate: DeviceGate, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate


class _DeviceTLSProtocol(TLSMemoryBIOProtocol):
    aico_device_id = ""

    def connectionLost(self, reason: Failure | None = None) -> None:
        factory: Any = self.factory
        if self.aico_device_id and factory is not None:
            factory.gate.forget(self)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class DeviceTLSFactory(TLSMemoryBIOFactory):
    """TLS around the ``tls`` site; tells the gate when a device's connection ends."""

    protocol = _DeviceTLSProtocol
    noisy = False

    def __init__(self, options: CertificateOptions, site: IProtocolFactory,
                 gate: DeviceGate) -> None:
        super().__init__(options, False, site)
        self.gate = gate
