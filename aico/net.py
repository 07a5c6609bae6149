"""Is this address loopback? One answer for the bus, the config and every adapter."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback(host: str | None) -> bool:
    """True for ``localhost`` and any loopback IPv4/IPv6 address (``127.0.0.0/8``, ``::1``)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ``ipc://``, ``inproc://`` and ``tcp://`` ZeroMQ endpoints on a loopback host
    (``*`` as the port is allowed)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    try:
        host = urlsplit(endpoint.replace(":*", ":0")).hostname
    except ValueError:
        return False
    return is_loopback(host)
