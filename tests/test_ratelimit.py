"""GCRA rate limiting: burst, steady rate, headers, blocks, memory bounds, isolation."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from aico.gateway.config import RateLimitSection, RateTier, from_mapping
from aico.gateway.config import reload as reload_config
from aico.gateway.security.ratelimit import Decision, GcraLimiter, IRateLimiter
from aico.gateway.testing.harness import http_client, merge
from aico.gateway.testing.memory import MEMORY_CONFIG, MemoryGateway
from aico.keystore import TEST_KDF
from aico.services import PeriodicJob

# One request per second, bursts of three.
TIER = RateTier(requests=10, per_seconds=10, burst=3)


class LimiterTestBase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.blocks: list[tuple[str, str, float]] = []
        self.limiter = GcraLimiter(
            self.clock,
            {"t": TIER},
            block_after=3,
            block_base=10,
            block_max=25,
            escalation_memory=100,
            on_block=lambda *a: self.blocks.append(a),
        )

    def check(self, client: str = "a", tier: str = "t") -> Decision:
        return self.limiter.check(client, tier)

    def drain(self, client: str = "a") -> None:
        for _ in range(TIER.burst):
            self.assertTrue(self.check(client).allowed)


class GcraTests(LimiterTestBase):
    def test_provides_the_interface(self) -> None:
        verifyObject(IRateLimiter, self.limiter)

    def test_burst_is_allowed_then_refused(self) -> None:
        remaining = [self.check().remaining for _ in range(3)]
        self.assertEqual(remaining, [2, 1, 0])
        refused = self.check()
        self.assertFalse(refused.allowed)
        self.assertFalse(refused.blocked)
        self.assertEqual(refused.code, "rate_limited")
        self.assertEqual(refused.retry_after, 1)

    def test_steady_rate_after_the_burst(self) -> None:
        self.drain()
        for _ in range(100):
            self.clock.advance(1)
            decision = self.check()
            self.assertEqual((decision.allowed, decision.remaining), (True, 0))
        self.clock.advance(0.5)
        self.assertFalse(self.check().allowed)

    def test_quota_refills_to_the_burst_and_no_further(self) -> None:
        self.drain()
        self.clock.advance(1000)
        self.assertEqual([self.check().remaining for _ in range(4)][:3], [2, 1, 0])

    def test_retry_after_is_whole_seconds_rounded_up(self) -> None:
        slow = {"slow": RateTier(requests=4, per_seconds=10, burst=1)}  # one per 2.5 s
        for elapsed, expected in ((0.0, 3), (0.5, 2), (1.4, 2), (1.5, 1), (2.4, 1)):
            clock = Clock()
            limiter = GcraLimiter(clock, slow)
            self.assertTrue(limiter.check("a", "slow").allowed)
            clock.advance(elapsed)
            decision = limiter.check("a", "slow")
            self.assertEqual((decision.allowed, decision.retry_after), (False, expected), elapsed)
            self.assertEqual(decision.headers()["Retry-After"], str(expected))

    def test_waiting_retry_after_is_enough(self) -> None:
        limiter = GcraLimiter(self.clock, {"slow": RateTier(requests=4, per_seconds=10, burst=1)})
        limiter.check("a", "slow")
        self.clock.advance(0.3)
        wait = limiter.check("a", "slow").retry_after
        self.clock.advance(wait)
        self.assertTrue(limiter.check("a", "slow").allowed)

    def test_header_values(self) -> None:
        limiter = GcraLimiter.from_config(self.clock, RateLimitSection())
        first = limiter.check("a", "standard")
        self.assertEqual(first.policy_header, '"standard";q=600;w=60')
        self.assertEqual(first.ratelimit_header, '"standard";r=99;t=1')
        self.assertEqual(first.limit, 600)
        for _ in range(42):
            last = limiter.check("a", "standard")
        self.assertEqual(last.ratelimit_header, '"standard";r=57;t=5')
        self.assertEqual(
            last.headers(),
            {"RateLimit-Policy": '"standard";q=600;w=60', "RateLimit": '"standard";r=57;t=5'},
        )

    def test_refusal_headers_carry_retry_after(self) -> None:
        self.drain()
        refused = self.check()
        self.assertEqual(
            refused.headers(),
            {"RateLimit-Policy": '"t";q=10;w=10', "RateLimit": '"t";r=0;t=3', "Retry-After": "1"},
        )

    def test_policy_name_is_an_escaped_sf_string(self) -> None:
        limiter = GcraLimiter(self.clock, {'we"ird\\': RateTier(1, 1.5, 1)})
        decision = limiter.check("a", 'we"ird\\')
        self.assertEqual(decision.policy_header, '"we\\"ird\\\\";q=1;w=2')

    def test_unknown_tier_is_an_error(self) -> None:
        self.assertRaises(ValueError, self.check, "a", "nope")


class BlockTests(LimiterTestBase):
    def provoke_block(self, client: str = "a") -> Decision:
        # After the quota is gone, the third refusal in a window blocks.
        while self.check(client).allowed:
            pass
        self.check(client)
        return self.check(client)

    def test_repeated_refusals_block_the_client(self) -> None:
        blocked = self.provoke_block()
        self.assertTrue(blocked.blocked)
        self.assertEqual(blocked.code, "temporarily_blocked")
        self.assertEqual(blocked.retry_after, 10)
        self.assertEqual(self.blocks, [("a", "t", 10)])

    def test_block_holds_without_extension_then_ends(self) -> None:
        self.provoke_block()
        for _ in range(9):
            self.clock.advance(1)
            decision = self.check()
            self.assertTrue(decision.blocked)
            self.assertFalse(decision.allowed)
        self.assertEqual(decision.retry_after, 1)
        self.clock.advance(1)
        self.assertTrue(self.check().allowed)
        self.assertEqual(len(self.blocks), 1)  # requests during the block do not re-block

    def test_blocks_double_up_to_the_maximum(self) -> None:
        durations = []
        for _ in range(4):
            durations.append(self.provoke_block().retry_after)
            self.clock.advance(durations[-1])
        self.assertEqual(durations, [10, 20, 25, 25])
        self.assertEqual([b[2] for b in self.blocks], [10, 20, 25, 25])

    def test_escalation_is_forgotten_after_a_while(self) -> None:
        self.assertEqual(self.provoke_block().retry_after, 10)
        self.clock.advance(10)
        self.assertEqual(self.provoke_block().retry_after, 20)
        self.clock.advance(20 + 100)  # block over, plus escalation_memory
        self.assertEqual(self.provoke_block().retry_after, 10)

    def test_sparse_refusals_do_not_block(self) -> None:
        self.drain()
        for _ in range(10):
            self.assertFalse(self.check().allowed)
            self.clock.advance(TIER.per_seconds)  # a new window for each refusal
            self.drain_fully()
        self.assertEqual(self.blocks, [])

    def drain_fully(self) -> None:
        while self.check().allowed:
            pass

    def test_failing_on_block_callback_does_not_break_the_limiter(self) -> None:
        def boom(*a: object) -> None:
            raise RuntimeError("audit down")

        self.limiter.on_block = boom
        self.assertTrue(self.provoke_block().blocked)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class IsolationTests(LimiterTestBase):
    def test_one_client_never_affects_another(self) -> None:
        self.drain("a")
        self.assertFalse(self.check("a").allowed)
        self.assertEqual([self.check("b").remaining for _ in range(3)], [2, 1, 0])
        self.check("a")
        self.assertTrue(self.check("a").blocked)
        self.assertTrue(self.check("c").allowed)
        self.assertEqual(self.blocks, [("a", "t", 10)])

    def test_tiers_have_separate_quotas(self) -> None:
        self.limiter.update({"t": TIER, "u": TIER})
        self.drain("a")
        self.assertTrue(self.check("a", "u").allowed)


class MemoryTests(LimiterTestBase):
    def sweeping(self) -> PeriodicJob:
        job = PeriodicJob("ratelimit-sweep", self.limiter.sweep_interval, self.limiter.sweep,
                          self.clock)
        job.startService()
        return job

    def test_idle_entries_expire_on_the_periodic_sweep(self) -> None:
        job = self.sweeping()
        self.addCleanup(job.stopService)
        for i in range(50):
            self.check(f"c{i}")
        self.provoke_block_of("blocked")
        self.assertEqual(len(self.limiter), 51)
        self.clock.advance(self.limiter.sweep_interval)
        # The quota is full again after 1 s; the blocked client is remembered.
        self.assertEqual(len(self.limiter), 1)
        self.assertEqual(self.limiter.snapshot()[0]["client"], "blocked")
        self.clock.advance(self.limiter.sweep_interval * 2)  # block and escalation over
        self.assertEqual(len(self.limiter), 0)

    def provoke_block_of(self, client: str) -> None:
        while not self.check(client).blocked:
            pass

    def test_hard_cap_evicts_the_least_recently_seen(self) -> None:
        limiter = GcraLimiter(self.clock, {"t": TIER}, max_entries=3)
        for client in ("a", "b", "c"):
            limiter.check(client, "t")
        limiter.check("a", "t")  # a is now the most recent
        limiter.check("d", "t")
        self.assertEqual(len(limiter), 3)
        self.assertEqual({s["client"] for s in limiter.snapshot()}, {"a", "c", "d"})
        self.assertEqual(limiter.stats()["evicted_total"], 1)

    def test_stop_cancels_the_sweep(self) -> None:
        self.sweeping().stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class UpdateTests(LimiterTestBase):
    def test_update_applies_new_rates_and_keeps_state(self) -> None:
        self.drain()
        self.limiter.update({"t": RateTier(requests=10, per_seconds=10, burst=5)})
        decision = self.check()
        self.assertTrue(decision.allowed)  # the bigger burst has room left
        self.assertEqual(decision.policy_header, '"t";q=10;w=10')
        self.assertEqual(decision.remaining, 1)

    def test_update_changes_block_settings(self) -> None:
        self.limiter.update({"t": TIER}, block_after=1, block_base=7)
        self.drain()
        self.assertEqual(self.check().retry_after, 7)

    def test_update_from_config(self) -> None:
        section = RateLimitSection(tiers={"t": RateTier(1, 60, 1)}, block_after=50)
        self.limiter.update_from_config(section)
        self.assertEqual(self.limiter.block_after, 50)
        self.assertEqual(self.check().policy_header, '"t";q=1;w=60')

    def test_removed_tier_is_refused_after_update(self) -> None:
        self.limiter.update({"u": TIER})
        self.assertRaises(ValueError, self.check, "a", "t")

    def test_invalid_tier_is_rejected(self) -> None:
        self.assertRaises(ValueError, self.limiter.update, {"t": RateTier(0, 1, 1)})


class SnapshotTests(LimiterTestBase):
    def test_snapshot_lists_recent_clients_first(self) -> None:
        self.check("a")
        self.provoke()
        snap = self.limiter.snapshot()
        self.assertEqual([s["client"] for s in snap], ["b", "a"])
        self.assertTrue(snap[0]["blocked"])
        self.assertEqual(snap[0]["block_level"], 1)
        self.assertEqual(snap[1]["tiers"]["t"]["remaining"], 2)
        self.assertEqual(len(self.limiter.snapshot(limit=1)), 1)

    def provoke(self) -> None:
        while not self.check("b").blocked:
            pass


class LiveTierChangeTests(LimiterTestBase):
    """A tier changed live (SIGHUP, admin PATCH → ``update``) governs every client from
    its next request: stored state never holds a client longer than the new tier allows."""

    def test_a_raised_tier_frees_a_limited_client_at_once(self) -> None:
        self.limiter.update({"t": RateTier(requests=1, per_seconds=60, burst=1)})
        self.assertTrue(self.check().allowed)
        refused = self.check()
        self.assertFalse(refused.allowed)
        self.assertEqual(refused.retry_after, 60)
        self.limiter.update({"t": RateTier(requests=1_000_000_000, per_seconds=60, burst=1)})
        # The used request still counts, as one new interval (60 ns): a millisecond later
        # the client is free, not 60 s later.
        self.clock.advance(0.001)
        freed = self.check()
        self.assertTrue(freed.allowed, freed)
        self.assertLess(freed.reset_after, 1e-6)

    def test_the_wait_never_exceeds_one_new_interval(self) -> None:
        self.limiter.update({"t": RateTier(requests=1, per_seconds=3600, burst=5)})
        for _ in range(5):
            self.assertTrue(self.check().allowed)
        self.assertEqual(self.check().retry_after, 3600)
        # Ten times faster, burst one: the used quota counts (the client is at its
        # limit) but waits at most one new interval, 360 s, not the old 3600 s.
        self.limiter.update({"t": RateTier(requests=10, per_seconds=3600, burst=1)})
        self.assertEqual(self.check().retry_after, 360)
        self.clock.advance(360)
        self.assertTrue(self.check().allowed)

    def test_a_lowered_tier_applies_from_the_next_request(self) -> None:
        self.assertTrue(self.check().allowed)  # one of three used at 1/s
        self.limiter.update({"t": RateTier(requests=1, per_seconds=100, burst=3)})
        # The one used request still counts: two more, then one per 100 s.
        self.assertTrue(self.check().allowed)
        self.assertTrue(self.check().allowed)
        refused = self.check()
        self.assertFalse(refused.allowed)
        self.assertEqual(refused.retry_after, 100)
        self.clock.advance(99)
        self.assertFalse(self.check().allowed)
        self.clock.advance(1)
        self.assertTrue(self.check().allowed)

    def test_a_smaller_burst_clamps_the_stored_backlog(self) -> None:
        self.limiter.update({"t": RateTier(requests=10, per_seconds=10, burst=50)})
        for _ in range(50):
            self.assertTrue(self.check().allowed)
        self.limiter.update({"t": RateTier(requests=10, per_seconds=10, burst=2)})
        self.assertEqual(self.check().retry_after, 1)  # not 49 s
        self.clock.advance(1)
        self.assertTrue(self.check().allowed)

    def test_a_rescaled_backlog_drains_in_real_time(self) -> None:
        self.drain()  # three used at 1/s
        self.limiter.update({"t": RateTier(requests=1, per_seconds=10, burst=3)})
        self.assertFalse(self.check().allowed)  # rescaled: 30 s of backlog
        self.clock.advance(10)
        self.assertTrue(self.check().allowed)
        self.assertFalse(self.check().allowed)

    def test_a_block_survives_a_raised_tier(self) -> None:
        self.drain()
        while not self.check().blocked:
            pass
        self.limiter.update({"t": RateTier(requests=1_000_000_000, per_seconds=10, burst=1000)})
        decision = self.check()
        self.assertTrue(decision.blocked)
        self.assertEqual(decision.retry_after, 10)
        self.clock.advance(10)
        self.assertTrue(self.check().allowed)

    def test_snapshot_reports_state_in_the_new_tier_terms(self) -> None:
        self.limiter.update({"t": RateTier(requests=1, per_seconds=60, burst=1)})
        self.check()
        self.limiter.update({"t": RateTier(requests=1_000_000_000, per_seconds=60, burst=5)})
        tier = self.limiter.snapshot()[0]["tiers"]["t"]
        self.assertEqual((tier["remaining"], tier["reset_after"]), (4, 1))


TINY_PUBLIC = """
[ratelimit]
block_after = {block_after}
[ratelimit.tiers.public]
requests = {requests}
per_seconds = 60
burst = 1
"""


class ReloadTests(SynchronousTestCase):
    """The reload path (``GatewayParts.reconfigure``, what SIGHUP and the admin PATCH call)
    on the in-memory gateway: requests through the real chain."""

    def gateway(self, block_after: int = 1000) -> MemoryGateway:
        return MemoryGateway(TINY_PUBLIC.format(block_after=block_after, requests=1), test=self)

    def reconfigure(self, gw: MemoryGateway, requests: int) -> None:
        new = from_mapping(merge(tomllib.loads(MEMORY_CONFIG),
                                 tomllib.loads(TINY_PUBLIC.format(block_after=1000,
                                                                  requests=requests))),
                           "<memory>")
        result = reload_config(gw.parts.config, new)
        self.assertIn("ratelimit.tiers", result.live)
        gw.parts.reconfigure(result.config)

    def test_a_tier_raised_by_reload_frees_a_limited_client_at_once(self) -> None:
        gw = self.gateway()
        self.assertEqual(gw.get("/openapi.json").code, 200)
        refused = gw.get("/openapi.json")
        self.assertEqual((refused.code, refused.header("Retry-After")), (429, "60"))
        self.reconfigure(gw, 1_000_000_000)
        gw.advance(0.001)
        self.assertEqual(gw.get("/openapi.json").code, 200)

    def test_a_tier_lowered_by_reload_applies_from_the_next_request(self) -> None:
        gw = MemoryGateway(TINY_PUBLIC.format(block_after=1000, requests=1000), test=self)
        self.assertEqual(gw.get("/openapi.json").code, 200)  # the burst of one, spent
        self.reconfigure(gw, 1)
        refused = gw.get("/openapi.json")
        self.assertEqual(refused.code, 429)
        self.assertEqual(refused.header("Retry-After"), "60")

    def test_a_block_survives_the_reload(self) -> None:
        gw = self.gateway(block_after=2)
        codes = [gw.get("/openapi.json").json().get("code") for _ in range(3)]
        self.assertEqual(codes[-1], "temporarily_blocked")
        self.reconfigure(gw, 1_000_000_000)
        gw.advance(0.001)
        still = gw.get("/openapi.json")
        self.assertEqual((still.code, still.json()["code"]), (429, "temporarily_blocked"))
        gw.advance(60)
        self.assertEqual(gw.get("/openapi.json").code, 200)


class SighupProcessTests(TestCase):
    """A tier raised by SIGHUP in a real ``twistd aico-gateway`` frees a limited client."""

    timeout = 60

    async def test_a_tier_raised_by_sighup_frees_a_limited_client(self) -> None:
        from aico.gateway import state as state_module
        from aico.gateway.security.passwords import hash_password
        from aico.gateway.testing.memory import CHEAP_HASHER
        from tests.test_process import FREE, ROOT, TWISTD, Twistd

        state = Path(os.path.abspath(self.mktemp()))
        self.patch(state_module, "hash_password", lambda pw: hash_password(pw, CHEAP_HASHER))
        state_module.bootstrap(state, ("conversation", "health"), kdf=TEST_KDF,
                               env={"AICO_NO_KEYRING": "1"})
        config = Path(os.path.abspath(self.mktemp() + ".toml"))
        base_config = FREE.format(http=0, timeout=5.0)
        config.write_text(base_config + TINY_PUBLIC.format(block_after=1000, requests=1))
        proto = Twistd()
        env = {k: v for k, v in os.environ.items() if k != "AICO_MASTER_PASSWORD"}
        process = reactor.spawnProcess(
            proto, TWISTD, [TWISTD, "-n", "--pidfile=", "aico-gateway", "--config", str(config),
                            "--state-dir", str(state)],
            env={**env, "AICO_NO_KEYRING": "1"}, path=str(ROOT))

        def kill() -> Deferred[int] | None:
            if proto.ended.called:
                return None
            process.signalProcess("KILL")
            return proto.ended

        self.addCleanup(kill)
        for _ in range(300):
            if (state / "ports.json").exists() or proto.ended.called:
                break
            await deferLater(reactor, 0.05, lambda: None)
        ports = json.loads((state / "ports.json").read_text())
        url = f"http://127.0.0.1:{ports['http']['port']}/openapi.json"
        http = http_client(self)
        self.assertEqual((await http.get(url)).code, 200)
        refused = await http.get(url)
        await refused.content()
        self.assertEqual(refused.code, 429)
        self.assertEqual(int(refused.headers.getRawHeaders("Retry-After")[0]), 60)
        config.write_text(base_config + TINY_PUBLIC.format(block_after=1000,
                                                           requests=1_000_000_000))
        process.signalProcess("HUP")
        for _ in range(100):
            if b"config reloaded" in proto.output:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertIn(b"ratelimit.tiers", proto.output)
        freed = await http.get(url)
        await freed.content()
        self.assertEqual(freed.code, 200)
        process.signalProcess("TERM")
        self.assertEqual(await proto.ended, 0)
