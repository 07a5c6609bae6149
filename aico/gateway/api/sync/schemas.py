"""JSON Schemas of the sync data API (docs/sync.md, "The data API")."""

from __future__ import annotations

from typing import Any

_S = "https://json-schema.org/draft/2020-12/schema"

PUT_ITEM: dict[str, Any] = {
    "$schema": _S,
    "title": "SyncItemWrite",
    "type": "object",
    "properties": {"value": {"description": "any JSON value (merge collections: an object)"}},
    "required": ["value"],
    "additionalProperties": False,
}

_VERSION: dict[str, Any] = {
    "type": "object",
    "properties": {
        "value": {},
        "hlc": {"type": "string"},
        "origin": {"type": "string"},
        "deleted": {"const": True},
    },
    "required": ["value", "hlc", "origin"],
    "additionalProperties": False,
}

_ITEM_VALUE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "key": {"type": "string"},
        "value": {},
        "hlc": {"type": "string"},
        "overwritten": {"type": "array", "items": _VERSION},
    },
    "required": ["key", "value", "hlc"],
    "additionalProperties": False,
}

_ITEM_CONFLICT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "key": {"type": "string"},
        "conflict": {"const": True},
        "versions": {"type": "array", "items": _VERSION, "minItems": 2},
    },
    "required": ["key", "conflict", "versions"],
    "additionalProperties": False,
}

ITEM: dict[str, Any] = {"$schema": _S, "title": "SyncItem",
                        "oneOf": [_ITEM_VALUE, _ITEM_CONFLICT]}

ITEM_LIST: dict[str, Any] = {
    "$schema": _S,
    "title": "SyncItemList",
    "type": "object",
    "properties": {
        "collection": {"type": "string"},
        "items": {"type": "array", "items": {"oneOf": [_ITEM_VALUE, _ITEM_CONFLICT]}},
        "next": {"type": ["string", "null"]},
    },
    "required": ["collection", "items", "next"],
    "additionalProperties": False,
}
