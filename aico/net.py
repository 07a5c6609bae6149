"""Is this address loopback? One answer for the bus, the config and every adapter."""

from __future__ import annotations

import functools
import ipaddress
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import tcp


@functools.lru_cache(maxsize=1024)
def is_loopback(host: str | None) -> bool:
    """True for ``localhost`` and any loopback IPv4/IPv6 address (``127.0.0.0/8``, ``::1``).

    A pure function of the string, cached (bounded, least recently used first out): every
    REST request asks it about its peer address and, through the DNS-rebinding guard,
    about its ``Host`` name and the listener's configured host, and an ``ipaddress``
    parse costs ~4 µs where the cache's look-up costs ~0.1 µs. Decisions that depend on
    the config (the guard's ``allowed_hosts``) are made by the callers on every request,
    never cached here.
    """
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


@functools.lru_cache(maxsize=4096)
def source_identity(host: str) -> str:
    """Who a peer address stands for, for counting (rate limits, login failures).

    * every loopback address — all of ``127.0.0.0/8``, ``::1``, ``localhost``, and
      loopback written as an IPv4-mapped IPv6 address — is the one identity ``loopback``:
      a local process can pick any of them, so they must not be fresh budgets;
    * an IPv6 address stands for its ``/64`` (one host or site usually owns a whole
      /64), written ``2001:db8:1:2::/64``;
    * an IPv4 address is itself (an IPv4-mapped IPv6 address counts as its IPv4 one);
    * anything else (not an IP address, e.g. an empty peer) is returned as given.
    """
    if host == "localhost":
        return "loopback"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone says nothing
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if isinstance(ip, ipaddress.IPv6Address):
        prefix = ipaddress.IPv6Address(int(ip) >> 64 << 64)
        return f"{prefix}/64"
    return str(ip)


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, handing the bytes to the socket at once when it can.

    Twisted's ``write`` buffers the bytes and registers the socket for writability: the
    send happens on the reactor's next turn, after two ``epoll_ctl`` calls and a dispatch
    (~30 µs a WebSocket answer here, docs/performance.md). On a plain TCP transport that
    holds nothing unsent, is not closing and is connected, this sends straight away; what
    the socket does not take (a full send buffer), and every other case, goes through
    ``transport.write`` as before, so the order of bytes, the producer's flow control and
    the reporting of a broken connection stay Twisted's.
    """
    if (type(transport) is tcp.Server and transport.connected
            and not transport.disconnecting and not transport._writeDisconnected
            and not transport._tempDataLen and transport.offset == len(transport.dataBuffer)):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error Twisted's own write path will meet and report
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
