"""`/admin/metrics` on the admin site: admin credentials only, Prometheus text that
prometheus_client's own parser reads, numbers that move with traffic — in memory and on a
real gateway (where the formatting runs on the CPU pool)."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.gateway.testing.harness import http_client, login, start_gateway
from aico.gateway.testing.memory import MemoryGateway
from tests.test_metrics import FAMILIES


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def requests_to(values: dict[Any, float], route: str) -> float:
    return sum(v for (name, labels), v in values.items()
               if name == "aico_requests_total" and ("route", route) in labels)


class AdminMetricsMemoryTests(SynchronousTestCase):
    def test_metrics_need_an_admin_and_parse_with_every_family(self) -> None:
        gw = MemoryGateway(test=self)
        self.assertEqual(gw.admin_request("GET", "/admin/metrics").code, 401)
        gw.add_user("ursula", "ursula-password-1")
        user = gw.token("ursula", "ursula-password-1")
        self.assertEqual(gw.admin_request("GET", "/admin/metrics", token=user).code, 403)
        self.assertEqual(gw.get("/api/v1/users/me", token=user).code, 200)
        r = gw.admin_request("GET", "/admin/metrics", token=gw.token())
        self.assertEqual(r.code, 200)
        self.assertTrue((r.header("content-type") or "").startswith("text/plain"))
        text = r.body.decode()
        names = {f.name: f.type for f in text_string_to_metric_families(text)}
        for name, kind in FAMILIES.items():
            self.assertEqual(names.get(name), kind, name)
        self.assertGreaterEqual(requests_to(samples(text), "/api/v1/users/me"), 1)

    def test_metrics_are_not_served_on_the_http_listener(self) -> None:
        gw = MemoryGateway(test=self)
        self.assertEqual(gw.get("/admin/metrics", token=gw.token()).code, 404)


class AdminMetricsRealTests(TestCase):
    timeout = 60

    async def test_a_real_scrape_parses_and_moves_after_traffic(self) -> None:
        gw = await start_gateway(self)
        http = http_client(self)
        tokens = await login(http, gw.base, "admin", gw.admin_password)
        auth = {"Authorization": f"Bearer {tokens['access_token']}"}
        admin = f"http://127.0.0.1:{gw.ports['admin']['port']}/admin/metrics"

        async def scrape() -> dict[Any, float]:
            r = await http.get(admin, headers=auth)
            self.assertEqual(r.code, 200)
            return samples((await r.content()).decode())

        before = requests_to(await scrape(), "/api/v1/users/me")
        for _ in range(3):
            r = await http.get(gw.base + "/api/v1/users/me", headers=auth)
            self.assertEqual(r.code, 200)
            await r.content()
        after = await scrape()
        self.assertEqual(requests_to(after, "/api/v1/users/me") - before, 3)
        self.assertEqual(after[("aico_module_up", (("module", "conversation"),))], 1.0)
