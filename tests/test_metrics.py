"""Prometheus metrics (docs/metrics.md): every family, read back with prometheus_client's
own parser from what the metrics resource serves, and moving with traffic through the
in-memory gateway."""

from __future__ import annotations

from typing import Any

import prometheus_client
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from aico.gateway.metrics import GatewayMetrics, StateCollector
from aico.gateway.routing.backend import BusForwarder
from aico.gateway.routing.messages import Request
from aico.gateway.routing.table import RouteEntry
from aico.gateway.testing.memory import MemoryGateway
from aico.proto import AicoMessage, ApiResponse, wrap
from tests.echomodule import Echo

FAMILIES = {
    "aico_requests": "counter",
    "aico_request_duration_seconds": "histogram",
    "aico_open_connections": "gauge",
    "aico_bus_round_trip_seconds": "histogram",
    "aico_module_up": "gauge",
    "aico_ratelimit_decisions": "counter",
    "aico_ratelimit_blocks": "counter",
    "aico_audit_chain_length": "gauge",
}

ECHO_ROLES = "[roles]\nuser = ['echo:write', 'users:self']\n"

#: A standard tier of two requests, and a block after two refusals.
TIGHT_STANDARD = """
[ratelimit]
block_after = 2
block_base = 30
[ratelimit.tiers.standard]
requests = 2
per_seconds = 60
burst = 2
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(resource: Any, accept: str | None = None) -> tuple[str, str]:
    """GET the resource as Prometheus would: (content type, body)."""
    stub = StubTreq(resource)
    headers = {"Accept": accept} if accept else {}
    response = SynchronousTestCase().successResultOf(
        stub.get("http://127.0.0.1/admin/metrics", headers=headers))
    body = SynchronousTestCase().successResultOf(stub.content(response))
    assert response.code == 200, response.code
    return response.headers.getRawHeaders("content-type")[0], body.decode()


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """Family name -> type, and every sample by (name, labels), with the official parser."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of *name* over every sample whose labels include *labels*."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


class ExpositionTests(SynchronousTestCase):
    def test_the_resource_serves_every_family_in_the_prometheus_text_format(self) -> None:
        gw = MemoryGateway(test=self)
        content_type, text = scrape(gw.parts.metrics.resource())
        self.assertTrue(content_type.startswith("text/plain; version=0.0.4"), content_type)
        types, _ = parse(text)
        for name, kind in FAMILIES.items():
            self.assertEqual(types.get(name), kind, name)
        # The process's own numbers come along (resident memory, CPU, open files).
        self.assertIn("process_resident_memory_bytes", types)

    def test_openmetrics_is_served_to_a_scraper_that_asks_for_it(self) -> None:
        gw = MemoryGateway(test=self)
        content_type, text = scrape(gw.parts.metrics.resource(),
                                    "application/openmetrics-text; version=1.0.0")
        self.assertTrue(content_type.startswith("application/openmetrics-text"), content_type)
        names = {f.name for f in openmetrics_families(text)}
        self.assertLessEqual(set(FAMILIES), names)

    def test_state_is_read_at_the_scrape_and_the_text_is_made_by_the_formatter(self) -> None:
        gw = MemoryGateway(test=self)
        token = gw.token()
        held: list[tuple[Any, Deferred[bytes]]] = []

        def formatter(make: Any) -> Deferred[bytes]:
            held.append((make, Deferred()))
            return held[-1][1]

        gw.parts.metrics.formatter = formatter
        stub = StubTreq(gw.parts.metrics.resource())
        answer = stub.get("http://127.0.0.1/admin/metrics")
        self.assertNoResult(answer)
        self.assertEqual(len(held), 1)
        # A WebSocket opened after the scrape began is not in it: the gateway's state was
        # read at once, on the reactor; only the text is made later (on a pool thread in
        # production), where nothing but prometheus_client's own locked values is read.
        gw.websocket(headers={"Authorization": f"Bearer {token}"}).recv_all()
        self.assertEqual(len(gw.parts.connections), 1)
        make, d = held[0]
        d.callback(make())
        stub.flush()
        response = self.successResultOf(answer)
        self.assertEqual(response.code, 200)
        _, samples = parse(self.successResultOf(stub.content(response)).decode())
        self.assertEqual(value(samples, "aico_open_connections", transport="websocket"), 0)
        self.assertEqual(value(samples, "aico_requests_total", method="POST",
                               route="/api/v1/users/authenticate", status="200",
                               transport="http"), 1)

    def test_each_gateway_has_a_registry_of_its_own_never_the_global_one(self) -> None:
        one, two = MemoryGateway(test=self), MemoryGateway(test=self)
        self.assertIsNot(one.parts.metrics.registry, prometheus_client.REGISTRY)
        self.assertIsNone(prometheus_client.REGISTRY.get_sample_value(
            "aico_requests_total", {"method": "GET", "route": "/api/v1/health",
                                    "status": "200", "transport": "http"}))
        for _ in range(3):
            self.assertEqual(one.get("/api/v1/health").code, 200)
        _, a = parse(scrape(one.parts.metrics.resource())[1])
        _, b = parse(scrape(two.parts.metrics.resource())[1])
        health = {"method": "GET", "route": "/api/v1/health", "transport": "http"}
        self.assertEqual(total(a, "aico_requests_total", **health), 3)
        self.assertEqual(total(b, "aico_requests_total", **health), 0)


class TrafficTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = MemoryGateway(ECHO_ROLES, test=self)
        self.gw.add_module(Echo)
        self.token = self.gw.token()

    def samples(self) -> Samples:
        return parse(scrape(self.gw.parts.metrics.resource())[1])[1]

    def test_rest_and_websocket_requests_move_the_request_counter_and_latency(self) -> None:
        echo = {"method": "POST", "route": "/api/v1/echo"}
        before = self.samples()
        self.assertEqual(self.gw.post("/api/v1/echo", {"text": "hi"}, token=self.token).code, 200)
        ws = self.gw.websocket(headers={"Authorization": f"Bearer {self.token}"})
        ws.recv_all()
        ws.send({"type": "request", "id": 1, "method": "POST", "path": "/api/v1/echo",
                 "body": {"text": "hi"}})
        self.assertEqual(ws.recv()["status"], 200)
        after = self.samples()
        for transport in ("http", "websocket"):
            self.assertEqual(value(after, "aico_requests_total", status="200",
                                   transport=transport, **echo)
                             - value(before, "aico_requests_total", status="200",
                                     transport=transport, **echo), 1, transport)
            self.assertEqual(value(after, "aico_request_duration_seconds_count",
                                   transport=transport, **echo), 1, transport)
        # The WebSocket's own authentication is a request of the session layer too.
        self.assertEqual(value(after, "aico_requests_total", method="POST",
                               route="/.session/auth", status="200", transport="websocket"), 1)
        # Each echo went to the module over the bus and back.
        self.assertEqual(value(after, "aico_bus_round_trip_seconds_count", topic="echo/say/v1"), 2)

    def test_a_request_is_counted_under_its_route_template_never_its_raw_path(self) -> None:
        self.gw.add_user("alice", "a-long-password-1")
        r = self.gw.request("DELETE", "/api/v1/users/alice", token=self.token)
        self.assertEqual(r.code, 204)
        self.assertEqual(self.gw.get("/api/v1/no/such/thing/7f3a").code, 404)
        text = scrape(self.gw.parts.metrics.resource())[1]
        samples = parse(text)[1]
        self.assertEqual(value(samples, "aico_requests_total", method="DELETE",
                               route="/api/v1/users/{username}", status="204",
                               transport="http"), 1)
        self.assertEqual(value(samples, "aico_requests_total", method="GET",
                               route="(unmatched)", status="404", transport="http"), 1)
        self.assertNotIn("alice", text)
        self.assertNotIn("7f3a", text)

    def test_open_websockets_are_counted_while_open(self) -> None:
        def open_ws() -> float:
            return value(self.samples(), "aico_open_connections", transport="websocket")

        self.assertEqual(open_ws(), 0)
        ws = self.gw.websocket(headers={"Authorization": f"Bearer {self.token}"})
        ws.recv_all()
        self.assertEqual(open_ws(), 1)
        # The upgraded HTTP connection is not counted a second time as http.
        self.assertEqual(value(self.samples(), "aico_open_connections", transport="http"), 0)
        ws.close()
        self.gw.settle()
        self.assertEqual(open_ws(), 0)

    def test_an_open_http_connection_is_counted_until_it_closes(self) -> None:
        channel = self.gw.parts.http_site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4242))
        channel.makeConnection(StringTransport())
        self.assertEqual(value(self.samples(), "aico_open_connections", transport="http"), 1)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(value(self.samples(), "aico_open_connections", transport="http"), 0)

    def test_a_module_going_down_sets_its_health_to_zero(self) -> None:
        self.assertEqual(value(self.samples(), "aico_module_up", module="echo"), 1)
        self.assertEqual(value(self.samples(), "aico_module_up", module="conversation"), 1)
        module = self.gw._extra[0]
        self.gw.settle()
        module.stop()
        self.gw.advance(3 * Echo.heartbeat_interval + 0.1)  # three missed heartbeats
        self.assertEqual(self.gw.post("/api/v1/echo", {"text": "hi"}, token=self.token).code, 503)
        samples = self.samples()
        self.assertEqual(samples[("aico_module_up", frozenset({("module", "echo")}))], 0)
        self.assertEqual(value(samples, "aico_module_up", module="conversation"), 1)


class RateLimitMetricsTests(SynchronousTestCase):
    def test_a_refused_request_and_a_block_move_the_rate_limit_families(self) -> None:
        gw = MemoryGateway(TIGHT_STANDARD, test=self)
        token = gw.token()
        samples = parse(scrape(gw.parts.metrics.resource())[1])[1]
        audit_before = value(samples, "aico_audit_chain_length")
        codes = [gw.get("/api/v1/users/me", token=token) for _ in range(4)]
        self.assertEqual([r.code for r in codes], [200, 200, 429, 429])
        self.assertEqual(codes[3].json()["code"], "temporarily_blocked")
        gw.settle()
        samples = parse(scrape(gw.parts.metrics.resource())[1])[1]
        standard = {"tier": "standard"}
        self.assertEqual(value(samples, "aico_ratelimit_decisions_total", outcome="allowed",
                               **standard), 2)
        self.assertEqual(value(samples, "aico_ratelimit_decisions_total", outcome="refused",
                               **standard), 2)
        self.assertEqual(value(samples, "aico_ratelimit_blocks_total", **standard), 1)
        self.assertEqual(value(samples, "aico_requests_total", method="GET",
                               route="/api/v1/users/me", status="429", transport="http"), 2)
        # The block was audited: the chain grew by one entry.
        self.assertEqual(value(samples, "aico_audit_chain_length"), audit_before + 1)


class UnitTests(SynchronousTestCase):
    """The measurements themselves, on a clock that moves."""

    def test_latency_is_measured_from_the_requests_arrival(self) -> None:
        clock = MemoryReactorClock()
        clock.advance(1000)
        metrics = GatewayMetrics(clock, process=False)
        route = RouteEntry("GET", "/x/{id}", lambda r: None, public=True)  # type: ignore[arg-type,return-value]
        request = Request("GET", "/x/1", "r1", "http", route=route, started=clock.seconds())
        clock.advance(0.03)
        metrics.observe_request(request, 200, 0)
        metrics.observe_request(request, 200, 0)  # the cached children are used again
        r = metrics.registry
        labels = {"method": "GET", "route": "/x/{id}", "transport": "http"}
        self.assertEqual(r.get_sample_value("aico_request_duration_seconds_bucket",
                                            {**labels, "le": "0.025"}), 0)
        self.assertEqual(r.get_sample_value("aico_request_duration_seconds_bucket",
                                            {**labels, "le": "0.05"}), 2)
        self.assertAlmostEqual(r.get_sample_value("aico_request_duration_seconds_sum", labels)
                               or 0, 0.06)
        self.assertEqual(r.get_sample_value("aico_requests_total", {**labels, "status": "200"}),
                         2)

    def test_the_bus_round_trip_is_timed_from_send_to_reply(self) -> None:
        clock = MemoryReactorClock()
        replies: list[Deferred[AicoMessage]] = []

        class Bus:
            def request(self, topic: str, message: AicoMessage, **kw: Any) -> Deferred[AicoMessage]:
                replies.append(Deferred())
                return replies[-1]

        metrics = GatewayMetrics(clock, process=False)
        forwarder = BusForwarder(Bus(), lambda topic: True, lambda: 5.0, clock)  # type: ignore[arg-type]
        forwarder.on_round_trip = metrics.observe_round_trip
        answered = forwarder.forward(Request("GET", "/x", "r1", "http"), "x/get/v1")
        clock.advance(0.004)
        replies[0].callback(wrap(ApiResponse(status=200, body=b"{}"), source="x"))
        self.assertEqual(self.successResultOf(answered).status, 200)
        sum_ = metrics.registry.get_sample_value("aico_bus_round_trip_seconds_sum",
                                                 {"topic": "x/get/v1"})
        self.assertAlmostEqual(sum_ or 0, 0.004)

    def test_the_audit_chain_length_is_read_at_start_then_follows_appends(self) -> None:
        class Entry:
            seq = 41

        class Audit:
            head: tuple[int, str] | None = None

            def latest(self, limit: int = 100) -> Deferred[Any]:
                return succeed([Entry()])

        audit = Audit()
        metrics = GatewayMetrics(MemoryReactorClock(), StateCollector(audit=audit),
                                 process=False)
        self.successResultOf(metrics.start())
        self.assertEqual(metrics.registry.get_sample_value("aico_audit_chain_length"), 41)
        audit.head = (42, "h")
        self.assertEqual(metrics.registry.get_sample_value("aico_audit_chain_length"), 42)
