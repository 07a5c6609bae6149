"""The CRDTs and the three strategies: merges are commutative, associative and idempotent
(hypothesis, over states that replicas really reach by writing and merging), and each
strategy keeps what docs/sync.md promises: lww keeps its losers, keep-both keeps every
concurrent version until a write that saw them resolves it, merge merges field by field."""

from __future__ import annotations

import copy
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aico.sync import crdt
from aico.sync.crdt import DELETE, OVERWRITTEN_MAX, StateError
from aico.sync.hlc import HybridClock

NODES = ("a", "b", "c")


class Now:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


class Replicas:
    """Three nodes writing and merging one item (what the protocol would do)."""

    def __init__(self, strategy: str) -> None:
        self.strategy = strategy
        self.now = Now()
        self.clocks = {n: HybridClock(n, self.now) for n in NODES}
        self.states: dict[str, dict[str, Any] | None] = dict.fromkeys(NODES)

    def write(self, node: str, value: Any) -> dict[str, Any]:
        ts = self.clocks[node].tick()
        state = crdt.write(self.strategy, self.states[node], value, ts)
        self.states[node] = state
        return state

    def sync(self, src: str, dst: str) -> dict[str, Any] | None:
        s = self.states[src]
        if s is None:
            return self.states[dst]
        self.clocks[dst].observe(s["hlc"])
        d = self.states[dst]
        self.states[dst] = crdt.merge(self.strategy, d, s) if d is not None else copy.deepcopy(s)
        return self.states[dst]


plain_values = st.one_of(st.integers(-2, 2), st.text("xy", max_size=2), st.none(),
                         st.just(DELETE))
field_values = st.one_of(st.integers(-3, 3), st.sampled_from([0.1, 0.2, 1.5]),
                         st.lists(st.sampled_from([1, 2, "x"]), max_size=3),
                         st.text("xy", max_size=1), st.booleans())
object_values = st.one_of(
    st.dictionaries(st.sampled_from(["n", "tags", "t"]), field_values, max_size=3),
    st.just(DELETE))


@st.composite
def runs(draw: Any, strategy: str) -> list[dict[str, Any]]:
    """Every state the replicas went through in one random history."""
    r = Replicas(strategy)
    values = object_values if strategy == "merge" else plain_values
    seen = [r.write(draw(st.sampled_from(NODES)), draw(values))]
    for _ in range(draw(st.integers(0, 14))):
        op = draw(st.sampled_from(["write", "write", "sync", "sync", "time"]))
        if op == "write":
            seen.append(r.write(draw(st.sampled_from(NODES)), draw(values)))
        elif op == "sync":
            s = r.sync(draw(st.sampled_from(NODES)), draw(st.sampled_from(NODES)))
            if s is not None:
                seen.append(s)
        else:
            r.now.t += draw(st.sampled_from([0.0, 0.001, 1.0]))
    return seen


def three(strategy: str) -> Any:
    return runs(strategy).flatmap(
        lambda seen: st.tuples(*(st.sampled_from(seen) for _ in range(3))))


LAWS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class StrategyLawTests(SynchronousTestCase):
    def _laws(self, strategy: str, abc: tuple[dict[str, Any], ...]) -> None:
        a, b, c = abc
        m = lambda x, y: crdt.merge(strategy, x, y)  # noqa: E731
        self.assertEqual(m(a, b), m(b, a), "commutative")
        self.assertEqual(m(m(a, b), c), m(a, m(b, c)), "associative")
        self.assertEqual(m(a, a), a, "idempotent")
        self.assertEqual(crdt.view(m(a, b)), crdt.view(m(b, a)))
        crdt.check(m(a, b))

    @LAWS
    @given(three("lww"))
    def test_lww_merge_is_commutative_associative_and_idempotent(self, abc: Any) -> None:
        self._laws("lww", abc)

    @LAWS
    @given(three("keep-both"))
    def test_keep_both_merge_is_commutative_associative_and_idempotent(self, abc: Any) -> None:
        self._laws("keep-both", abc)

    @LAWS
    @given(three("merge"))
    def test_merge_strategy_merge_is_commutative_associative_and_idempotent(self, abc: Any) -> None:
        self._laws("merge", abc)

    @LAWS
    @given(st.sampled_from(crdt.STRATEGIES).flatmap(lambda s: st.tuples(st.just(s), runs(s))),
           st.randoms())
    def test_replicas_that_saw_the_same_states_agree_whatever_the_order(self, sr: Any,
                                                                          rnd: Any) -> None:
        strategy, seen = sr
        shuffled = list(seen)
        rnd.shuffle(shuffled)

        def fold(states: list[dict[str, Any]]) -> dict[str, Any]:
            out = states[0]
            for s in states[1:]:
                out = crdt.merge(strategy, out, s)
            return out

        self.assertEqual(fold(seen), fold(shuffled))


# -- the building blocks alone -----------------------------------------------------------

def _block_runs(new: Callable[[], dict[str, Any]],
                ops: list[Callable[[dict[str, Any], str, Any], dict[str, Any]]],
                merge: Callable[[Any, Any], Any]) -> Any:
    @st.composite
    def gen(draw: Any) -> list[dict[str, Any]]:
        now = Now()
        clocks = {n: HybridClock(n, now) for n in NODES}
        states = {n: new() for n in NODES}
        seen = []
        for _ in range(draw(st.integers(1, 14))):
            n, other = draw(st.sampled_from(NODES)), draw(st.sampled_from(NODES))
            if draw(st.booleans()):
                op = draw(st.sampled_from(ops))
                states[n] = op(states[n], clocks[n].tick(), draw(st.sampled_from([1, 2, "x"])))
            else:
                states[n] = merge(states[n], states[other])
            seen.append(states[n])
            now.t += draw(st.sampled_from([0.0, 0.001]))
        return seen

    return gen().flatmap(lambda seen: st.tuples(*(st.sampled_from(seen) for _ in range(3))))


class BlockLawTests(SynchronousTestCase):
    def _laws(self, merge: Callable[[Any, Any], Any], abc: Any) -> None:
        a, b, c = abc
        self.assertEqual(merge(a, b), merge(b, a))
        self.assertEqual(merge(merge(a, b), c), merge(a, merge(b, c)))
        self.assertEqual(merge(a, a), a)

    @LAWS
    @given(_block_runs(crdt.orset_new,
                       [lambda s, ts, v: crdt.orset_add(s, v, ts),
                        lambda s, ts, v: crdt.orset_remove(s, v)], crdt.orset_merge))
    def test_or_set_merge_laws(self, abc: Any) -> None:
        self._laws(crdt.orset_merge, abc)

    @LAWS
    @given(_block_runs(crdt.pn_new,
                       [lambda s, ts, v: crdt.pn_add(s, ts.split(":")[2], Decimal(1)),
                        lambda s, ts, v: crdt.pn_add(s, ts.split(":")[2], Decimal("-2.5"))],
                       crdt.pn_merge))
    def test_pn_counter_merge_laws(self, abc: Any) -> None:
        self._laws(crdt.pn_merge, abc)

    @LAWS
    @given(_block_runs(lambda: crdt.lww_new(None, ""),
                       [lambda s, ts, v: crdt.lww_new(v, ts)], crdt.lww_merge))
    def test_lww_register_merge_laws(self, abc: Any) -> None:
        self._laws(crdt.lww_merge, abc)

    @LAWS
    @given(_block_runs(crdt.mv_new,
                       [lambda s, ts, v: crdt.mv_write(s, v, ts)], crdt.mv_merge))
    def test_multi_value_register_merge_laws(self, abc: Any) -> None:
        self._laws(crdt.mv_merge, abc)

    def test_or_set_add_wins_over_a_concurrent_remove(self) -> None:
        s = crdt.orset_add(crdt.orset_new(), "x", "1700000000000:000000:a")
        removed = crdt.orset_remove(s, "x")                       # a removes what it saw
        readded = crdt.orset_add(s, "x", "1700000000000:000000:b")  # b adds again, concurrently
        self.assertEqual(crdt.orset_values(crdt.orset_merge(removed, readded)), ["x"])
        self.assertEqual(crdt.orset_values(crdt.orset_merge(removed, s)), [])


# -- what each strategy promises --------------------------------------------------------

class StrategyBehaviourTests(SynchronousTestCase):
    def test_lww_the_later_write_wins_and_the_loser_is_kept_in_overwritten(self) -> None:
        r = Replicas("lww")
        r.write("a", "from a")
        r.now.t += 0.001
        r.write("b", "from b")  # concurrent, later
        merged = r.sync("a", "b")
        assert merged is not None
        v = crdt.view(merged)
        self.assertEqual(v.value, "from b")
        self.assertEqual([(o["value"], o["origin"]) for o in v.overwritten], [("from a", "a")])
        # a write that saw the merge keeps the loser (it was never resolved by a client)
        after = r.write("b", "later")
        v = crdt.view(after)
        self.assertEqual(v.value, "later")
        self.assertEqual([o["value"] for o in v.overwritten], ["from a"])
        # a plain sequence of writes overwrites nothing
        seq = Replicas("lww")
        seq.write("a", 1)
        self.assertEqual(crdt.view(seq.write("a", 2)).overwritten, [])

    def test_lww_overwritten_is_bounded_to_the_newest_eight(self) -> None:
        r = Replicas("lww")
        base = crdt.write("lww", None, 0, r.clocks["a"].tick())
        states = []
        for i in range(12):
            clock = HybridClock(f"n{i:02d}", r.now)
            r.now.t += 0.001
            states.append(crdt.write("lww", base, i, clock.tick()))
        merged = states[0]
        for s in states[1:]:
            merged = crdt.merge("lww", merged, s)
        v = crdt.view(merged)
        self.assertEqual(v.value, 11)
        self.assertEqual([o["value"] for o in v.overwritten], [10, 9, 8, 7, 6, 5, 4, 3])
        self.assertEqual(len(v.overwritten), OVERWRITTEN_MAX)

    def test_keep_both_keeps_both_concurrent_versions_until_a_write_that_saw_them(self) -> None:
        r = Replicas("keep-both")
        r.write("a", "mine")
        r.write("b", "theirs")
        stale_b = r.states["b"]
        merged = r.sync("a", "b")
        assert merged is not None
        v = crdt.view(merged)
        self.assertTrue(v.conflict)
        self.assertEqual(sorted((x["value"], x["origin"]) for x in v.versions or []),
                         [("mine", "a"), ("theirs", "b")])
        resolved = r.write("b", "both, merged by hand")
        self.assertEqual(crdt.view(resolved).value, "both, merged by hand")
        self.assertFalse(crdt.view(resolved).conflict)
        # the old versions arriving again (a slow peer) do not bring the conflict back
        assert stale_b is not None
        again = crdt.merge("keep-both", resolved, stale_b)
        again = crdt.merge("keep-both", again, r.states["a"] or {})
        self.assertEqual(crdt.view(again).value, "both, merged by hand")

    def test_keep_both_shows_a_concurrent_delete_as_a_version(self) -> None:
        r = Replicas("keep-both")
        r.write("a", "v1")
        r.sync("a", "b")
        r.write("a", DELETE)
        r.write("b", "v2")
        merged = r.sync("a", "b")
        assert merged is not None
        versions = crdt.view(merged).versions or []
        self.assertEqual(sorted(str(x.get("deleted", x["value"])) for x in versions),
                         ["True", "v2"])

    def test_merge_counters_add_the_increments_of_each_node(self) -> None:
        r = Replicas("merge")
        r.write("a", {"n": 5})
        r.sync("a", "b")
        r.write("a", {"n": 7})   # +2
        r.write("b", {"n": 4})   # -1
        r.sync("a", "b")
        merged = r.sync("b", "a")
        assert merged is not None
        self.assertEqual(crdt.view(merged).value, {"n": 6})
        self.assertEqual(r.states["a"], r.states["b"])

    def test_merge_counters_of_decimals_are_exact(self) -> None:
        r = Replicas("merge")
        r.write("a", {"x": 0.1})
        self.assertEqual(crdt.view(r.write("a", {"x": 0.3})).value, {"x": 0.3})

    def test_merge_arrays_are_add_wins_sets_and_other_fields_lww_per_field(self) -> None:
        r = Replicas("merge")
        r.write("a", {"tags": [1, 2], "title": "t"})
        r.sync("a", "b")
        r.write("a", {"tags": [1], "title": "t", "note": "from a"})       # removes 2
        r.write("b", {"tags": [1, 2, 3], "title": "new title"})           # adds 3
        merged = r.sync("a", "b")
        assert merged is not None
        self.assertEqual(crdt.view(merged).value,
                         {"tags": [1, 3], "title": "new title", "note": "from a"})

    def test_merge_needs_an_object_and_a_delete_is_a_tombstone(self) -> None:
        with self.assertRaises(StateError) as e:
            crdt.write("merge", None, [1, 2], "1700000000000:000000:a")
        self.assertIn("must be a JSON object", str(e.exception))
        s = crdt.write("merge", None, {"a": 1}, "1700000000000:000000:a")
        gone = crdt.write("merge", s, DELETE, "1700000000000:000001:a")
        self.assertTrue(crdt.view(gone).deleted)
        back = crdt.write("merge", gone, {"a": 3}, "1700000000000:000002:a")
        self.assertEqual(crdt.view(back).value, {"a": 3})

    def test_a_field_can_change_its_type(self) -> None:
        r = Replicas("merge")
        r.write("a", {"f": 5})
        r.write("a", {"f": "five"})
        self.assertEqual(crdt.view(r.write("a", {"f": 3})).value, {"f": 3})

    def test_check_refuses_malformed_states(self) -> None:
        good = crdt.write("lww", None, 1, "1700000000000:000000:a")
        crdt.check(good)
        bad: list[Any] = [
            [], {"s": "other", "hlc": good["hlc"]}, {**good, "hlc": "yesterday"},
            {**good, "versions": {}}, {**good, "versions": {"x": {"value": 1}}},
            {**good, "ctx": {"b": good["hlc"]}}, {**good, "overwritten": "no"},
            {**good, "versions": {good["hlc"]: {}}},
            {"s": "merge", "hlc": good["hlc"], "alive": {"hlc": good["hlc"], "value": True},
             "fields": {"n": {"kind": {"hlc": good["hlc"], "value": "counter"}}}},
            {"s": "merge", "hlc": good["hlc"], "alive": {"hlc": good["hlc"], "value": True},
             "fields": {"n": {"kind": {"hlc": good["hlc"], "value": "counter"},
                              "counter": {"p": {"a": "NaN"}, "n": {}}}}},
        ]
        for state in bad:
            with self.assertRaises(StateError, msg=repr(state)):
                crdt.check(state)
