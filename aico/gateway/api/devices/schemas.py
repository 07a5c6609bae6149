"""JSON Schemas of the devices domain (docs/devices.md)."""

from __future__ import annotations

from typing import Any

DEVICE_ME: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "DeviceSelf",
    "type": "object",
    "properties": {
        "device_id": {"type": "string"},
        "name": {"type": "string"},
        "trust": {"enum": ["standard", "admin"]},
        "subject": {"type": "string"},
        "roles": {"type": "array", "items": {"type": "string"}},
        "capabilities": {"type": "array", "items": {"type": "string"}},
        "paired_for": {"type": ["string", "null"]},
        "paired_at": {"type": "number"},
    },
    "required": ["device_id", "name", "trust", "subject", "roles", "capabilities",
                 "paired_for", "paired_at"],
    "additionalProperties": False,
}
