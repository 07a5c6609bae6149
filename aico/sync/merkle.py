"""The Merkle tree of one collection, and the diff that descends only where trees differ.

The shape is part of the wire contract (:mod:`aico.sync.interfaces`): an item sits in
the bucket named by the first :data:`DEPTH` hex digits of SHA-256(key); a node is named
by a hex prefix (``""`` is the root); a bucket's hash is SHA-256 over ``key NUL digest``
of its items sorted by key; a node's hash is SHA-256 over its :data:`FANOUT` children's
hashes (an empty child counts as :data:`EMPTY`); an empty subtree *is* :data:`EMPTY`.

:class:`MerkleTree` keeps every node's hash, so a put or a delete rehashes one bucket
and its :data:`DEPTH` ancestors (five SHA-256 over at most 16 x 32 bytes each, plus the
bucket), and a round where nothing changed compares one root whatever the size.

:func:`diff` compares a local tree with a remote one seen only through three callables
(root, children, leaves), each of which may answer at once or with a Deferred (the
protocol fetches the remote side lazily); it returns the keys whose digests differ or
that only one side has.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Generator, Iterable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred

from aico.sync.interfaces import DEPTH, EMPTY, FANOUT, place

HEX = "0123456789abcdef"
assert len(HEX) == FANOUT
_INDEX = {d: i for i, d in enumerate(HEX)}


def bucket_hash(items: Mapping[str, bytes]) -> bytes:
    """The hash of a bucket holding *items* (key → digest); :data:`EMPTY` when empty."""
    if not items:
        return EMPTY
    h = hashlib.sha256()
    for key in sorted(items):
        h.update(key.encode("utf-8"))
        h.update(b"\0")
        h.update(items[key])
    return h.digest()


def node_hash(children: Mapping[str, bytes]) -> bytes:
    """The hash of a node whose non-empty children are *children* (last hex digit →
    hash); :data:`EMPTY` when it has none."""
    if not children:
        return EMPTY
    return hashlib.sha256(b"".join(children.get(c, EMPTY) for c in HEX)).digest()


class MerkleTree:
    """One collection's tree: every non-empty node's hash, every bucket's items."""

    def __init__(self) -> None:
        #: bucket prefix (DEPTH hex digits) → key → digest
        self._buckets: dict[str, dict[str, bytes]] = {}
        #: prefix (0..DEPTH digits) → hash, non-empty nodes only
        self._hashes: dict[str, bytes] = {}
        #: inner node prefix (0..DEPTH-1 digits) → its 16 children's hashes (EMPTY
        #: for an empty child), non-empty nodes only
        self._slots: dict[str, list[bytes]] = {}
        #: key → its bucket
        self._places: dict[str, str] = {}

    @classmethod
    def build(cls, items: Iterable[tuple[str, bytes]]) -> MerkleTree:
        """A tree over *items* (key, digest), hashed bottom-up once (for a start-up load)."""
        tree = cls()
        for key, digest in items:
            bucket = place(key)[:DEPTH]
            tree._places[key] = bucket
            tree._buckets.setdefault(bucket, {})[key] = digest
        level = {b: bucket_hash(items) for b, items in tree._buckets.items()}
        tree._hashes.update(level)
        for _ in range(DEPTH):
            parents: dict[str, list[bytes]] = {}
            for prefix, h in level.items():
                slots = parents.get(prefix[:-1])
                if slots is None:
                    slots = parents[prefix[:-1]] = [EMPTY] * FANOUT
                slots[_INDEX[prefix[-1]]] = h
            tree._slots.update(parents)
            level = {p: hashlib.sha256(b"".join(slots)).digest() for p, slots in parents.items()}
            tree._hashes.update(level)
        return tree

    def __len__(self) -> int:
        return len(self._places)

    def __contains__(self, key: object) -> bool:
        return key in self._places

    def put(self, key: str, digest: bytes) -> None:
        bucket = self._places.get(key) or place(key)[:DEPTH]
        self._places[key] = bucket
        self._buckets.setdefault(bucket, {})[key] = digest
        self._rehash(bucket)

    def delete(self, key: str) -> None:
        bucket = self._places.pop(key, None)
        if bucket is None:
            return
        items = self._buckets[bucket]
        del items[key]
        if not items:
            del self._buckets[bucket]
        self._rehash(bucket)

    def _rehash(self, bucket: str) -> None:
        """Rehash *bucket* and its DEPTH ancestors (nothing else changes)."""
        h = bucket_hash(self._buckets.get(bucket, {}))
        prefix = bucket
        while True:
            if h == EMPTY:
                self._hashes.pop(prefix, None)
            else:
                self._hashes[prefix] = h
            if not prefix:
                return
            parent = prefix[:-1]
            slots = self._slots.get(parent)
            if slots is None:
                slots = self._slots[parent] = [EMPTY] * FANOUT
            slots[_INDEX[prefix[-1]]] = h
            if h == EMPTY and slots.count(EMPTY) == FANOUT:
                del self._slots[parent]
            else:
                h = hashlib.sha256(b"".join(slots)).digest()
            prefix = parent

    # -- what ISyncEngine answers ------------------------------------------------------

    def root(self) -> bytes:
        return self._hashes.get("", EMPTY)

    def hash(self, prefix: str) -> bytes:
        return self._hashes.get(prefix, EMPTY)

    def children(self, prefix: str) -> list[tuple[str, bytes]]:
        if not 0 <= len(prefix) < DEPTH:
            raise ValueError(f"children of a node: a prefix of 0-{DEPTH - 1} hex digits, "
                             f"got {prefix!r}")
        slots = self._slots.get(prefix)
        if slots is None:
            return []
        return [(prefix + d, h) for d, h in zip(HEX, slots, strict=True) if h != EMPTY]

    def leaves(self, prefix: str) -> dict[str, bytes]:
        if len(prefix) != DEPTH:
            raise ValueError(f"leaves of a bucket: a prefix of {DEPTH} hex digits, got {prefix!r}")
        return dict(self._buckets.get(prefix, {}))

    def items(self) -> dict[str, bytes]:
        return {k: d for b in self._buckets.values() for k, d in b.items()}


# --------------------------------------------------------------------------- diff

#: A request the diff makes of the remote side: ("root", "") / ("children", prefix) /
#: ("leaves", prefix).
Ask = tuple[str, str]


def _differ(local: MerkleTree) -> Generator[Ask, Any, set[str]]:
    out: set[str] = set()
    remote_root = yield ("root", "")
    if bytes(remote_root) == local.root():
        return out
    stack = [""]
    while stack:
        prefix = stack.pop()
        if len(prefix) == DEPTH:
            mine = local.leaves(prefix)
            theirs: Mapping[str, bytes] = yield ("leaves", prefix)
            for key in {*mine, *theirs}:
                if mine.get(key) != (bytes(theirs[key]) if key in theirs else None):
                    out.add(key)
            continue
        mine_kids = dict(local.children(prefix))
        theirs_kids = {p: bytes(h) for p, h in (yield ("children", prefix))}
        for child in sorted({*mine_kids, *theirs_kids}, reverse=True):
            mine_h, theirs_h = mine_kids.get(child, EMPTY), theirs_kids.get(child, EMPTY)
            if mine_h == theirs_h:
                continue
            if theirs_h == EMPTY:
                out.update(_keys_under(local, child))  # only we have anything there
            elif mine_h == EMPTY and len(child) == DEPTH:
                theirs_leaves = yield ("leaves", child)
                out.update(theirs_leaves)
            else:
                stack.append(child)
    return out


def _keys_under(tree: MerkleTree, prefix: str) -> list[str]:
    if len(prefix) == DEPTH:
        return list(tree.leaves(prefix))
    return [k for child, _ in tree.children(prefix) for k in _keys_under(tree, child)]


class Remote:
    """The remote side of a diff: three callables, answering values or Deferreds."""

    def __init__(self, root: Callable[[], Any], children: Callable[[str], Any],
                 leaves: Callable[[str], Any]) -> None:
        self.root, self.children, self.leaves = root, children, leaves

    @classmethod
    def of(cls, tree: MerkleTree) -> Remote:
        return cls(tree.root, tree.children, tree.leaves)

    def ask(self, what: Ask) -> Any:
        kind, prefix = what
        if kind == "root":
            return self.root()
        return getattr(self, kind)(prefix)


def diff(local: MerkleTree, remote: Remote) -> set[str]:
    """The keys that differ between *local* and *remote*, whose callables answer at once."""
    gen = _differ(local)
    try:
        ask = next(gen)
        while True:
            ask = gen.send(remote.ask(ask))
    except StopIteration as stop:
        result: set[str] = stop.value
        return result


def diff_lazily(local: MerkleTree, remote: Remote) -> Deferred[set[str]]:
    """As :func:`diff`, for callables that may answer with Deferreds (over the network).

    The local tree must not change while it runs (take a snapshot with
    :meth:`MerkleTree.build` over :meth:`MerkleTree.items` if it may)."""

    async def run() -> set[str]:
        gen = _differ(local)
        try:
            ask = next(gen)
            while True:
                answer = await maybeDeferred(remote.ask, ask)
                ask = gen.send(answer)
        except StopIteration as stop:
            result: set[str] = stop.value
            return result

    return Deferred.fromCoroutine(run())
