"""What the sync engine (data model, Merkle trees, storage) offers the sync protocol.

The engine (:mod:`aico.sync.engine`) holds every collection's items as CRDT states and a
Merkle tree per collection; the protocol (:mod:`aico.sync.protocol`, AMP over mutual TLS)
compares trees with a peer and moves :class:`ItemState` s both ways. Nothing here knows
of the network, and nothing in the protocol knows of SQLite or of the CRDTs' insides.

Merkle tree shape (shared by both sides, part of the wire contract): an item's place is
the lower-case hex SHA-256 of its key (UTF-8); the tree has :data:`FANOUT` = 16 children
per node and :data:`DEPTH` = 4 levels, so a node is named by a hex prefix of 0-4
characters (``""`` is the root) and a leaf bucket by 4. A node's hash is the SHA-256 of
its 16 children's hashes in order (an empty child hashes to 32 zero bytes); a bucket's
hash is the SHA-256 of ``key NUL digest`` for its items sorted by key; an empty tree's
root is 32 zero bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

#: Children per Merkle node and levels below the root (see the module docstring).
FANOUT = 16
DEPTH = 4
#: The hash of an empty subtree.
EMPTY = bytes(32)


def place(key: str) -> str:
    """The item's full path in the tree: the hex SHA-256 of its key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def canonical(value: Any) -> bytes:
    """The one byte form of a JSON value that digests are taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class ItemState:
    """One item's replicated state: what peers exchange, merge and store.

    *state* is the strategy's CRDT state as JSON (docs/sync.md, "Strategies"); *hlc* the
    greatest hybrid-logical-clock timestamp in it, as text that sorts like the clock
    (``aico.sync.hlc``); *deleted* marks a tombstone (kept until every peer acknowledged
    it). Merging two states of one item never depends on the order they arrive in.
    """

    collection: str
    key: str
    state: dict[str, Any]
    hlc: str
    deleted: bool = False
    digest: bytes = field(default=b"", compare=False)

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", hashlib.sha256(
                canonical({"key": self.key, "state": self.state, "deleted": self.deleted})
            ).digest())

    def to_json(self) -> dict[str, Any]:
        return {"collection": self.collection, "key": self.key, "state": self.state,
                "hlc": self.hlc, "deleted": self.deleted}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ItemState:
        return cls(collection=str(value["collection"]), key=str(value["key"]),
                   state=dict(value["state"]), hlc=str(value["hlc"]),
                   deleted=bool(value.get("deleted", False)))


class ISyncEngine(Interface):
    """The replicated collections of one gateway, as the sync protocol sees them."""

    node_id = Attribute("This gateway's node name in HLC timestamps (stable, unique).")

    def collections_for(peer_id: str) -> Sequence[str]:
        """The collections this gateway exchanges with *peer_id* (``sync = true`` and
        the peer allowed by the collection's ``peers``)."""

    def root(collection: str) -> bytes:
        """The collection's Merkle root (:data:`EMPTY` when it has no items)."""

    def children(collection: str, prefix: str) -> list[tuple[str, bytes]]:
        """The non-empty children of node *prefix* (``len(prefix) < DEPTH``): each
        child's prefix and hash."""

    def leaves(collection: str, prefix: str) -> dict[str, bytes]:
        """The items of bucket *prefix* (``len(prefix) == DEPTH``): key → digest."""

    def states(collection: str, keys: Sequence[str]) -> list[ItemState]:
        """The stored states of *keys* (tombstones included; unknown keys left out)."""

    def apply(collection: str, states: Sequence[ItemState], peer_id: str) -> Deferred[None]:
        """Merge *states* received from *peer_id* into the collection; fires once the
        merged states are committed to disk (never before)."""

    def acknowledged(peer_id: str, collection: str, hlc: str,
                     epoch: int | None = None) -> Deferred[None]:
        """*peer_id* holds every state of *collection* up to *hlc*: tombstones every
        peer acknowledged may be collected. With *epoch* (:meth:`epoch` when this side's
        roots were read for the round), ignored if a tombstone arrived since."""

    def epoch(collection: str) -> int:
        """A count that moves whenever a tombstone newly stored here voids other peers'
        acknowledgements of *collection*."""

    def on_change(listener: Callable[[str], object]) -> None:
        """Call *listener(collection)* after every committed change (local or merged)."""
