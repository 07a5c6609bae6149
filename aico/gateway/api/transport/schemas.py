"""JSON Schemas of the transport domain."""

from __future__ import annotations

from typing import Any

ENDPOINT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "transport": {"enum": ["ipc", "ipc-tcp", "websocket", "rest", "wss", "https"]},
        "address": {"type": "string"},
        "curve_server_key": {"type": "string"},
        "subprotocols": {"type": "array", "items": {"type": "string"}},
        "priority": {"type": "integer"},
        "ca_fingerprint": {"type": "string"},
    },
    "required": ["transport", "address", "priority"],
    "additionalProperties": False,
}

TRANSPORT_RESPONSE: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "TransportInfo",
    "type": "object",
    "properties": {
        "endpoints": {"type": "array", "items": ENDPOINT},
        "version": {"type": "string"},
    },
    "required": ["endpoints", "version"],
    "additionalProperties": False,
}
