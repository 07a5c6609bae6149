"""Hybrid logical clocks: text order is clock order, a clock never goes backwards, and a
remote timestamp too far ahead is refused."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aico.sync.hlc import MAX_DRIFT, ClockDriftError, ClockError, HybridClock, Timestamp, node_of


class Now:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


timestamps = st.builds(Timestamp, st.integers(0, 10**13 - 1), st.integers(0, 999_999),
                       st.sampled_from(["a", "b", "node-1", "ZZZ", "AAAAAAA-BBBBBBB"]))


class HlcTests(SynchronousTestCase):
    def test_text_is_fixed_width_and_parses_back(self) -> None:
        ts = Timestamp(1_700_000_000_123, 7, "AAAAAAA-BBBBBBB")
        self.assertEqual(ts.text(), "1700000000123:000007:AAAAAAA-BBBBBBB")
        self.assertEqual(Timestamp.parse(ts.text()), ts)
        self.assertEqual(node_of(ts.text()), "AAAAAAA-BBBBBBB")

    def test_malformed_text_is_refused_with_a_clear_error(self) -> None:
        for bad in ("", "12:3:a", "1700000000123:000007:", "1700000000123:7:a",
                    "1700000000123:000007:a b", None):
            with self.assertRaises(ClockError) as e:
                Timestamp.parse(bad)  # type: ignore[arg-type]
            self.assertIn("timestamp", str(e.exception))

    @given(timestamps, timestamps)
    def test_text_order_equals_tuple_order(self, a: Timestamp, b: Timestamp) -> None:
        self.assertEqual(a < b, a.text() < b.text())
        self.assertEqual(a == b, a.text() == b.text())

    def test_tick_follows_physical_time_and_counts_when_it_stands_still(self) -> None:
        now = Now()
        clock = HybridClock("a", now)
        first = clock.tick()
        self.assertEqual(first, "1700000000000:000000:a")
        self.assertEqual(clock.tick(), "1700000000000:000001:a")
        now.t -= 5  # the wall clock is set back: the HLC is not
        self.assertEqual(clock.tick(), "1700000000000:000002:a")
        now.t += 10
        self.assertEqual(clock.tick(), "1700000005000:000000:a")

    def test_observe_moves_past_a_remote_timestamp_within_the_drift_bound(self) -> None:
        now = Now()
        clock = HybridClock("a", now)
        remote = Timestamp(int(now.t * 1000) + 30_000, 4, "b").text()
        received = clock.observe(remote)
        self.assertGreater(received, remote)
        self.assertEqual(received, f"{int(now.t * 1000) + 30_000}:000005:a")
        self.assertGreater(clock.tick(), received)

    def test_a_remote_timestamp_more_than_60_s_ahead_is_refused_and_changes_nothing(self) -> None:
        now = Now()
        clock = HybridClock("a", now)
        before = clock.tick()
        remote = Timestamp(int((now.t + MAX_DRIFT) * 1000) + 1, 0, "b").text()
        with self.assertRaises(ClockDriftError) as e:
            clock.observe(remote)
        self.assertIn("ahead of this gateway's clock", str(e.exception))
        self.assertEqual(clock.tick(), before[:14] + "000001:a")
        # reading back our own stored states at start skips the check
        self.assertGreater(clock.observe(remote, check_drift=False), remote)

    def test_a_node_name_with_a_colon_is_refused(self) -> None:
        with self.assertRaises(ClockError):
            HybridClock("a:b", Now())

    @settings(max_examples=200)
    @given(st.lists(st.one_of(
        st.tuples(st.just("tick"), st.floats(-3, 3)),
        st.tuples(st.just("observe"), st.floats(-100, 59), st.integers(0, 999_999 - 10)),
    ), max_size=40))
    def test_a_clock_is_strictly_monotonic_and_observe_never_goes_backwards(self, ops: list) -> None:
        now = Now()
        clock = HybridClock("me", now)
        last = ""
        for op in ops:
            if op[0] == "tick":
                now.t += op[1]
                out = clock.tick()
            else:
                remote = Timestamp(int((now.t + op[1]) * 1000), op[2], "peer").text()
                out = clock.observe(remote)
                self.assertGreater(out, remote)
            self.assertGreater(out, last)
            last = out
