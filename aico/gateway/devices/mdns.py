"""Advertising the gateway on the LAN over mDNS (``_aico-gateway._tcp``).

The advertisement is a hint for finding the gateway, never a reason to trust it: TXT
carries the gateway's name, its certificate fingerprint (device-ID form), whether a
pairing window is open and the ports; a device trusts only the fingerprint it receives
*inside* the pairing protocol, under the PAKE key.

``zeroconf`` runs its own thread and asyncio loop, and its registration calls block
while it probes and announces: every call here runs on a pool thread, one at a time
(a :class:`~twisted.internet.defer.DeferredLock`), and only results come back to the
reactor. The advertiser closes its ``Zeroconf`` in ``stopService``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zeroconf import InterfaceChoice, ServiceInfo, Zeroconf

from aico.net import is_loopback

__all__ = ["SERVICE_TYPE", "MdnsAdvertiser", "advertised_addresses", "should_advertise"]

SERVICE_TYPE = "_aico-gateway._tcp.local."

log = Logger(namespace="aico.gateway.mdns")


def should_advertise(config: Any) -> bool:
    """``[mdns] advertise``: ``on``, ``off``, or ``auto`` (a listener on a LAN address)."""
    mode = config.mdns.advertise
    if mode != "auto":
        return bool(mode == "on")
    return any(section.enabled and not is_loopback(section.host)
               for section in (config.tls, config.pairing))


def advertised_addresses(config: Any) -> list[str]:
    """The addresses put in the A/AAAA records: ``[mdns] interfaces``, else the listeners'
    host when it is one address, else every non-loopback IPv4 address of the machine."""
    if config.mdns.interfaces:
        return list(config.mdns.interfaces)
    hosts = {s.host for s in (config.tls, config.pairing) if s.enabled}
    fixed = [h for h in hosts if h not in ("0.0.0.0", "::")]  # noqa: S104
    if fixed:
        return sorted(fixed)
    return lan_addresses()


def lan_addresses() -> list[str]:
    """Every non-loopback IPv4 address of this machine's interfaces."""
    import ifaddr

    out: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not is_loopback(ip.ip):
                out.append(ip.ip)
    return out


class MdnsAdvertiser(Service):
    """Registers ``NAME._aico-gateway._tcp.local.`` and updates its TXT when pairing opens
    or closes."""

    name = "mdns"

    def __init__(self, reactor: Any, config: Any, pairing: Any,
                 addresses: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.reactor = reactor
        self.config = config
        self.pairing = pairing
        self.addresses = addresses
        self.gateway_name = config.mdns.name or socket.gethostname().split(".")[0]
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None
        self._lock = DeferredLock()
        #: The TXT record last published (tests read it).
        self.published: dict[str, str] = {}

    def _txt(self, pairing_open: bool, pairing_port: int | None) -> dict[str, str]:
        txt = {"v": "1", "name": self.gateway_name, "fp": self.pairing.fingerprint,
               "pairing": "open" if pairing_open else "closed"}
        if pairing_open and pairing_port is not None:
            txt["pairing_port"] = str(pairing_port)
        tls = self.addresses().get("tls")
        if tls is not None:
            txt["tls_port"] = str(tls["port"])
        return txt

    def _service_info(self, txt: dict[str, str]) -> ServiceInfo:
        tls = self.addresses().get("tls")
        port = int(tls["port"]) if tls is not None else int(
            txt.get("pairing_port") or self.config.pairing.port)
        short = (self.pairing.fingerprint or "0000000")[:7]
        instance = f"{self.gateway_name} {short}"
        return ServiceInfo(
            SERVICE_TYPE, f"{instance}.{SERVICE_TYPE}", port=port, properties=txt,
            server=f"aico-{short.lower()}.local.",
            parsed_addresses=advertised_addresses(self.config))

    def _run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return self._lock.run(deferToThreadPool, self.reactor, self.reactor.getThreadPool(),
                              fn, *args)

    def startService(self) -> Deferred[None]:
        Service.startService(self)
        self.pairing.observers.append(self._pairing_changed)
        port = self.pairing.listening_port
        txt = self._txt(port is not None, port)
        interfaces: Any = list(self.config.mdns.interfaces) or InterfaceChoice.All
        d: Deferred[None] = self._run(self._register_blocking, interfaces, txt)
        d.addCallback(self._published, txt)
        return d.addErrback(lambda f: log.failure("mDNS: could not advertise the gateway", f))

    def _register_blocking(self, interfaces: Any, txt: dict[str, str]) -> None:
        zc = Zeroconf(interfaces=interfaces)
        self._zc = zc
        info = self._service_info(txt)
        zc.register_service(info, allow_name_change=True)
        self._info = info
        log.info("mDNS: advertising {name} ({type})", name=info.name, type=SERVICE_TYPE)

    def _pairing_changed(self, pairing_open: bool, port: int | None) -> None:
        txt = self._txt(pairing_open, port)
        self._run(self._update_blocking, txt).addCallback(self._published, txt).addErrback(
            lambda f: log.failure("mDNS: could not update the advertisement", f))

    def _update_blocking(self, txt: dict[str, str]) -> None:
        if self._zc is None or self._info is None:
            return
        old = self._info
        info = self._service_info(txt)
        info = ServiceInfo(old.type, old.name, port=info.port, properties=txt,
                           server=old.server, parsed_addresses=old.parsed_addresses())
        self._zc.update_service(info)
        self._info = info

    def _published(self, _: object, txt: dict[str, str]) -> None:
        self.published = txt  # on the reactor thread

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._pairing_changed in self.pairing.observers:
            self.pairing.observers.remove(self._pairing_changed)
        d: Deferred[None] = self._run(self._close_blocking)
        return d.addErrback(lambda f: log.failure("mDNS: could not close", f))

    def _close_blocking(self) -> None:
        zc, self._zc = self._zc, None
        if zc is not None:
            try:
                zc.unregister_all_services()
            finally:
                zc.close()
