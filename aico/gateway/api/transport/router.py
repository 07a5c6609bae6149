"""``GET /api/v1/transport``: the transports and endpoints offered to the caller.

Local transports (ZeroMQ ``ipc://`` and its TCP fallback) are offered only to callers on
a loopback connection; every caller gets the WebSocket and REST addresses of the
listener it reached, and, when the ``tls`` listener is on, its ``wss://`` and
``https://`` addresses with the device CA's fingerprint (``ca_fingerprint``: mutual TLS
with a paired device's certificate, docs/devices.md). Lower ``priority`` is preferred
(``aico.client`` tries them in that order). ``Accept: application/x-protobuf`` answers a
``TransportInfo`` message instead of JSON.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from aico.gateway.api.transport.dependencies import TransportDeps
from aico.gateway.api.transport.schemas import TRANSPORT_RESPONSE
from aico.gateway.routing.messages import Request, Response, json_response
from aico.gateway.routing.table import RouteEntry
from aico.proto.aico.gateway.v1.gateway_pb2 import TransportInfo

PROTOBUF = "application/x-protobuf"
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
_SECURE = frozenset({"tls", "https", "wss"})


def offers(deps: TransportDeps, request: Request) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if request.loopback:
        ipc = deps.ipc_endpoints()
        key = deps.curve_server_key()
        if ipc.get("endpoint"):
            out.append({"transport": "ipc", "address": ipc["endpoint"],
                        "curve_server_key": key if deps.ipc_curve() else "", "priority": 10})
        if ipc.get("fallback"):
            out.append({"transport": "ipc-tcp", "address": ipc["fallback"],
                        "curve_server_key": key, "priority": 20})
    base = deps.http_bases().get(request.transport)
    if base is None:
        host = request.headers.get("host", "")
        if _HOST.match(host):
            scheme = "https" if request.transport in _SECURE else "http"
            base = f"{scheme}://{host}"
    if base:
        ws = "wss" + base[5:] if base.startswith("https") else "ws" + base[4:]
        out.append({"transport": "websocket", "address": ws + "/ws",
                    "subprotocols": list(deps.subprotocols), "priority": 30})
        out.append({"transport": "rest", "address": base + "/api/v1", "priority": 40})
    tls = deps.tls_address()
    if tls:
        host = str(tls["host"])
        host = f"[{host}]" if ":" in host else host
        fingerprint = deps.ca_fingerprint()
        out.append({"transport": "wss", "address": f"wss://{host}:{tls['port']}/ws",
                    "subprotocols": list(deps.subprotocols), "ca_fingerprint": fingerprint,
                    "priority": 50})
        out.append({"transport": "https", "address": f"https://{host}:{tls['port']}/api/v1",
                    "ca_fingerprint": fingerprint, "priority": 60})
    return out


def make_handler(deps: TransportDeps) -> Callable[[Request], Response]:
    def transport(request: Request) -> Response:
        endpoints = offers(deps, request)
        if PROTOBUF in request.headers.get("accept", ""):
            info = TransportInfo(version=deps.version)
            for e in endpoints:
                info.endpoints.add(**e)
            return Response(body=info.SerializeToString(), content_type=PROTOBUF)
        return json_response({"endpoints": endpoints, "version": deps.version})

    return transport


def routes(deps: TransportDeps) -> list[RouteEntry]:
    return [
        RouteEntry(
            method="GET",
            path="/api/v1/transport",
            handler=make_handler(deps),
            public=True,
            tier="public",
            response_schema=TRANSPORT_RESPONSE,
            summary="Transports and endpoints this gateway offers to the caller "
                    "(JSON, or TransportInfo with Accept: application/x-protobuf)",
        )
    ]
