"""``/openapi.json``: an OpenAPI 3.1 document generated from the live route table.

It is built from the very entries and schemas the validator uses, so the document and
the gateway cannot disagree; it is rebuilt only when the table changes (a module came
or went), and cached as bytes in between.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from aico.gateway.routing.messages import Request, Response
from aico.gateway.routing.table import PLACEHOLDER, RouteEntry, RouteTable

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string"},
        "request_id": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"pointer": {"type": "string"}, "detail": {"type": "string"}},
            },
        },
    },
    "required": ["type", "title", "status", "code", "request_id"],
}


def _operation_id(entry: RouteEntry) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", entry.path).strip("_")
    return f"{entry.method.lower()}_{words}"


def _clean(schema: Any) -> Any:
    """Drop the per-schema ``$schema``: the document names the dialect once."""
    if isinstance(schema, dict):
        return {k: _clean(v) for k, v in schema.items() if k != "$schema"}
    if isinstance(schema, list):
        return [_clean(v) for v in schema]
    return schema


def operation(entry: RouteEntry) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": _operation_id(entry),
        "summary": entry.summary or f"{entry.method} {entry.path}",
        "tags": [entry.owner],
        "x-aico-rate-limit-tier": entry.tier,
    }
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in PLACEHOLDER.findall(entry.path)
    ]
    if entry.streaming:
        params.append({
            "name": "stream", "in": "query", "required": False,
            "description": "true: answer application/x-ndjson, one JSON object per line, "
                           "written as the backend produces it",
            "schema": {"type": "string", "enum": ["true", "false"]},
        })
    if params:
        op["parameters"] = params
    if entry.public:
        op["security"] = []
    else:
        op["security"] = [{"bearer": []}]
        op["x-aico-capability"] = entry.capability
    if entry.request_schema is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _clean(entry.request_schema)}},
        }
    success: dict[str, Any] = {"description": "Success"}
    content: dict[str, Any] = {}
    if entry.response_schema is not None:
        content["application/json"] = {"schema": _clean(entry.response_schema)}
    elif not entry.raw_body:
        content["application/json"] = {"schema": {}}
    if entry.streaming:
        content["application/x-ndjson"] = {"schema": {"type": "string"}}
    if content:
        success["content"] = content
    op["responses"] = {
        str(entry.success_status): success,
        "default": {
            "description": "Error (RFC 9457 problem details)",
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
        },
    }
    return op


def document(table: RouteTable, version: str,
             include: Callable[[RouteEntry], bool] = lambda e: True) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for entry in sorted(table.entries, key=lambda e: (e.path, e.method)):
        if include(entry):
            paths.setdefault(entry.path, {})[entry.method.lower()] = operation(entry)
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "AICO API gateway",
            "version": version,
            "description": "Every route of the gateway and of the backend modules that are "
                           "registered right now. Errors are RFC 9457 problem details. "
                           "Beyond each schema, every JSON body is held to the gateway's "
                           "limits: nesting depth, string length, no control characters or "
                           "unpaired surrogates, no duplicate members, NaN or Infinity; "
                           "strings are NFC-normalised (docs/security.md).",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": {"Problem": PROBLEM_SCHEMA},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }


class OpenApiView:
    """The handler of ``GET /openapi.json``, cached per route-table snapshot."""

    def __init__(self, table: Callable[[], RouteTable], version: str,
                 include: Callable[[RouteEntry], bool] = lambda e: True) -> None:
        self._table = table
        self._version = version
        self._include = include
        self._cached: tuple[RouteTable, bytes] | None = None

    def __call__(self, request: Request) -> Response:
        table = self._table()
        if self._cached is None or self._cached[0] is not table:
            body = json.dumps(document(table, self._version, self._include)).encode()
            self._cached = (table, body)
        return Response(body=self._cached[1], headers={"Cache-Control": "no-cache"})

    def entry(self) -> RouteEntry:
        return RouteEntry(
            method="GET", path="/openapi.json", handler=self, public=True, tier="public",
            response_schema=OPENAPI_RESPONSE, summary="This OpenAPI 3.1 document",
        )


OPENAPI_RESPONSE: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "OpenAPI document",
    "type": "object",
    "properties": {"openapi": {"const": "3.1.0"}, "paths": {"type": "object"}},
    "required": ["openapi", "info", "paths"],
}
