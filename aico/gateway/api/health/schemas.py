"""JSON Schemas of the health domain."""

from __future__ import annotations

from typing import Any

MODULE_STATUS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "status": {"enum": ["ok", "degraded", "error", "timeout", "unavailable"]},
        "version": {"type": "string"},
        "latency_ms": {"type": ["number", "null"]},
        "detail": {"type": "string"},
    },
    "required": ["status", "version", "latency_ms"],
    "additionalProperties": False,
}

HEALTH_RESPONSE: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Health",
    "type": "object",
    "properties": {
        "status": {"enum": ["ok", "degraded", "down"]},
        "modules": {"type": "object", "additionalProperties": MODULE_STATUS},
        "partial": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["status", "modules", "partial"],
    "additionalProperties": False,
}
