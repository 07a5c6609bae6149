"""The sync engine: every collection's items as CRDT states, on disk and in Merkle trees.

:class:`SyncEngine` is what both sides use: the data API (``/api/v1/sync/…``) calls
:meth:`~SyncEngine.put`, :meth:`~SyncEngine.delete`, :meth:`~SyncEngine.get` and
:meth:`~SyncEngine.list`; the sync protocol sees it as an :class:`~aico.sync.interfaces.
ISyncEngine` (roots, children, leaves, states, apply, acknowledged).

Every change — a client's write, a peer's states, a tombstone collected — goes through
one queue: the changes queued while a transaction runs are computed one after the other
(each sees the ones before it) and committed together in the next transaction; only
then are the trees and the in-memory items updated, the callers' Deferreds fired, the
``on_change`` listeners called and the change events published. So nothing is
acknowledged before it is on disk, and no two writes of one key race.

Policies come from ``[sync.collections.NAME]`` (:class:`~aico.gateway.config.
SyncCollection`); a collection that is not configured is **local only** (``sync =
false``, ``strategy = "lww"``): it works through the data API but never leaves this
gateway until the config names it (:data:`UNCONFIGURED`).
"""

from __future__ import annotations

import builtins
import re
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from aico.gateway.config import SyncCollection, SyncSection
from aico.sync import crdt
from aico.sync.hlc import ClockError, HybridClock, check_bound
from aico.sync.interfaces import EMPTY, ISyncEngine, ItemState
from aico.sync.merkle import MerkleTree
from aico.sync.store import StoredItem, SyncStore

__all__ = ["COLLECTION_NAME", "MAX_KEY_LENGTH", "UNCONFIGURED", "BadName", "SyncEngine",
           "SyncRefused", "bus_publisher", "event_topic", "memory_node_id"]

#: A collection's name: it appears in URLs, in event topics and in config table names.
COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Longest key, in characters.
MAX_KEY_LENGTH = 512
#: The policy of a collection that ``[sync.collections]`` does not name.
UNCONFIGURED = SyncCollection(sync=False, peers=(), strategy="lww")
#: The bus topic of a collection's change events (docs/sync.md, "Change events").
EVENT_TOPIC = "sync/{collection}/changed/v1"

Lookup = Callable[[str, str], ItemState | None]
#: (collection, key, tombstone hlc or None): a row to remove (None: whatever it holds).
Removal = tuple[str, str, str | None]
Op = Callable[[Lookup], tuple[list[ItemState], list[Removal], Any]]


def event_topic(collection: str) -> str:
    return EVENT_TOPIC.format(collection=collection)


def memory_node_id() -> str:
    """A node name for a gateway without a device CA (the in-memory test layer)."""
    return "mem-" + uuid.uuid4().hex[:16]


class BadName(ValueError):
    """A collection name or key that cannot be used (the data API answers 400)."""


class SyncRefused(Exception):
    """A peer's request the engine refuses; *code* is stable (the protocol sends it)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def check_collection(name: str) -> str:
    if not COLLECTION_NAME.match(name):
        raise BadName(f"invalid collection name {name[:80]!r}: 1-64 characters from "
                      "A-Z a-z 0-9 _ . -, starting with a letter or a digit")
    return name


def check_key(key: str) -> str:
    if not key:
        raise BadName("an item's key must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise BadName(f"an item's key is at most {MAX_KEY_LENGTH} characters (got {len(key)})")
    for ch in key:
        if unicodedata.category(ch) in ("Cc", "Cs"):
            raise BadName("an item's key must not contain control characters or lone "
                          f"surrogates (found U+{ord(ch):04X})")
    return key


def _same_device(a: str, b: str) -> bool:
    if a == b:
        return True
    from aico.gateway.devices.ca import DeviceIDError, parse_device_id

    try:
        return parse_device_id(a) == parse_device_id(b)
    except DeviceIDError:
        return False


def item_json(key: str, v: crdt.View) -> dict[str, Any]:
    """An item as the data API shows it (docs/sync.md, "The data API")."""
    if v.versions is not None:
        return {"key": key, "conflict": True, "versions": v.versions}
    out: dict[str, Any] = {"key": key, "value": v.value, "hlc": v.hlc}
    if v.overwritten:
        out["overwritten"] = v.overwritten
    return out


@implementer(ISyncEngine)
class SyncEngine:
    """The replicated (and local-only) collections of one gateway."""

    log = Logger()

    def __init__(self, store: SyncStore, node_id: str, policy: Callable[[], SyncSection],
                 now: Callable[[], float], *,
                 publish: Callable[[str, dict[str, Any]], None] | None = None,
                 run_cpu: Callable[..., Deferred[Any]] | None = None) -> None:
        self.store = store
        self.node_id = node_id
        self.clock = HybridClock(node_id, now)
        self._policy = policy
        self._publish = publish
        self._run_cpu = run_cpu or maybeDeferred
        #: collection → key → state (a row not parsed yet until first needed)
        self._items: dict[str, dict[str, ItemState | StoredItem]] = {}
        self._trees: dict[str, MerkleTree] = {}
        self._listeners: builtins.list[Callable[[str], object]] = []
        self._queue: builtins.list[tuple[Op, Deferred[Any], str]] = []
        self._busy = False
        #: Every peer's ID (``sync_peers``), refreshed at each acknowledgement.
        self.peers: builtins.list[str] = []
        #: Acknowledgements a batch being committed voids (:meth:`_void`), and how many
        #: commits voided some per collection (:meth:`epoch`).
        self._voids: builtins.list[tuple[str, str, str]] = []
        self._epochs: dict[str, int] = {}

    # ------------------------------------------------------------------ start

    def start(self) -> Deferred[None]:
        """Read every item and build the trees (in the thread pools)."""
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        states = await self.store.load()
        self.peers = await self.store.peers()
        by_collection: dict[str, dict[str, ItemState | StoredItem]] = {}
        for s in states:
            by_collection.setdefault(s.collection, {})[s.key] = s
        self._trees = await self._run_cpu(_build_trees, by_collection)
        self._items = by_collection
        if states:
            # Never issue a timestamp below one already stored (a clock set back).
            self.clock.observe(max(s.hlc for s in states), check_drift=False)
        self.log.info("sync: {items} items in {collections} collections loaded",
                      items=len(states), collections=len(by_collection))

    # ------------------------------------------------------------------ policy

    def policy(self, collection: str) -> SyncCollection:
        return self._policy().collections.get(collection, UNCONFIGURED)

    def _shares(self, collection: str, peer_id: str) -> bool:
        p = self.policy(collection)
        return p.sync and (not p.peers or any(_same_device(peer_id, d) for d in p.peers))

    def _met(self, peer_id: str) -> None:
        """*peer_id* is a peer (it asks for our collections, or sends states): it holds
        tombstones back from now on, even before ``sync_peers`` is read again."""
        if peer_id not in self.peers:
            self.peers.append(peer_id)

    def collections_for(self, peer_id: str) -> Sequence[str]:
        self._met(peer_id)
        return sorted(name for name in self._policy().collections if self._shares(name, peer_id))

    # ------------------------------------------------------------------ the local API

    def get(self, collection: str, key: str) -> crdt.View | None:
        """The item as a client sees it (a tombstone's view says ``deleted``); ``None``
        when this gateway holds nothing under *key*."""
        s = self._current(collection, key)
        return crdt.view(s.state) if s is not None else None

    def _current(self, collection: str, key: str) -> ItemState | None:
        items = self._items.get(collection)
        s = items.get(key) if items is not None else None
        if isinstance(s, StoredItem):
            s = items[key] = s.parse()  # type: ignore[index]
        return s

    def list(self, collection: str, *, after: str = "",
             limit: int | None = None) -> builtins.list[tuple[str, crdt.View]]:
        """The live items of *collection* by key, those after *after*, at most *limit*."""
        items = self._items.get(collection, {})
        out = []
        for key in sorted(k for k in items if k > after):
            if items[key].deleted:
                continue
            v = crdt.view(self._parsed(collection, key).state)
            if not v.deleted:
                out.append((key, v))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def put(self, collection: str, key: str, value: Any) -> Deferred[ItemState]:
        """Write *value* (JSON) under *key*; fires with the new state once on disk.
        Fails with :class:`BadName`, or ``crdt.StateError`` for a value the collection's
        strategy cannot take (``merge``: not an object)."""
        check_collection(collection)
        check_key(key)
        return self._submit(lambda lookup: self._write(lookup, collection, key, value), "local")

    def epoch(self, collection: str) -> int:
        """How many times a tombstone newly stored here has voided other peers'
        acknowledgements of *collection* (see :meth:`acknowledged`)."""
        return self._epochs.get(collection, 0)

    def _void(self, collection: str, kept: str, tombstone: ItemState) -> None:
        """A tombstone is being stored here: no acknowledgement recorded before it (by a
        peer other than *kept*, the one it came from) covers it, whatever its bound — the
        bound is a round's start, the tombstone's hlc its creation elsewhere, and a peer
        that acknowledged a round before the tombstone arrived here never saw it (left
        alone, it would give the deleted item back once the tombstone is collected)."""
        self._voids.append((collection, kept, tombstone.hlc))

    def delete(self, collection: str, key: str) -> Deferred[ItemState | None]:
        """Delete *key* (a tombstone, collected once every peer that shares the
        collection has it; at once in a collection no peer shares). Fires once on disk
        with the tombstone, or ``None`` when there was no live item."""
        check_collection(collection)
        check_key(key)

        def op(lookup: Lookup) -> tuple[builtins.list[ItemState], builtins.list[Removal], Any]:
            current = lookup(collection, key)
            if current is None or current.deleted:
                return [], [], None
            puts, _, state = self._write(lookup, collection, key, crdt.DELETE)
            if not self.policy(collection).sync or not self._sharers(collection):
                return puts, [(collection, key, state.hlc)], state
            self._void(collection, "", state)  # a peer's bound ahead of this clock
            return puts, [], state

        return self._submit(op, "local")

    def _write(self, lookup: Lookup, collection: str, key: str,
               value: Any) -> tuple[builtins.list[ItemState], builtins.list[Removal], ItemState]:
        strategy = self.policy(collection).strategy
        current = lookup(collection, key)
        ts = self.clock.tick()
        state = crdt.write(strategy, current.state if current else None, value, ts)
        item = _item(collection, key, state)
        return [item], [], item

    # ------------------------------------------------------------------ ISyncEngine

    def root(self, collection: str) -> bytes:
        tree = self._trees.get(collection)
        return tree.root() if tree is not None else EMPTY

    def children(self, collection: str, prefix: str) -> builtins.list[tuple[str, bytes]]:
        tree = self._trees.get(collection)
        return tree.children(prefix) if tree is not None else MerkleTree().children(prefix)

    def leaves(self, collection: str, prefix: str) -> dict[str, bytes]:
        tree = self._trees.get(collection)
        return tree.leaves(prefix) if tree is not None else MerkleTree().leaves(prefix)

    def states(self, collection: str, keys: Sequence[str]) -> builtins.list[ItemState]:
        items = self._items.get(collection, {})
        return [self._parsed(collection, k) for k in keys if k in items]

    def _parsed(self, collection: str, key: str) -> ItemState:
        s = self._current(collection, key)
        assert s is not None
        return s

    def apply(self, collection: str, states: Sequence[ItemState], peer_id: str) -> Deferred[None]:
        """Merge a peer's *states*; fails with :class:`SyncRefused` (nothing stored) for
        a collection not shared with *peer_id*, a state that is malformed or belongs
        elsewhere, or a timestamp too far in the future."""
        try:
            self._check_remote(collection, states, peer_id)
        except SyncRefused:
            return fail()
        self._met(peer_id)
        incoming = list(states)

        def op(lookup: Lookup) -> tuple[builtins.list[ItemState], builtins.list[Removal], Any]:
            puts = []
            for remote in incoming:
                current = lookup(collection, remote.key)
                if current is None:
                    merged = dict(remote.state)
                else:
                    merged = crdt.merge(str(current.state.get("s")), current.state, remote.state)
                item = _item(collection, remote.key, merged)
                if current is None or item.digest != current.digest:
                    puts.append(item)
                    if item.deleted:
                        self._void(collection, peer_id, item)
            return puts, [], None

        return self._submit(op, "peer")

    def _check_remote(self, collection: str, states: Sequence[ItemState], peer_id: str) -> None:
        if not self._shares(collection, peer_id):
            raise SyncRefused("collection_not_shared",
                              f"collection {collection[:80]!r} is not shared with this peer")
        latest = ""
        for s in states:
            if s.collection != collection:
                raise SyncRefused("bad_state", f"a state of {s.collection[:80]!r} sent as "
                                               f"one of {collection[:80]!r}")
            try:
                check_key(s.key)
                crdt.check(s.state)
            except (BadName, crdt.StateError) as e:
                raise SyncRefused("bad_state", f"item {s.key[:80]!r}: {e}") from None
            latest = max(latest, crdt.max_hlc(s.state))
        if latest:
            try:
                self.clock.observe(latest)
            except ClockError as e:
                raise SyncRefused("clock_drift", str(e)) from None

    def acknowledged(self, peer_id: str, collection: str, hlc: str,
                     epoch: int | None = None) -> Deferred[None]:
        return Deferred.fromCoroutine(self._acknowledged(peer_id, collection, hlc, epoch))

    async def _acknowledged(self, peer_id: str, collection: str, hlc: str,
                            epoch: int | None) -> None:
        try:
            check_bound(hlc)
        except ClockError as e:
            raise SyncRefused("bad_state", str(e)) from None
        if epoch is not None and epoch != self.epoch(collection):
            # A tombstone arrived here after this side's roots were read for the round
            # being acknowledged: the peer may not have it. Its next round will say.
            return
        self.peers, acks = await self.store.acknowledge(peer_id, collection, hlc)
        sharers = self._sharers(collection)
        if any(p not in acks for p in sharers):
            return
        horizon = min((acks[p] for p in sharers), default=None)
        await self.collect(collection, horizon)

    def _sharers(self, collection: str) -> builtins.list[str]:
        return [p for p in self.peers if self._shares(collection, p)]

    def collect(self, collection: str, horizon: str | None) -> Deferred[None]:
        """Remove the tombstones of *collection* up to *horizon* (``None``: all)."""

        def op(lookup: Lookup) -> tuple[builtins.list[ItemState], builtins.list[Removal], Any]:
            removes: builtins.list[Removal] = []
            for key, stored in self._items.get(collection, {}).items():
                if not stored.deleted:
                    continue
                now = lookup(collection, key)
                if now is not None and now.deleted and (horizon is None or now.hlc <= horizon):
                    removes.append((collection, key, now.hlc))
            return [], removes, None

        return self._submit(op, "collect")

    def on_change(self, listener: Callable[[str], object]) -> None:
        self._listeners.append(listener)

    # ------------------------------------------------------------------ the queue

    def _submit(self, op: Op, source: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._queue.append((op, d, source))
        if not self._busy:
            self._busy = True
            Deferred.fromCoroutine(self._drain()).addErrback(
                lambda f: self.log.failure("sync: the write queue stopped", f))
        return d

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._commit(batch)
        finally:
            self._busy = False

    async def _commit(self, batch: builtins.list[tuple[Op, Deferred[Any], str]]) -> None:
        overlay: dict[tuple[str, str], ItemState | None] = {}

        def lookup(collection: str, key: str) -> ItemState | None:
            if (collection, key) in overlay:
                return overlay[collection, key]
            return self._current(collection, key)

        puts: dict[tuple[str, str], tuple[ItemState, str]] = {}
        removes: builtins.list[Removal] = []
        outcomes: builtins.list[tuple[Deferred[Any], Any]] = []
        self._voids = []
        for op, d, source in batch:
            try:
                p, r, result = op(lookup)
            except Exception:
                outcomes.append((d, Failure()))
                continue
            for s in p:
                overlay[s.collection, s.key] = s
                puts[s.collection, s.key] = (s, source)
            for c, k, _ in r:
                overlay[c, k] = None
            removes.extend(r)
            outcomes.append((d, result))
        voids, self._voids = self._voids, []
        try:
            gone = await self.store.commit([s for s, _ in puts.values()], removes, voids)
        except Exception:
            failure = Failure()
            self.log.failure("sync: a write could not be committed", failure)
            for d, outcome in outcomes:
                d.errback(outcome if isinstance(outcome, Failure) else failure)
            return
        for collection, _, _ in voids:
            self._epochs[collection] = self._epochs.get(collection, 0) + 1
        changed: dict[str, builtins.list[tuple[ItemState | None, str, str]]] = {}
        for s, source in puts.values():
            self._items.setdefault(s.collection, {})[s.key] = s
            self._trees.setdefault(s.collection, MerkleTree()).put(s.key, s.digest)
            changed.setdefault(s.collection, []).append((s, s.key, source))
        for c, k in gone:
            self._items.get(c, {}).pop(k, None)
            if c in self._trees:
                self._trees[c].delete(k)
        for d, outcome in outcomes:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)
        for collection, changes in changed.items():
            for listener in self._listeners:
                try:
                    listener(collection)
                except Exception:
                    self.log.failure("sync: an on_change listener failed")
            self._announce(collection, changes)

    def _announce(self, collection: str, changes: Iterable[tuple[ItemState | None, str, str]]) -> None:
        if self._publish is None:
            return
        for state, key, source in changes:
            if state is None:
                continue
            v = crdt.view(state.state)
            body = {"collection": collection, "source": source, "deleted": v.deleted,
                    **({"key": key, "hlc": v.hlc} if v.deleted else item_json(key, v))}
            try:
                self._publish(event_topic(collection), body)
            except Exception:
                self.log.failure("sync: a change event could not be published")

    # ------------------------------------------------------------------ figures

    def counts(self) -> dict[str, int]:
        """Items held per collection (tombstones included)."""
        return {c: len(items) for c, items in self._items.items()}


def _item(collection: str, key: str, state: dict[str, Any]) -> ItemState:
    return ItemState(collection=collection, key=key, state=state, hlc=crdt.max_hlc(state),
                     deleted=crdt.is_deleted(state))


def _build_trees(by_collection: dict[str, dict[str, ItemState | StoredItem]],
                 ) -> dict[str, MerkleTree]:
    return {c: MerkleTree.build((k, s.digest) for k, s in items.items())
            for c, items in by_collection.items()}




def bus_publisher(bus: Any) -> Callable[[str, dict[str, Any]], None]:
    """Publish a change event as an ``ApiEvent`` on the gateway's bus (WebSocket and
    IPC subscribers of ``sync/COLLECTION/…`` receive it; ``security/topics.py``)."""
    import json

    from aico.bus.errors import BusError
    from aico.proto import ApiEvent, wrap

    log = Logger(namespace="aico.sync.engine")

    def publish(topic: str, body: dict[str, Any]) -> None:
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        try:
            bus.publish(topic, wrap(ApiEvent(topic=topic, body=data), source="sync"))
        except BusError as e:
            log.warn("sync change event not published on {topic}: {error}", topic=topic,
                     error=str(e))

    return publish
