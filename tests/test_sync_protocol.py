"""The sync protocol in memory: two AMP ends over ``twisted.test.iosim``, two
:class:`~aico.sync.testing.MemoryEngine` s (docs/sync-protocol.md)."""

from __future__ import annotations

import json
import random
from typing import Any

from twisted.internet.defer import Deferred
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from aico.sync import protocol as p
from aico.sync.interfaces import DEPTH, EMPTY, ItemState, place
from aico.sync.protocol import RoundReport, SyncProtocol
from aico.sync.testing import MemoryEngine, merkle_root

A, B = "PEER-A", "PEER-B"  # each side's name for the other in its registry


def pair(a: MemoryEngine, b: MemoryEngine) -> tuple[SyncProtocol, SyncProtocol, iosim.IOPump]:
    """*a* dials *b*: the client knows *b* as B, the server knows *a* as A."""
    client, server, pump = iosim.connectedServerAndClient(
        lambda: SyncProtocol(b, peer_id=A), lambda: SyncProtocol(a, peer_id=B))
    return client, server, pump


def result(pump: iosim.IOPump, d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    for _ in range(10_000):
        if out:
            break
        pump.pump()
    assert out, "no answer"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def round_(pump: iosim.IOPump, client: SyncProtocol) -> RoundReport:
    report: RoundReport = result(pump, Deferred.fromCoroutine(client.run_round()))
    return report


class MerkleShapeTests(SynchronousTestCase):
    def test_root_follows_the_documented_shape(self) -> None:
        """Root of one item = SHA-256 chain over 16 children per level, per the docstring."""
        import hashlib

        self.assertEqual(merkle_root({}), EMPTY)
        s = ItemState("c", "k", {"value": 1}, "0000000000001:000000:n")
        pl = place("k")
        h = hashlib.sha256(b"k\0" + s.digest).digest()
        for depth in range(DEPTH, 0, -1):
            children = [EMPTY] * 16
            children[int(pl[depth - 1], 16)] = h
            h = hashlib.sha256(b"".join(children)).digest()
        self.assertEqual(merkle_root({"k": s}), h)


class RoundTests(SynchronousTestCase):
    def engines(self, policy_a: Any = None, policy_b: Any = None) -> tuple[MemoryEngine, MemoryEngine]:
        now = [1_800_000_000.0]

        def clock() -> float:
            now[0] += 0.001
            return now[0]

        a = MemoryEngine("node-a", policy_a or {"notes": None, "todo": None}, clock)
        b = MemoryEngine("node-b", policy_b or {"notes": None, "todo": None}, clock)
        return a, b

    def test_random_writes_on_both_sides_converge_in_one_round(self) -> None:
        a, b = self.engines()
        rng = random.Random(13)
        for i in range(300):
            side = a if rng.random() < 0.5 else b
            coll = rng.choice(["notes", "todo"])
            key = f"k{rng.randrange(120)}"
            if rng.random() < 0.1:
                side.delete(coll, key)
            else:
                side.put(coll, key, {"i": i, "text": "x" * rng.randrange(50)})
        client, _server, pump = pair(a, b)
        report = round_(pump, client)
        for coll in ("notes", "todo"):
            self.assertEqual(a.root(coll), b.root(coll))
            self.assertEqual(a.items[coll], b.items[coll])
        self.assertEqual(sorted(report.converged), ["notes", "todo"])
        self.assertTrue(report.fetched and report.pushed)
        # Both sides acknowledged each other with the round's bound.
        self.assertEqual({(x[0], x[1]) for x in a.acks}, {(B, "notes"), (B, "todo")})
        self.assertEqual({(x[0], x[1]) for x in b.acks}, {(A, "notes"), (A, "todo")})

    def test_a_round_with_nothing_changed_costs_hello_roots_and_acks_only(self) -> None:
        a, b = self.engines()
        for i in range(500):
            a.put("notes", f"k{i}", i)
        client, _, pump = pair(a, b)
        round_(pump, client)
        report = round_(pump, client)
        self.assertEqual((report.fetched, report.pushed), (0, 0))
        self.assertEqual(report.calls, 1 + 2)  # Roots + one Ack per collection

    def test_only_differing_items_travel(self) -> None:
        a, b = self.engines()
        for i in range(1000):
            a.put("notes", f"k{i}", i)
        client, _, pump = pair(a, b)
        round_(pump, client)
        a.put("notes", "k7", "changed")
        b.put("notes", "new", "on b")
        report = round_(pump, client)
        # k7 differs: the peer's state is fetched and merged, ours pushed; "new" fetched.
        self.assertEqual((report.fetched, report.pushed), (2, 1))
        self.assertEqual(b.get("notes", "k7"), "changed")
        self.assertEqual(a.get("notes", "new"), "on b")

    def test_concurrent_writes_to_one_key_end_identical(self) -> None:
        a, b = self.engines()
        a.put("notes", "same", "from a")
        b.put("notes", "same", "from b")
        client, _, pump = pair(a, b)
        round_(pump, client)
        self.assertEqual(a.items["notes"]["same"], b.items["notes"]["same"])

    def test_partial_overlap_syncs_only_the_shared_collections(self) -> None:
        a, b = self.engines({"notes": None, "private-a": None}, {"notes": None, "todo": None})
        a.put("notes", "n", 1)
        a.put("private-a", "secret", 2)
        b.put("todo", "t", 3)
        client, _server, pump = pair(a, b)
        report = round_(pump, client)
        self.assertEqual(report.collections, ["notes"])
        self.assertEqual(b.get("notes", "n"), 1)
        self.assertNotIn("private-a", b.items)
        self.assertNotIn("todo", a.items)

    def test_a_collection_shared_only_with_another_peer_does_not_travel(self) -> None:
        a, b = self.engines({"notes": None, "family": ["SOMEONE-ELSE"]}, {"notes": None, "family": None})
        a.put("family", "k", 1)
        b.put("family", "j", 2)
        client, _, pump = pair(a, b)
        round_(pump, client)
        self.assertNotIn("j", a.items.get("family", {}))
        self.assertNotIn("k", b.items["family"])

    def test_a_300_KiB_value_is_chunked_both_ways(self) -> None:
        a, b = self.engines()
        big_a = "a" * (300 * 1024)
        big_b = "b" * (300 * 1024)
        a.put("notes", "big-a", big_a)
        b.put("notes", "big-b", big_b)
        client, server, pump = pair(a, b)
        round_(pump, client)
        self.assertEqual(b.get("notes", "big-a"), big_a)
        self.assertEqual(a.get("notes", "big-b"), big_b)
        self.assertEqual(server._incoming, {})
        self.assertEqual((server._pending, client._pending), (0, 0))

    def test_many_states_in_one_push_are_chunked(self) -> None:
        a, b = self.engines()
        for i in range(400):
            a.put("notes", f"k{i}", "v" * 1000)  # ~400 KB in one Push
        client, _, pump = pair(a, b)
        report = round_(pump, client)
        self.assertEqual(report.pushed, 400)
        self.assertEqual(a.items["notes"], b.items["notes"])

    def test_push_is_answered_only_after_the_commit(self) -> None:
        a, b = self.engines()
        client, _, pump = pair(a, b)
        result(pump, Deferred.fromCoroutine(client.hello_remote()))
        gate: Deferred[None] = Deferred()
        b.commit_gate = gate
        s = ItemState("notes", "k", {"value": 1}, "0000000000001:000000:x")
        d = Deferred.fromCoroutine(client._call(p.Push, [s.to_json()], collection="notes"))
        pump.flush()
        self.assertNoResult(d)
        gate.callback(None)
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"applied": 1})


class RefusalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.a = MemoryEngine("node-a", {"notes": None})
        self.b = MemoryEngine("node-b", {"notes": None, "mine": None, "other": ["X"]})
        self.client, self.server, self.pump = pair(self.a, self.b)

    def ask(self, command: Any, **kwargs: Any) -> Deferred[Any]:
        """callRemote with its outcome captured at once (AMP drops the connection
        on an error answer nobody listens to yet)."""
        mirror: Deferred[Any] = Deferred()
        d = self.client.callRemote(command, **kwargs)
        d.addCallbacks(mirror.callback, mirror.errback)
        return mirror

    def hello(self) -> None:
        result(self.pump, Deferred.fromCoroutine(self.client.hello_remote()))

    def refused(self, d: Deferred[Any], code: type[Exception]) -> str:
        self.pump.flush()
        f = self.failureResultOf(d, code)
        return str(f.value)

    def test_an_unknown_major_is_refused_with_a_clear_error(self) -> None:
        d = self.ask(p.Hello, major=2, minor=0, node_id="n", collections=[])
        text = self.refused(d, p.UnsupportedVersion)
        self.assertIn("speaks sync protocol 1.x; the peer sent 2.0", text)

    def test_commands_before_hello_are_refused(self) -> None:
        d = self.ask(p.Roots, body=b'["notes"]')
        self.refused(d, p.NotReady)

    def test_hello_answers_only_collections_shared_both_ways(self) -> None:
        self.b.policy["notes"] = None
        d = self.ask(p.Hello, major=1, minor=0, node_id="n",
                                   collections=["notes", "mine", "other"])
        self.pump.flush()
        self.assertEqual(self.successResultOf(d)["collections"], ["mine", "notes"])

    def test_a_push_to_a_collection_not_shared_with_the_peer_stores_nothing(self) -> None:
        self.hello()
        s = ItemState("other", "k", {"value": 1}, "0000000000001:000000:x")
        d = self.ask(p.Push, collection="other", body=json.dumps([s.to_json()]).encode())
        self.assertIn("not shared", self.refused(d, p.NotShared))
        self.assertNotIn("other", self.b.items)
        # A state smuggled under a shared command's collection is refused too.
        d = self.ask(p.Push, collection="notes", body=json.dumps([s.to_json()]).encode())
        self.refused(d, p.NotShared)
        self.assertEqual(self.b.items, {})

    def test_reads_of_a_collection_not_shared_are_refused(self) -> None:
        self.hello()
        for cmd, body in ((p.Children, b'[""]'), (p.Leaves, b'["0000"]'), (p.Fetch, b'["k"]')):
            self.refused(self.ask(cmd, collection="other", body=body), p.NotShared)
        self.refused(self.ask(p.Roots, body=b'["other"]'), p.NotShared)
        self.refused(self.ask(p.Ack, collection="other", hlc="x"), p.NotShared)

    def test_bad_bodies_get_bad_request(self) -> None:
        self.hello()
        for cmd, body in ((p.Children, b"not json"), (p.Children, b'["00000"]'),
                          (p.Leaves, b'["00"]'), (p.Fetch, b'{"a": 1}'),
                          (p.Push, b'[{"key": 1}]')):
            self.refused(self.ask(cmd, collection="notes", body=body), p.BadRequest)
        self.assertEqual(self.b.items, {})

    def test_oversized_transfers_are_refused_and_forgotten(self) -> None:
        self.hello()
        self.patch(p, "MAX_TRANSFER", 100_000)
        d1 = self.ask(p.Part, transfer="t", index=0, final=False, data=b"x" * 60_000)
        self.pump.flush()
        self.successResultOf(d1)
        d2 = self.ask(p.Part, transfer="t", index=1, final=False, data=b"x" * 60_000)
        self.refused(d2, p.TooLarge)
        self.assertEqual((self.server._incoming, self.server._pending), ({}, 0))
        d3 = self.ask(p.Push, collection="notes", body=b"", transfer="t")
        self.refused(d3, p.BadRequest)

    def test_parts_out_of_order_are_refused(self) -> None:
        self.hello()
        d = self.ask(p.Part, transfer="t", index=1, final=True, data=b"x")
        self.refused(d, p.BadRequest)

    def test_a_refused_device_gets_device_not_allowed(self) -> None:
        self.server.refusal = "device not paired for sync"
        d = self.ask(p.Hello, major=1, minor=0, node_id="n", collections=[])
        self.assertIn("not paired", self.refused(d, p.DeviceNotAllowed))


class EngineRefusalTests(SynchronousTestCase):
    """The real engine's refusals (``SyncRefused``: ``bad_state``, ``clock_drift``,
    ``collection_not_shared``) reach the peer as the protocol's AMP errors with a code
    (``BAD_REQUEST``, ``NOT_SHARED``), never as AMP's UNKNOWN, and store nothing."""

    NOW = 1_800_000_000.0

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from aico.gateway import config as configuration
        from aico.gateway.store import SyncDatabase
        from aico.sync.engine import SyncEngine
        from aico.sync.store import SyncStore

        clock = Clock()
        clock.advance(self.NOW)
        self.cfg = configuration.from_string('[sync.collections.notes]\nstrategy = "lww"\n')
        db = SyncDatabase(":memory:")
        self.addCleanup(db.close)
        self.engine = SyncEngine(SyncStore(db, clock.seconds), "node-b", lambda: self.cfg.sync,
                                 clock.seconds)
        self.successResultOf(self.engine.start())
        self.a = MemoryEngine("node-a", {"notes": None})
        self.client, self.server, self.pump = pair(self.a, self.engine)  # type: ignore[arg-type]
        result(self.pump, Deferred.fromCoroutine(self.client.hello_remote()))

    def push(self, state: dict[str, Any], key: str = "k",
             hlc: str = "1800000000000:000000:node-a") -> Deferred[Any]:
        s = ItemState("notes", key, state, hlc)
        mirror: Deferred[Any] = Deferred()
        self.client.callRemote(p.Push, collection="notes", body=json.dumps(
            [s.to_json()]).encode()).addCallbacks(mirror.callback, mirror.errback)
        self.pump.flush()
        return mirror

    def lww(self, hlc: str) -> dict[str, Any]:
        from aico.sync import crdt

        return crdt.write("lww", None, {"text": "hi"}, hlc)

    def test_a_malformed_state_is_bad_request_and_nothing_is_stored(self) -> None:
        f = self.failureResultOf(self.push({"s": "no-such-strategy"}), p.BadRequest)
        self.assertIn("bad_state", str(f.value))
        self.assertIsNone(self.engine.get("notes", "k"))

    def test_a_timestamp_far_ahead_is_bad_request_clock_drift(self) -> None:
        ahead = f"{int((self.NOW + 3600) * 1000):013d}:000000:node-a"
        f = self.failureResultOf(self.push(self.lww(ahead), hlc=ahead), p.BadRequest)
        self.assertIn("clock_drift", str(f.value))
        self.assertIsNone(self.engine.get("notes", "k"))
        # A good state right after is merged: the refusal stored nothing and broke nothing.
        now = f"{int(self.NOW * 1000):013d}:000000:node-a"
        self.assertEqual(json.loads(self.successResultOf(self.push(self.lww(now), hlc=now))
                                    ["body"]), {"applied": 1})
        self.assertIsNotNone(self.engine.get("notes", "k"))

    def test_a_bad_acknowledgement_bound_is_bad_request(self) -> None:
        mirror: Deferred[Any] = Deferred()
        self.client.callRemote(p.Ack, collection="notes", hlc="yesterday").addCallbacks(
            mirror.callback, mirror.errback)
        self.pump.flush()
        f = self.failureResultOf(mirror, p.BadRequest)
        self.assertIn("bad_state", str(f.value))

    def test_a_collection_unshared_between_check_and_merge_is_not_shared(self) -> None:
        from aico.gateway import config as configuration

        # The policy changes (a config reload) after the command's own check: the
        # engine's refusal is the protocol's NOT_SHARED.
        engine: Any = self.engine
        self.patch(engine, "collections_for", lambda peer_id: ["notes"])
        self.cfg = configuration.from_string('[sync.collections.notes]\nsync = false\n')
        now = f"{int(self.NOW * 1000):013d}:000000:node-a"
        f = self.failureResultOf(self.push(self.lww(now), hlc=now), p.NotShared)
        self.assertIn("collection_not_shared", str(f.value))
        self.assertIsNone(self.engine.get("notes", "k"))

    def test_a_refusal_of_fetched_states_ends_the_dialling_sides_round_with_its_code(
            self) -> None:
        # The dialling side's own engine refuses what it fetched (a peer ahead in time).
        client, server, pump = iosim.connectedServerAndClient(
            lambda: SyncProtocol(self.a, peer_id=A), lambda: SyncProtocol(self.engine,
                                                                         peer_id=B))
        ahead = f"{int((self.NOW + 3600) * 1000):013d}:000000:node-a"
        self.a.items.setdefault("notes", {})["k"] = ItemState("notes", "k", self.lww(ahead),
                                                              ahead)
        self.a._trees.clear()
        with self.assertRaises(p.BadRequest) as caught:
            result(pump, Deferred.fromCoroutine(client.run_round()))
        self.assertIn("clock_drift", str(caught.exception))
        self.assertIsNone(self.engine.get("notes", "k"))
        self.assertTrue(issubclass(p.BadRequest, p.SyncError))
        del server


class LostMidAnswerTests(SynchronousTestCase):
    def test_a_connection_lost_while_an_answer_is_sent_in_parts_is_not_an_error(self) -> None:
        """The peer goes away (stopped, killed) while a large answer travels as Part
        commands: the responder ends quietly (nothing to answer to), no "Unknown Error"
        and no critical traceback in the log (trial fails a test that logs one)."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        a = MemoryEngine("node-a", {"notes": None})
        b = MemoryEngine("node-b", {"notes": None})
        b.put("notes", "big", "x" * (300 * 1024))
        client, server, pump = pair(a, b)
        result(pump, Deferred.fromCoroutine(client.hello_remote()))
        before = server.calls
        client.callRemote(p.Fetch, collection="notes", body=b'["big"]').addErrback(
            lambda f: None)
        pump.pump()  # the Fetch arrives; the server sends its parts, awaits their answers
        self.assertEqual(server.calls - before, 6)
        server.connectionLost(Failure(ConnectionDone()))  # gone before any answer
        self.assertEqual((server._incoming, server._pending), ({}, 0))
