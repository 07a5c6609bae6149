"""Errors of the sync data API."""

from __future__ import annotations

from typing import Any

from aico.gateway.errors import NotFound


class ItemNotFound(NotFound):
    """No live item; a deleted ``lww`` item whose delete won over concurrent writes
    names them in ``overwritten`` (they are kept, never dropped silently)."""

    def __init__(self, collection: str, key: str,
                 overwritten: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"collection {collection!r} holds no item {key[:80]!r} "
                         "(never written, or deleted)",
                         extra={"overwritten": overwritten} if overwritten else None)
