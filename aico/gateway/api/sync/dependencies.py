"""What the sync data API needs: the gateway's sync engine."""

from __future__ import annotations

from dataclasses import dataclass

from aico.sync.engine import SyncEngine


@dataclass(frozen=True)
class SyncDeps:
    engine: SyncEngine
