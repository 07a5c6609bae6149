"""What the transport domain needs from the rest of the gateway."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


def _none() -> Mapping[str, str]:
    return {}


@dataclass(frozen=True)
class TransportDeps:
    #: The bound IPC endpoints, as in ports.json: ``{"endpoint": …, "fallback": …}``.
    ipc_endpoints: Callable[[], Mapping[str, str]] = _none
    #: The gateway's Z85 Curve public key (``curve/gateway.key``), "" when unknown.
    curve_server_key: Callable[[], str] = lambda: ""
    #: Whether ``ipc://`` uses Curve (``[ipc] curve``); the TCP fallback always does.
    ipc_curve: Callable[[], bool] = lambda: True
    #: Base URL of each HTTP listener by the router's transport name
    #: (``{"http": "http://127.0.0.1:8771"}``); the request's Host is used otherwise.
    http_bases: Callable[[], Mapping[str, str]] = _none
    version: str = ""
    #: The bound ``tls`` listener (``{"host", "port"}``, as in ports.json), None when off.
    tls_address: Callable[[], Mapping[str, Any] | None] = lambda: None
    #: The device CA's fingerprint (device-ID form) that a paired device pins.
    ca_fingerprint: Callable[[], str] = lambda: ""
    #: WebSocket subprotocols offered.
    subprotocols: tuple[str, ...] = field(default=("aico.v1.json", "aico.v1.proto"))
