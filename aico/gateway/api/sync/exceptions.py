"""Errors of the sync data API."""

from __future__ import annotations

from aico.gateway.errors import NotFound


class ItemNotFound(NotFound):
    def __init__(self, collection: str, key: str) -> None:
        super().__init__(f"collection {collection!r} holds no item {key[:80]!r} "
                         "(never written, or deleted)")
