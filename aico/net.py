"""Is this address loopback? One answer for the bus, the config and every adapter; and
which source an address counts as (:func:`source_identity`)."""

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


def source_identity(host: str) -> str:
    """Who a peer address is, for counting: the key a caller cannot choose.

    Every loopback address (all of ``127.0.0.0/8``, ``::1``, ``localhost``) is one
    identity, ``"loopback"``: a local process can bind any of them, so they are one
    source. An IPv6 address counts as its /64 network (``"2001:db8:1:2::/64"``), the
    smallest block one host is normally given; an IPv4 address (also one written
    IPv4-mapped, ``::ffff:192.0.2.7``) as itself. Anything that is not an address is
    returned unchanged.
    """
    if host == "localhost":
        return "loopback"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "loopback"
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)
