"""The sync engine on an in-memory registry: it is an ISyncEngine, a write fires only
once committed, peers' states merge and converge, a peer cannot push into what it does
not share, tombstones go only once every sharing peer acknowledged them, and listeners
and change events follow every commit."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aico.gateway import config as configuration
from aico.gateway.store import SyncDatabase
from aico.sync import crdt
from aico.sync.engine import UNCONFIGURED, BadName, SyncEngine, SyncRefused, event_topic
from aico.sync.interfaces import EMPTY, ISyncEngine, ItemState
from aico.sync.protocol import hlc_bound
from aico.sync.store import SyncStore

POLICY = """
[sync.collections.notes]
strategy = "lww"
[sync.collections.drafts]
strategy = "keep-both"
[sync.collections.stats]
strategy = "merge"
[sync.collections.private]
sync = false
[sync.collections.laptop-only]
peers = ["PEER-LAPTOP"]
"""


class HeldDatabase:
    """A registry whose transactions commit only when the test says so."""

    def __init__(self) -> None:
        self.db = SyncDatabase(":memory:")
        self.held: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []
        self.hold = False

    def run_interaction(self, fn: Any, *args: Any) -> Deferred[Any]:
        if not self.hold:
            return self.db.run_interaction(fn, *args)
        d: Deferred[Any] = Deferred()
        self.held.append((d, fn, args))
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for d, fn, args in held:
            self.db.run_interaction(fn, *args).chainDeferred(d)

    def fail_next(self) -> None:
        held, self.held = self.held, []
        for d, _, _ in held:
            d.errback(OSError("disk full"))


def engine(db: Any, node: str = "node-a", policy: str = POLICY,
           clock: Clock | None = None, events: list[Any] | None = None) -> SyncEngine:
    clock = clock or Clock()
    if clock.seconds() == 0:
        clock.advance(1_700_000_000)
    cfg = configuration.from_string(policy)
    e = SyncEngine(SyncStore(db, clock.seconds), node, lambda: cfg.sync, clock.seconds,
                   publish=(lambda t, b: events.append((t, b))) if events is not None else None)
    e.start()
    return e


class EngineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.db = SyncDatabase(":memory:")
        self.events: list[Any] = []
        self.e = engine(self.db, events=self.events)

    def put(self, e: SyncEngine, collection: str, key: str, value: Any) -> ItemState:
        state: ItemState = self.successResultOf(e.put(collection, key, value))
        return state

    def test_it_provides_isyncengine(self) -> None:
        self.assertTrue(verifyObject(ISyncEngine, self.e))

    def test_put_get_list_and_delete(self) -> None:
        self._peers("node-b")
        self.put(self.e, "notes", "b", {"text": "two"})
        self.put(self.e, "notes", "a", "one")
        self.assertEqual(self.e.get("notes", "a").value, "one")  # type: ignore[union-attr]
        self.assertEqual([k for k, _ in self.e.list("notes")], ["a", "b"])
        self.assertEqual([k for k, _ in self.e.list("notes", after="a")], ["b"])
        tomb = self.successResultOf(self.e.delete("notes", "a"))
        self.assertTrue(tomb.deleted)
        self.assertTrue(self.e.get("notes", "a").deleted)  # type: ignore[union-attr]
        self.assertEqual([k for k, _ in self.e.list("notes")], ["b"])
        self.assertIsNone(self.successResultOf(self.e.delete("notes", "a")))
        self.assertIsNone(self.e.get("notes", "never"))

    def test_bad_names_and_keys_are_refused(self) -> None:
        for collection, key in (("a/b", "k"), ("", "k"), ("notes", ""), ("notes", "x" * 513),
                                ("notes", "tab\there")):
            self.assertRaises(BadName, self.e.put, collection, key, 1)
        self.put(self.e, "notes", "x" * 512, 1)
        self.put(self.e, "notes", "a/b with spaces é", 1)

    def test_a_write_fires_only_once_committed_and_is_on_disk_then(self) -> None:
        held = HeldDatabase()
        e = engine(held)
        held.hold = True
        d = e.put("notes", "k", 1)
        self.assertNoResult(d)
        self.assertIsNone(e.get("notes", "k"))
        self.assertEqual(e.root("notes"), EMPTY)
        held.release()
        state = self.successResultOf(d)
        row = held.db.conn.execute(
            "SELECT state, hlc, deleted FROM sync_items WHERE key = 'k'").fetchone()
        self.assertEqual((json.loads(row[0]), row[1], row[2]), (state.state, state.hlc, 0))
        self.assertNotEqual(e.root("notes"), EMPTY)

    def test_writes_queued_during_a_commit_see_each_other_and_commit_together(self) -> None:
        held = HeldDatabase()
        e = engine(held)
        held.hold = True
        first = e.put("drafts", "k", "first")
        held.release()  # the first is committing... now two more arrive while held
        self.successResultOf(first)
        second = e.put("drafts", "k", "second")
        third = e.put("drafts", "k", "third")
        self.assertEqual(len(held.held), 1)  # the second; the third waits for it
        held.release()
        self.assertEqual(len(held.held), 1)  # the third
        held.release()
        self.successResultOf(second)
        self.successResultOf(third)
        v = e.get("drafts", "k")
        assert v is not None
        self.assertEqual((v.value, v.conflict), ("third", False))

    def test_a_failed_commit_fails_its_writes_and_changes_nothing(self) -> None:
        held = HeldDatabase()
        e = engine(held)
        self.successResultOf(e.put("notes", "k", "kept"))
        root = e.root("notes")
        held.hold = True
        d = e.put("notes", "k", "lost")
        held.fail_next()
        self.failureResultOf(d, OSError)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual((e.get("notes", "k").value, e.root("notes")), ("kept", root))  # type: ignore[union-attr]
        held.hold = False
        self.successResultOf(e.put("notes", "k", "later"))
        self.assertEqual(e.get("notes", "k").value, "later")  # type: ignore[union-attr]

    def test_a_merge_collection_refuses_a_value_that_is_not_an_object(self) -> None:
        self.failureResultOf(self.e.put("stats", "k", [1]), crdt.StateError)
        self.assertIsNone(self.e.get("stats", "k"))

    def test_two_engines_converge_through_states_and_apply(self) -> None:
        clock = Clock()
        clock.advance(1_700_000_000)
        a = engine(self.db, "node-a", clock=clock)
        b = engine(SyncDatabase(":memory:"), "node-b", clock=clock)
        for i in range(20):
            self.put(a, "notes", f"k{i}", i)
        self.put(b, "notes", "k3", "b wrote this later")
        clock.advance(1)
        self.put(b, "notes", "k3", "b wrote this later")
        self.put(a, "drafts", "d", "from a")
        self.put(b, "drafts", "d", "from b")
        for coll in ("notes", "drafts"):
            self.successResultOf(a.apply(coll, b.states(coll, list(b._items[coll])), "node-b"))
            self.successResultOf(b.apply(coll, a.states(coll, list(a._items[coll])), "node-a"))
            self.assertEqual(a.root(coll), b.root(coll))
            self.assertEqual(a.children(coll, ""), b.children(coll, ""))
        self.assertEqual(a.get("notes", "k3").value, "b wrote this later")  # type: ignore[union-attr]
        self.assertTrue(a.get("drafts", "d").conflict)  # type: ignore[union-attr]
        self.assertEqual(sorted(v["value"] for v in b.get("drafts", "d").versions or []),  # type: ignore[union-attr]
                         ["from a", "from b"])
        # applying the same states again changes nothing (and commits nothing)
        before = self.db.conn.total_changes
        self.successResultOf(a.apply("notes", b.states("notes", ["k3"]), "node-b"))
        self.assertEqual(self.db.conn.total_changes, before)

    def test_a_peer_cannot_push_into_a_collection_it_does_not_share(self) -> None:
        other = engine(SyncDatabase(":memory:"), "node-b")
        self.put(other, "private", "secret", 1)
        self.put(other, "laptop-only", "x", 1)
        self.put(other, "unconfigured", "x", 1)
        for coll, peer in (("private", "node-b"), ("laptop-only", "PEER-PHONE"),
                           ("unconfigured", "node-b")):
            f = self.failureResultOf(self.e.apply(coll, other.states(coll, ["secret", "x"]), peer),
                                     SyncRefused)
            self.assertEqual(f.value.code, "collection_not_shared")
            self.assertEqual(self.e.root(coll), EMPTY)
        self.assertEqual(list(self.e.collections_for("PEER-PHONE")), ["drafts", "notes", "stats"])
        self.assertEqual(list(self.e.collections_for("PEER-LAPTOP")),
                         ["drafts", "laptop-only", "notes", "stats"])
        self.assertEqual(self.e.policy("unconfigured"), UNCONFIGURED)

    def test_malformed_states_and_clocks_far_ahead_are_refused_whole(self) -> None:
        good = ItemState("notes", "ok", crdt.write("lww", None, 1, "1700000000000:000000:b"),
                         "1700000000000:000000:b")
        bad = ItemState("notes", "bad", {"s": "lww", "hlc": "nope"}, "nope")
        f = self.failureResultOf(self.e.apply("notes", [good, bad], "node-b"), SyncRefused)
        self.assertEqual(f.value.code, "bad_state")
        future = "1700000090000:000000:b"
        ahead = ItemState("notes", "ahead", crdt.write("lww", None, 1, future), future)
        f = self.failureResultOf(self.e.apply("notes", [good, ahead], "node-b"), SyncRefused)
        self.assertEqual(f.value.code, "clock_drift")
        elsewhere = ItemState("drafts", "x", good.state, good.hlc)
        f = self.failureResultOf(self.e.apply("notes", [elsewhere], "node-b"), SyncRefused)
        self.assertEqual(f.value.code, "bad_state")
        self.assertEqual(self.e.root("notes"), EMPTY)
        self.assertEqual(self.db.conn.execute("SELECT count(*) FROM sync_items").fetchone()[0], 0)

    def _peers(self, *ids: str) -> None:
        for p in ids:
            self.db.conn.execute(
                "INSERT INTO sync_peers (peer_id, name, device_id, their_ca, our_device_id, "
                "our_cert, our_key, added_at) VALUES (?, ?, ?, '', '', '', '', 0)", (p, p, p))
        self.e.peers = list(ids)

    def _rows(self, collection: str) -> list[tuple[str, int]]:
        return self.db.conn.execute("SELECT key, deleted FROM sync_items WHERE collection = ? "
                                    "ORDER BY key", (collection,)).fetchall()

    def test_a_tombstone_goes_only_after_every_sharing_peer_acknowledged_it(self) -> None:
        self._peers("node-b", "node-c")
        self.put(self.e, "notes", "gone", 1)
        self.put(self.e, "notes", "stays", 1)
        tomb = self.successResultOf(self.e.delete("notes", "gone"))
        self.assertEqual(self._rows("notes"), [("gone", 1), ("stays", 0)])
        self.successResultOf(self.e.acknowledged("node-b", "notes", tomb.hlc))
        self.assertEqual(self._rows("notes"), [("gone", 1), ("stays", 0)])
        self.successResultOf(self.e.acknowledged("node-c", "notes", "1600000000000:000000:x"))
        self.assertEqual(self._rows("notes"), [("gone", 1), ("stays", 0)])  # too old an ack
        self.failureResultOf(self.e.acknowledged("node-c", "notes", "later"), SyncRefused)
        bound = tomb.hlc.rsplit(":", 1)[0][:-6] + f"{int(tomb.hlc.split(':')[1]) + 1:06d}:"
        self.successResultOf(self.e.acknowledged("node-c", "notes", bound))  # a node-less bound
        self.assertEqual(self._rows("notes"), [("stays", 0)])
        self.assertIsNone(self.e.get("notes", "gone"))
        self.assertEqual(list(self.e.leaves("notes", "0000")), [])
        self.assertEqual(self.e.root("notes"),
                         engine(self.db, "node-z").root("notes"))  # as if reloaded

    def _tombstone_from_a(self, key: str) -> list[ItemState]:
        """Node A's tombstone of *key*, made a second after this engine's own writes."""
        clock = Clock()
        clock.advance(1_700_000_001)
        a = engine(SyncDatabase(":memory:"), "node-a", clock=clock)
        a.peers = ["node-b"]  # a shared collection: A keeps its tombstone
        self.put(a, "notes", key, "a's value")
        self.successResultOf(a.delete("notes", key))
        return a.states("notes", [key])

    def _acks(self) -> dict[str, str]:
        return dict(self.db.conn.execute(
            "SELECT peer_id, hlc FROM sync_acks WHERE collection = 'notes'").fetchall())

    def test_a_tombstone_from_one_peer_waits_for_the_others_next_acknowledgement(self) -> None:
        # This engine is B between A and C (a chain). C acknowledged a round that
        # converged before A's tombstone of x reached B — its bound is past the
        # tombstone's hlc, yet C still holds x. A's tombstone arrives, A acknowledges:
        # B must keep the tombstone until C acknowledges a round after it, or C would
        # give x back once nobody remembers the delete.
        self._peers("node-a", "node-c")
        self.put(self.e, "notes", "x", "old")
        bound = hlc_bound(1_700_000_010)
        self.successResultOf(self.e.acknowledged("node-c", "notes", bound))
        epoch = self.e.epoch("notes")
        self.successResultOf(self.e.apply("notes", self._tombstone_from_a("x"), "node-a"))
        self.assertTrue(self.e.get("notes", "x").deleted)  # type: ignore[union-attr]
        self.assertNotEqual(self.e.epoch("notes"), epoch)
        self.assertNotIn("node-c", self._acks())  # voided with the tombstone's commit
        self.successResultOf(self.e.acknowledged("node-a", "notes", bound))
        self.assertEqual(self._rows("notes"), [("x", 1)])
        self.successResultOf(self.e.acknowledged("node-c", "notes", hlc_bound(1_700_000_020)))
        self.assertEqual(self._rows("notes"), [])

    def test_an_acknowledgement_of_roots_read_before_a_tombstone_arrived_counts_nothing(
            self) -> None:
        self._peers("node-a", "node-c")
        self.put(self.e, "notes", "x", "old")
        read_at = self.e.epoch("notes")  # C's round read B's roots here...
        self.successResultOf(self.e.apply("notes", self._tombstone_from_a("x"), "node-a"))
        # ...and its Ack comes after the tombstone arrived: not recorded.
        self.successResultOf(self.e.acknowledged("node-c", "notes", hlc_bound(1_700_000_010),
                                                 read_at))
        self.assertNotIn("node-c", self._acks())
        self.successResultOf(self.e.acknowledged("node-a", "notes", hlc_bound(1_700_000_010),
                                                 self.e.epoch("notes")))
        self.assertEqual(self._rows("notes"), [("x", 1)])

    def test_a_local_delete_voids_acknowledgements_with_bounds_ahead_of_this_clock(self) -> None:
        self._peers("node-b")
        self.put(self.e, "notes", "x", 1)
        # A peer whose clock runs ahead acknowledged a round with a bound past "now" here.
        self.successResultOf(self.e.acknowledged("node-b", "notes", hlc_bound(1_700_000_030)))
        self.successResultOf(self.e.delete("notes", "x"))
        self.assertEqual((self._rows("notes"), self._acks()), ([("x", 1)], {}))

    def test_a_revoked_peers_missing_acknowledgement_holds_no_tombstone(self) -> None:
        self._peers("node-b", "node-c")
        for device, revoked in (("node-b", 0), ("node-c", 1)):
            self.db.conn.execute("INSERT INTO devices (device_id, name, cert_pem, revoked, "
                                 "created_at) VALUES (?, ?, '', ?, 0)", (device, device, revoked))
        self.put(self.e, "notes", "gone", 1)
        tomb = self.successResultOf(self.e.delete("notes", "gone"))
        self.assertEqual(self._rows("notes"), [("gone", 1)])
        self.successResultOf(self.e.acknowledged("node-b", "notes", tomb.hlc))
        self.assertEqual(self._rows("notes"), [])  # node-c, revoked, is not waited for

    def test_a_peer_that_does_not_share_the_collection_is_not_waited_for(self) -> None:
        self._peers("PEER-LAPTOP", "PEER-PHONE")
        self.put(self.e, "laptop-only", "k", 1)
        tomb = self.successResultOf(self.e.delete("laptop-only", "k"))
        self.assertEqual(self._rows("laptop-only"), [("k", 1)])
        self.successResultOf(self.e.acknowledged("PEER-LAPTOP", "laptop-only", tomb.hlc))
        self.assertEqual(self._rows("laptop-only"), [])

    def test_a_local_only_collection_forgets_a_deleted_item_at_once(self) -> None:
        self._peers("node-b")
        for coll in ("private", "unconfigured"):
            self.put(self.e, coll, "k", 1)
            self.assertIsNotNone(self.successResultOf(self.e.delete(coll, "k")))
            self.assertEqual(self._rows(coll), [])
            self.assertEqual(self.e.root(coll), EMPTY)

    def test_without_any_peer_a_deleted_item_is_forgotten_at_once(self) -> None:
        for coll in ("notes",):
            self.put(self.e, coll, "k", 1)
            self.assertIsNotNone(self.successResultOf(self.e.delete(coll, "k")))
            self.assertEqual(self._rows(coll), [])
            self.assertEqual(self.e.root(coll), EMPTY)

    def test_a_restarted_engine_loads_items_trees_and_its_clock(self) -> None:
        clock = Clock()
        clock.advance(1_700_000_000)
        a = engine(self.db, "node-a", clock=clock)
        last = self.put(a, "notes", "k", 1)
        self.put(a, "stats", "s", {"n": 1})
        clock.advance(-100)  # the wall clock set back before the restart
        again = engine(self.db, "node-a", clock=clock)
        self.assertEqual((again.root("notes"), again.root("stats")), (a.root("notes"), a.root("stats")))
        self.assertGreater(self.put(again, "notes", "k", 2).hlc, last.hlc)

    def test_listeners_and_change_events_follow_each_commit(self) -> None:
        seen: list[str] = []
        self.e.on_change(seen.append)
        self.put(self.e, "notes", "k", {"v": 1})
        self.successResultOf(self.e.delete("notes", "k"))
        other = engine(SyncDatabase(":memory:"), "node-b")
        self.put(other, "notes", "p", "from b")
        self.successResultOf(self.e.apply("notes", other.states("notes", ["p"]), "node-b"))
        self.assertEqual(seen, ["notes", "notes", "notes"])
        topics = {t for t, _ in self.events}
        self.assertEqual(topics, {event_topic("notes")})
        bodies = [b for _, b in self.events]
        self.assertEqual([(b["key"], b["deleted"], b["source"]) for b in bodies],
                         [("k", False, "local"), ("k", True, "local"), ("p", False, "peer")])
        self.assertEqual(bodies[0]["value"], {"v": 1})
