"""An in-memory :class:`~aico.sync.interfaces.ISyncEngine` for protocol and multi-gateway tests.

:class:`MemoryEngine` keeps items in a dict, computes the Merkle tree exactly as the
interfaces module's docstring fixes it (so it can talk to the real engine over the
wire), and merges by last writer wins on the HLC (ties broken by the digest, so a merge
never depends on arrival order). It is deliberately naive: every tree query recomputes
from the items, which is fine for the few thousand items a test holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from aico.sync.interfaces import DEPTH, EMPTY, FANOUT, ISyncEngine, ItemState, place

__all__ = ["MemoryEngine", "merkle_root"]

_HEX = "0123456789abcdef"
assert len(_HEX) == FANOUT


def _bucket_hash(items: Iterable[ItemState]) -> bytes:
    h = hashlib.sha256()
    for item in sorted(items, key=lambda s: s.key):
        h.update(item.key.encode("utf-8") + b"\0" + item.digest)
    return h.digest()


def _node_hashes(items: Mapping[str, ItemState]) -> dict[str, bytes]:
    """Every non-empty node of the tree: prefix → hash (buckets and inner nodes)."""
    buckets: dict[str, list[ItemState]] = {}
    for key, item in items.items():
        buckets.setdefault(place(key)[:DEPTH], []).append(item)
    nodes: dict[str, bytes] = {p: _bucket_hash(b) for p, b in buckets.items()}
    level = set(nodes)
    for length in range(DEPTH - 1, -1, -1):
        parents = {p[:length] for p in level}
        for parent in parents:
            nodes[parent] = hashlib.sha256(
                b"".join(nodes.get(parent + c, EMPTY) for c in _HEX)).digest()
        level = parents
    return nodes


def merkle_root(items: Mapping[str, ItemState]) -> bytes:
    """The Merkle root of *items* (key → state), :data:`EMPTY` when there are none."""
    return _node_hashes(items).get("", EMPTY) if items else EMPTY


def _wins(new: ItemState, old: ItemState) -> bool:
    return (new.hlc, new.digest) > (old.hlc, old.digest)


@implementer(ISyncEngine)
class MemoryEngine:
    """Collections in a dict; LWW by HLC; a policy of ``collection → allowed peers``.

    *policy* maps each synced collection to the peers it is shared with (``None``: every
    peer). A collection missing from it never leaves this engine. :attr:`applied` and
    :attr:`acks` record what the protocol did, for tests.
    """

    def __init__(self, node_id: str, policy: Mapping[str, Sequence[str] | None] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self.node_id = node_id
        self.policy: dict[str, Sequence[str] | None] = dict(policy or {})
        self.items: dict[str, dict[str, ItemState]] = {}
        self._clock = clock or time.time
        self._counter = 0
        self._last_ms = 0
        self._listeners: list[Callable[[str], object]] = []
        self._trees: dict[str, dict[str, bytes]] = {}
        self.applied: list[tuple[str, str, int]] = []
        self.acks: list[tuple[str, str, str]] = []
        #: When set, :meth:`apply` returns this Deferred's result later (commit delay).
        self.commit_gate: Deferred[None] | None = None

    # ------------------------------------------------------------------ local writes

    def _hlc(self) -> str:
        ms = int(self._clock() * 1000)
        if ms > self._last_ms:
            self._last_ms, self._counter = ms, 0
        else:
            self._counter += 1
        return f"{self._last_ms:013d}:{self._counter:06d}:{self.node_id}"

    def _observe(self, hlc: str) -> None:
        try:
            ms, counter = int(hlc[:13]), int(hlc[14:20])
        except ValueError:
            return
        if (ms, counter) > (self._last_ms, self._counter):
            self._last_ms, self._counter = ms, counter

    def put(self, collection: str, key: str, value: Any) -> ItemState:
        """A local write (what the data API would do)."""
        state = ItemState(collection, key, {"value": value}, self._hlc())
        self._store(state)
        self._changed(collection)
        return state

    def delete(self, collection: str, key: str) -> ItemState:
        state = ItemState(collection, key, {}, self._hlc(), deleted=True)
        self._store(state)
        self._changed(collection)
        return state

    def get(self, collection: str, key: str) -> Any:
        item = self.items.get(collection, {}).get(key)
        return None if item is None or item.deleted else item.state.get("value")

    def values(self, collection: str) -> dict[str, Any]:
        return {k: s.state.get("value") for k, s in self.items.get(collection, {}).items()
                if not s.deleted}

    def _store(self, state: ItemState) -> None:
        self.items.setdefault(state.collection, {})[state.key] = state
        self._trees.pop(state.collection, None)

    def _tree(self, collection: str) -> dict[str, bytes]:
        tree = self._trees.get(collection)
        if tree is None:
            tree = self._trees[collection] = _node_hashes(self.items.get(collection, {}))
        return tree

    def _changed(self, collection: str) -> None:
        for listener in list(self._listeners):
            listener(collection)

    # ------------------------------------------------------------------ ISyncEngine

    def collections_for(self, peer_id: str) -> Sequence[str]:
        return sorted(c for c, peers in self.policy.items() if peers is None or peer_id in peers)

    def root(self, collection: str) -> bytes:
        return self._tree(collection).get("", EMPTY)

    def children(self, collection: str, prefix: str) -> list[tuple[str, bytes]]:
        if len(prefix) >= DEPTH:
            raise ValueError("a bucket has no children")
        nodes = self._tree(collection)
        return [(prefix + c, nodes[prefix + c]) for c in _HEX if prefix + c in nodes]

    def leaves(self, collection: str, prefix: str) -> dict[str, bytes]:
        if len(prefix) != DEPTH:
            raise ValueError("a bucket prefix has DEPTH characters")
        return {k: s.digest for k, s in self.items.get(collection, {}).items()
                if place(k).startswith(prefix)}

    def states(self, collection: str, keys: Sequence[str]) -> list[ItemState]:
        items = self.items.get(collection, {})
        return [items[k] for k in keys if k in items]

    def apply(self, collection: str, states: Sequence[ItemState], peer_id: str) -> Deferred[None]:
        changed = False
        for state in states:
            if state.collection != collection:
                raise ValueError("a state of another collection")
            self._observe(state.hlc)
            old = self.items.get(collection, {}).get(state.key)
            if old is None or _wins(state, old):
                self._store(state)
                changed = True
        self.applied.append((peer_id, collection, len(states)))

        def committed(_: object) -> None:
            if changed:
                self._changed(collection)

        gate = self.commit_gate
        d: Deferred[None] = Deferred() if gate is not None else succeed(None)
        if gate is not None:
            def release(result: object) -> object:
                d.callback(None)
                return result

            gate.addCallback(release)
        d.addCallback(committed)
        return d

    def acknowledged(self, peer_id: str, collection: str, hlc: str,
                     epoch: int | None = None) -> Deferred[None]:
        self.acks.append((peer_id, collection, hlc))
        return succeed(None)

    def epoch(self, collection: str) -> int:
        return 0

    def on_change(self, listener: Callable[[str], object]) -> None:
        self._listeners.append(listener)


def recording_transit() -> type:
    """The transit relay's own connection class, keeping every byte it forwarded in
    ``forwarded`` (tests show the relay never sees plaintext); instances are collected in
    the class's ``instances``."""
    from wormhole_transit_relay.transit_server import TransitConnection

    class RecordingTransit(TransitConnection):  # type: ignore[misc]
        instances: list[RecordingTransit] = []

        def connectionMade(self) -> None:
            self.forwarded: list[bytes] = []
            RecordingTransit.instances.append(self)
            super().connectionMade()

        def rawDataReceived(self, data: bytes) -> None:
            self.forwarded.append(data)
            super().rawDataReceived(data)

    return RecordingTransit


def start_recording_relay(test: Any, reactor: Any, recording: Any) -> int:
    """Start magic-wormhole's transit relay in this process on 127.0.0.1, port 0, with
    *recording* (a :func:`recording_transit` class, its ``instances`` emptied) as its
    connection class; stopped in *test*'s cleanup. Its bound port."""
    from twisted.application.internet import StreamServerEndpointService

    from aico.sync.relay import make_relay_service

    ports: list[Any] = []
    service = make_relay_service("tcp:0:interface=127.0.0.1", reactor=reactor,
                                 on_listening=ports.append)
    for child in service:
        if isinstance(child, StreamServerEndpointService):
            child.factory.protocol = recording
    recording.instances = []
    service.startService()
    test.addCleanup(service.stopService)
    if len(ports) != 1:
        raise AssertionError(f"the relay bound {len(ports)} ports")
    return int(ports[0].getHost().port)
