"""The DNS-rebinding guard: which ``Host`` a loopback listener answers.

A web page whose name an attacker re-points at 127.0.0.1 makes the browser send requests
to this machine with ``Host: evil.example``; a listener on loopback answers only requests
whose ``Host`` is a loopback name (``localhost``, a loopback address such as ``127.0.0.1``
or ``[::1]``), with any port, or one of the listener's ``allowed_hosts``. A request with
no ``Host`` at all (HTTP/1.0 tools) is not from a browser and is let through.
"""

from __future__ import annotations

from collections.abc import Iterable

from aico.net import is_loopback

__all__ = ["host_allowed", "host_name"]

LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


def host_name(host: str) -> str:
    """The name of a ``Host`` field value, without its port, lower-case (IPv6 unbracketed)."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name
    return host


def host_allowed(host: str | None, allowed: Iterable[str] = ()) -> bool:
    """Whether a request with this ``Host`` (``None``: no field) may be served."""
    if host is None:
        return True
    name = host_name(host)
    if not name:
        return False
    if name in LOOPBACK_NAMES or is_loopback(name):
        return True
    return any(name == host_name(a) for a in allowed)
