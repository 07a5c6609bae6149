"""The sync data API (SPEC §8, docs/sync.md "The data API").

* ``PUT /api/v1/sync/collections/{name}/items/{key}`` ``{"value": …}`` (``sync:write``):
  write the item; answers it as ``GET`` would, once the write is on disk.
* ``GET /api/v1/sync/collections/{name}/items/{key}`` (``sync:read``): ``{"key", "value",
  "hlc"}`` (plus ``overwritten`` when an ``lww`` write lost to a concurrent one), or,
  for a ``keep-both`` item in conflict, ``{"key", "conflict": true, "versions": […]}``;
  404 when there is no live item.
* ``DELETE …/items/{key}`` (``sync:write``): 204 once the tombstone is on disk; 404 when
  there was no live item.
* ``GET /api/v1/sync/collections/{name}/items[?after=KEY&limit=N]`` (``sync:read``): the
  live items by key, ``limit`` (default and most :data:`PAGE_MAX`) at a time; ``next``
  is the ``after`` of the next page, ``null`` on the last.

A collection that ``[sync.collections]`` does not name is local only (it never leaves
the gateway); bad names and keys are 400 ``bad_request`` with the rule in ``detail``.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from aico.gateway.api.sync.dependencies import SyncDeps
from aico.gateway.api.sync.exceptions import ItemNotFound
from aico.gateway.api.sync.schemas import ITEM, ITEM_LIST, PUT_ITEM
from aico.gateway.errors import BadRequest, ValidationFailed
from aico.gateway.routing.messages import Request, Response, json_response
from aico.gateway.routing.table import RouteEntry
from aico.sync import crdt
from aico.sync.engine import BadName, check_collection, check_key, item_json

SYNC_READ = "sync:read"
SYNC_WRITE = "sync:write"
BASE = "/api/v1/sync/collections/{name}/items"
#: Items per page of ``GET …/items``.
PAGE_MAX = 1000


def _names(request: Request, with_key: bool = True) -> tuple[str, str]:
    name = request.path_params["name"]
    key = unicodedata.normalize("NFC", request.path_params.get("key", "")) if with_key else ""
    try:
        check_collection(name)
        if with_key:
            check_key(key)
    except BadName as e:
        raise BadRequest(str(e)) from None
    return name, key


def routes(deps: SyncDeps) -> list[RouteEntry]:
    engine = deps.engine

    def get_item(request: Request) -> Response:
        name, key = _names(request)
        v = engine.get(name, key)
        if v is None or v.deleted:
            raise ItemNotFound(name, key, v.overwritten if v is not None else None)
        return json_response(item_json(key, v))

    async def put_item(request: Request) -> Response:
        name, key = _names(request)
        body: dict[str, Any] = request.json
        try:
            state = await engine.put(name, key, body["value"])
        except crdt.StateError as e:
            raise ValidationFailed([{"pointer": "/value", "detail": str(e)}], str(e)) from None
        return json_response(item_json(key, crdt.view(state.state)))

    async def delete_item(request: Request) -> Response:
        name, key = _names(request)
        if await engine.delete(name, key) is None:
            raise ItemNotFound(name, key)
        return Response(status=204)

    def list_items(request: Request) -> Response:
        name, _ = _names(request, with_key=False)
        after = request.query.get("after", "")
        raw = request.query.get("limit", str(PAGE_MAX))
        if not raw.isdigit() or not 1 <= int(raw) <= PAGE_MAX:
            raise BadRequest(f"limit: a whole number from 1 to {PAGE_MAX}, got {raw[:20]!r}")
        limit = int(raw)
        page = engine.list(name, after=after, limit=limit + 1)
        more = len(page) > limit
        page = page[:limit]
        return json_response({"collection": name,
                              "items": [item_json(k, v) for k, v in page],
                              "next": page[-1][0] if more else None})

    item = f"{BASE}/{{key}}"
    return [
        RouteEntry("GET", item, get_item, capability=SYNC_READ, response_schema=ITEM,
                   summary="One item of a sync collection (every version while in conflict)"),
        RouteEntry("PUT", item, put_item, capability=SYNC_WRITE, request_schema=PUT_ITEM,
                   response_schema=ITEM,
                   summary="Write an item (a resolution, when it was in conflict); answered "
                           "once on disk"),
        RouteEntry("DELETE", item, delete_item, capability=SYNC_WRITE, success_status=204,
                   summary="Delete an item (a tombstone, collected once every peer has it)"),
        RouteEntry("GET", BASE, list_items, capability=SYNC_READ, response_schema=ITEM_LIST,
                   summary="The live items of a collection, by key (?after=KEY&limit=N)"),
    ]
