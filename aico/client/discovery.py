"""Finding a gateway on the LAN over mDNS (``_aico-gateway._tcp``).

:func:`browse` looks for gateways for up to *timeout* seconds and returns what it found
(stopping early once one has a pairing window open, when *want_pairing*). What the
advertisement says is only where to connect: the gateway is trusted through the
fingerprint received during pairing, never through its TXT record.

``zeroconf`` runs its own thread; the whole browse runs on a pool thread and only its
result comes back to the reactor (the browser's callbacks only put names in a queue).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

__all__ = ["SERVICE_TYPE", "FoundGateway", "browse"]

SERVICE_TYPE = "_aico-gateway._tcp.local."


@dataclass(frozen=True)
class FoundGateway:
    instance: str
    name: str
    addresses: tuple[str, ...]
    #: The advertised fingerprint: a hint shown to the user, never trusted.
    fingerprint_hint: str
    pairing_open: bool
    pairing_port: int | None
    tls_port: int | None


def browse(reactor: Any, timeout: float = 3.0, interfaces: Sequence[str] = (),
           want_pairing: bool = True) -> Deferred[list[FoundGateway]]:
    """The gateways advertised on the LAN (on *interfaces*, else every interface)."""
    d: Deferred[list[FoundGateway]] = deferToThreadPool(
        reactor, reactor.getThreadPool(), _browse_blocking, timeout, tuple(interfaces),
        want_pairing)
    return d


def _text(props: dict[Any, Any], key: str) -> str:
    value = props.get(key.encode())
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else ""


def _found(info: Any) -> FoundGateway:
    props = info.properties or {}
    pairing_port = _text(props, "pairing_port")
    tls_port = _text(props, "tls_port")
    return FoundGateway(
        instance=str(info.name), name=_text(props, "name"),
        addresses=tuple(info.parsed_addresses()), fingerprint_hint=_text(props, "fp"),
        pairing_open=_text(props, "pairing") == "open",
        pairing_port=int(pairing_port) if pairing_port.isdigit() else None,
        tls_port=int(tls_port) if tls_port.isdigit() else None)


def _browse_blocking(timeout: float, interfaces: tuple[str, ...],
                     want_pairing: bool) -> list[FoundGateway]:
    from zeroconf import InterfaceChoice, ServiceBrowser, ServiceStateChange, Zeroconf

    names: queue.Queue[str] = queue.Queue()

    def changed(zeroconf: Any, service_type: str, name: str,
                state_change: ServiceStateChange) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names.put(name)

    zc = Zeroconf(interfaces=list(interfaces) or InterfaceChoice.All)
    found: dict[str, FoundGateway] = {}
    deadline = time.monotonic() + timeout
    browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[changed])
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                name = names.get(timeout=remaining)
            except queue.Empty:
                break
            info = zc.get_service_info(SERVICE_TYPE, name,
                                       timeout=int(max(0.1, min(remaining, 3.0)) * 1000))
            if info is None:
                continue
            gateway = _found(info)
            found[name] = gateway
            if want_pairing and gateway.pairing_open and gateway.pairing_port:
                break
    finally:
        browser.cancel()
        zc.close()
    return list(found.values())
