"""The sync tables of the registry (migration 5): ``sync_items`` and ``sync_acks``.

Everything goes through :meth:`~aico.gateway.store.Database.run_interaction` (the
registry's thread pool, one transaction per call), and a call's Deferred fires only
after its transaction committed: a write acknowledged to a client or to a peer is on
disk.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred

from aico.gateway.store import DatabaseLike
from aico.sync.interfaces import ItemState

__all__ = ["StoredItem", "SyncStore"]


class StoredItem(NamedTuple):
    """A row of ``sync_items`` whose state is not parsed yet (100,000 states take seconds
    to parse; the trees need only the digests)."""

    collection: str
    key: str
    text: str
    digest: bytes
    hlc: str
    deleted: bool

    def parse(self) -> ItemState:
        return ItemState(collection=self.collection, key=self.key, state=json.loads(self.text),
                         hlc=self.hlc, deleted=self.deleted, digest=self.digest)


def _row(state: ItemState, now: float) -> tuple[Any, ...]:
    text = json.dumps(state.state, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return (state.collection, state.key, text, state.digest, state.hlc, int(state.deleted), now)


#: The peers whose acknowledgements hold tombstones: every ``sync_peers`` row whose device
#: in our registry is not revoked.
_LIVE_PEERS = ("SELECT p.peer_id FROM sync_peers p LEFT JOIN devices d"
               " ON d.device_id = p.device_id WHERE COALESCE(d.revoked, 0) = 0")


class SyncStore:
    """Items and acknowledgements on the registry database."""

    def __init__(self, db: DatabaseLike, now: Callable[[], float]) -> None:
        self.db = db
        self._now = now

    def load(self) -> Deferred[list[StoredItem]]:
        """Every stored item, tombstones included (read once at start), its state still
        as text: :meth:`StoredItem.parse` reads it when it is needed."""

        def read(txn: Any) -> list[StoredItem]:
            txn.execute("SELECT collection, key, state, digest, hlc, deleted FROM sync_items")
            return [StoredItem(c, k, s, bytes(g), h, bool(d)) for c, k, s, g, h, d in txn.fetchall()]

        return self.db.run_interaction(read)

    def commit(self, puts: Sequence[ItemState],
               removes: Sequence[tuple[str, str, str | None]] = (),
               voids: Sequence[tuple[str, str, str]] = ()) -> Deferred[list[tuple[str, str]]]:
        """Store *puts* and remove *removes* ((collection, key, hlc): a tombstone only if
        the row is still that tombstone; hlc ``None``: whatever the row holds), and drop
        the acknowledgements *voids* name ((collection, peer kept, hlc): every other
        peer's acknowledgement of the collection at or past a tombstone's hlc, stored here
        after that peer's round — it never saw that tombstone), in one transaction. Fires
        with the (collection, key) of the tombstones actually removed, once committed."""
        now = self._now()
        rows = [_row(s, now) for s in puts]

        def write(txn: Any) -> list[tuple[str, str]]:
            if rows:
                txn.executemany(
                    "INSERT INTO sync_items (collection, key, state, digest, hlc, deleted, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (collection, key) "
                    "DO UPDATE SET state = excluded.state, digest = excluded.digest, "
                    "hlc = excluded.hlc, deleted = excluded.deleted, "
                    "updated_at = excluded.updated_at", rows)
            gone = []
            for collection, key, hlc in removes:
                if hlc is None:
                    txn.execute("DELETE FROM sync_items WHERE collection = ? AND key = ?",
                                (collection, key))
                else:
                    txn.execute("DELETE FROM sync_items WHERE collection = ? AND key = ? "
                                "AND deleted = 1 AND hlc = ?", (collection, key, hlc))
                if txn.rowcount:
                    gone.append((collection, key))
            for collection, kept, hlc in voids:
                txn.execute("DELETE FROM sync_acks WHERE collection = ? AND peer_id != ? "
                            "AND hlc >= ?", (collection, kept, hlc))
            return gone

        return self.db.run_interaction(write)

    def acknowledge(self, peer_id: str, collection: str,
                    hlc: str) -> Deferred[tuple[list[str], dict[str, str]]]:
        """Record that *peer_id* holds *collection* up to *hlc* (an older acknowledgement
        never replaces a newer one). Fires with every known peer's ID (``sync_peers``)
        and every peer's acknowledgement of *collection*."""

        def write(txn: Any) -> tuple[list[str], dict[str, str]]:
            txn.execute(
                "INSERT INTO sync_acks (peer_id, collection, hlc) VALUES (?, ?, ?) "
                "ON CONFLICT (peer_id, collection) DO UPDATE SET hlc = excluded.hlc "
                "WHERE excluded.hlc > sync_acks.hlc", (peer_id, collection, hlc))
            txn.execute(_LIVE_PEERS)
            peers = [r[0] for r in txn.fetchall()]
            txn.execute("SELECT peer_id, hlc FROM sync_acks WHERE collection = ?", (collection,))
            return peers, {p: h for p, h in txn.fetchall()}

        return self.db.run_interaction(write)

    def peers(self) -> Deferred[list[str]]:
        """Every peer's ID (``sync_peers``) but revoked ones: a revoked peer is no longer
        a peer, so its missing acknowledgements never hold tombstones forever (if that
        gateway is paired again, it is a new device with a new ID)."""

        def read(txn: Any) -> list[str]:
            txn.execute(_LIVE_PEERS)
            return [r[0] for r in txn.fetchall()]

        return self.db.run_interaction(read)
