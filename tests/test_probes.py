"""Probes are never refused: ``GET /api/v1/health`` and ``/.well-known/jwks.json`` are
exempt from rate limiting and blocks, and health answers from a result at most 1 s old
(concurrent probes share one fan-out), so a flood of probes costs the modules nothing."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from aico.gateway.testing.memory import MemoryGateway

#: How old a health answer may be (issue 11: "a result at most 1 s old").
MAX_AGE = 1.0

TINY = """
[ratelimit]
block_after = 2
block_base = 600
[ratelimit.tiers.public]
requests = 1
per_seconds = 60
burst = 1
"""


def count_health_requests(gw: MemoryGateway) -> list[str]:
    """Every bus request the gateway sends to a module's health topic, from now on."""
    sent: list[str] = []
    original = gw.bus.request

    def request(topic: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        if "health" in topic:
            sent.append(topic)
        return original(topic, *args, **kwargs)

    gw.bus.request = request  # type: ignore[method-assign]
    return sent


class ProbeExemptionTests(SynchronousTestCase):
    def blocked_gateway(self) -> MemoryGateway:
        gw = MemoryGateway(TINY, test=self)
        codes = [gw.get("/openapi.json").code for _ in range(3)]
        blocked = gw.get("/openapi.json")
        self.assertEqual((codes, blocked.json()["code"]), ([200, 429, 429], "temporarily_blocked"))
        return gw

    def test_a_blocked_client_still_gets_health(self) -> None:
        gw = self.blocked_gateway()
        r = gw.get("/api/v1/health")
        self.assertEqual(r.code, 200, r.body)
        self.assertEqual(r.json()["status"], "ok")
        self.assertIsNone(r.header("Retry-After"))
        # The block itself holds for everything else.
        self.assertEqual(gw.get("/openapi.json").json()["code"], "temporarily_blocked")

    def test_a_blocked_client_still_gets_the_jwks(self) -> None:
        gw = self.blocked_gateway()
        r = gw.get("/.well-known/jwks.json")
        self.assertEqual(r.code, 200, r.body)
        self.assertTrue(r.json()["keys"])
        self.assertIsNone(r.header("Retry-After"))

    def test_probes_never_spend_the_public_budget(self) -> None:
        gw = MemoryGateway(TINY, test=self)
        for _ in range(50):
            self.assertEqual(gw.get("/api/v1/health").code, 200)
            self.assertEqual(gw.get("/.well-known/jwks.json").code, 200)
        self.assertEqual(gw.get("/openapi.json").code, 200)  # the burst of one, untouched

    def test_a_probe_refused_by_the_chain_is_still_charged(self) -> None:
        gw = MemoryGateway(TINY, test=self)
        bad = {"Authorization": "Bearer not-a-token"}
        self.assertEqual(gw.get("/api/v1/health", headers=bad).code, 401)
        r = gw.get("/api/v1/health", headers=bad)
        self.assertEqual(r.code, 429)  # bad tokens cannot be sent without limit


class HealthCacheTests(SynchronousTestCase):
    def test_a_thousand_probes_within_a_second_cost_at_most_two_fan_outs(self) -> None:
        gw = MemoryGateway(test=self)
        asked = count_health_requests(gw)
        modules = len(gw.get("/api/v1/health").json()["modules"])
        self.assertGreater(modules, 0)
        # Past the first answer's age: the flood below starts on a stale result.
        gw.advance(MAX_AGE + 0.1)
        del asked[:]
        codes = []
        for i in range(1000):
            codes.append(gw.get("/api/v1/health").code)
            gw.clock.advance(0.001)
        self.assertEqual(set(codes), {200})
        fan_outs = len(asked) / modules
        self.assertLessEqual(fan_outs, 2)
        self.assertGreaterEqual(fan_outs, 1)

    def test_concurrent_probes_share_one_fan_out(self) -> None:
        gw = MemoryGateway(test=self)
        asked = count_health_requests(gw)
        pending = [gw.send("GET", "/api/v1/health") for _ in range(20)]
        gw.settle()
        answers: list[Any] = []
        for d in pending:
            d.addCallback(answers.append)
        self.assertEqual([a.code for a in answers], [200] * 20)
        modules = len(answers[0].json()["modules"])
        self.assertEqual(len(asked), modules)

    def test_the_result_is_at_most_one_second_old(self) -> None:
        gw = MemoryGateway(test=self)
        asked = count_health_requests(gw)
        gw.get("/api/v1/health")
        first = len(asked)
        gw.advance(MAX_AGE / 2)
        gw.get("/api/v1/health")
        self.assertEqual(len(asked), first)
        gw.advance(MAX_AGE / 2 + 0.01)
        gw.get("/api/v1/health")
        self.assertEqual(len(asked), 2 * first)
