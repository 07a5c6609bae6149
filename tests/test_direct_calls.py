"""A module in the gateway's process answers by a direct call (docs/performance.md).

A module started on the bus client it shares with the gateway offers its route topics
(``BusCore.serve_directly``); the gateway's forwarder then calls it with the
``ApiRequest`` and takes the ``ApiResponse`` back, with no envelope and no bus message.
These tests show that the answers are the ones the bus path gives, that nothing travels
on the bus, that the offer follows the module's life, and that the timeout still holds.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase

from aico.bus.errors import BusTimeout
from aico.bus.module import BackendModule, ProblemError, RequestContext, Response, route
from aico.bus.testing import MemoryBus
from aico.gateway.errors import BackendError
from aico.gateway.routing.backend import BusForwarder, to_api_request
from aico.gateway.routing.messages import Principal, Request
from aico.proto import ApiRequest, ApiResponse, unpack
from tests.test_bus_module import api_request


class Echo(BackendModule):
    name = "echo"
    version = "1.0.0"
    heartbeat_interval = 0
    health_topic = "echo/health/v1"

    @route("POST", "/api/v1/echo", topic="echo/say/v1")
    async def say(self, request: ApiRequest, ctx: RequestContext) -> Response:
        return Response(200, {"echo": ctx.json()["text"], "who": request.principal.subject,
                              "id": ctx.message.metadata.attributes["request_id"]})

    @route("GET", "/api/v1/echo/later", topic="echo/later/v1")
    async def later(self, request: ApiRequest, ctx: RequestContext) -> Response:
        await deferLater(self.clock, 2.0, lambda: None)
        return Response(201, {"later": True})

    @route("GET", "/api/v1/echo/never", topic="echo/never/v1")
    def never(self, request: ApiRequest, ctx: RequestContext) -> Deferred[Response]:
        return Deferred()

    @route("GET", "/api/v1/echo/boom", topic="echo/boom/v1")
    def boom(self, request: ApiRequest, ctx: RequestContext) -> Response:
        raise RuntimeError("secret internals /etc/passwd")

    @route("GET", "/api/v1/echo/forbidden", topic="echo/forbidden/v1")
    async def forbidden(self, request: ApiRequest, ctx: RequestContext) -> Response:
        raise ProblemError(403, "forbidden", "Not for you.")

    @route("GET", "/api/v1/echo/crash", topic="echo/crash/v1")
    async def crash(self, request: ApiRequest, ctx: RequestContext) -> Response:
        return Response(503, {"down": True})


def parts(response: ApiResponse) -> tuple[int, Any]:
    return response.status, json.loads(response.body) if response.body else None


class _EchoOnGatewayBus(SynchronousTestCase):
    """An Echo module started on the bus client the gateway's forwarder uses."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = MemoryBus(self.clock, "gateway")
        self.successResultOf(self.bus.start())
        self.module = Echo(self.bus, self.clock)
        self.successResultOf(self.module.start())
        self.addCleanup(self.module.stop)


class ModuleDirectCallTests(_EchoOnGatewayBus):
    """``BackendModule.call_direct`` and the offer on a shared bus."""

    def call(self, topic: str, method: str, path: str, body: Any = None) -> ApiResponse | Deferred[ApiResponse]:
        request = unpack(api_request(method, path, body), ApiRequest)
        responder = self.bus.direct(topic)
        assert responder is not None
        return responder(request)

    def test_a_running_module_offers_each_route_topic_and_withdraws_them_when_stopped(self) -> None:
        for topic in ("echo/say/v1", "echo/later/v1", "echo/boom/v1"):
            self.assertIsNotNone(self.bus.direct(topic))
        # Health is asked by the gateway's fan-out, over the bus.
        self.assertIsNone(self.bus.direct("echo/health/v1"))
        self.successResultOf(self.module.stop())
        self.assertIsNone(self.bus.direct("echo/say/v1"))

    def test_a_handler_that_never_awaits_is_answered_by_the_call_itself_without_a_bus_message(self) -> None:
        sent_before = len(self.bus.published)
        answer = self.call("echo/say/v1", "POST", "/api/v1/echo", {"text": "hi"})
        assert isinstance(answer, ApiResponse)
        status, body = parts(answer)
        self.assertEqual((status, body["echo"]), (200, "hi"))
        self.assertEqual(len(self.bus.published), sent_before)
        self.assertEqual(self.bus.pending, 0)

    def test_the_envelope_a_handler_reads_is_made_on_demand_with_the_request_id(self) -> None:
        request = ApiRequest(request_id="r-42", method="POST", path="/api/v1/echo",
                             body=b'{"text": "x"}')
        answer = self.bus.direct("echo/say/v1")(request)  # type: ignore[misc]
        assert isinstance(answer, ApiResponse)
        self.assertEqual(parts(answer)[1]["id"], "r-42")
        self.assertEqual(answer.request_id, "r-42")

    def test_a_handler_that_awaits_is_answered_by_a_deferred_on_the_modules_clock(self) -> None:
        answer = self.call("echo/later/v1", "GET", "/api/v1/echo/later")
        assert isinstance(answer, Deferred)
        self.assertNoResult(answer)
        self.clock.advance(2.0)
        self.assertEqual(parts(self.successResultOf(answer)), (201, {"later": True}))

    def test_errors_are_the_answers_the_bus_path_gives(self) -> None:
        cases = [("echo/boom/v1", "GET", "/api/v1/echo/boom"),
                 ("echo/forbidden/v1", "GET", "/api/v1/echo/forbidden"),
                 ("echo/say/v1", "GET", "/api/v1/echo"),  # wrong method: 405
                 ("echo/say/v1", "POST", "/api/v1/echo")]  # no body: a handler error
        for topic, method, path in cases:
            direct = self.call(topic, method, path)
            assert isinstance(direct, ApiResponse)
            over_bus = unpack(self.successResultOf(
                self.bus.request(topic, api_request(method, path))), ApiResponse)
            d_status, d_body = parts(direct)
            b_status, b_body = parts(over_bus)
            self.assertEqual((d_status, d_body["code"], d_body["title"]),
                             (b_status, b_body["code"], b_body["title"]), path)
            self.assertNotIn("passwd", direct.body.decode())
        self.assertEqual([parts(self.call(t, m, p))[0] for t, m, p in cases],  # type: ignore[arg-type]
                         [500, 403, 405, 500])
        # Both paths log the handler's failure with its traceback (the answer hides it).
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError, TypeError)), 6)

    def test_an_answer_after_the_caller_gave_up_is_dropped(self) -> None:
        answer = self.call("echo/later/v1", "GET", "/api/v1/echo/later")
        assert isinstance(answer, Deferred)
        answer.cancel()
        self.failureResultOf(answer)
        self.clock.advance(2.0)  # the handler finishes; nothing raises


class ForwarderDirectTests(_EchoOnGatewayBus):
    """The gateway's forwarder calls a module sharing its bus, and only such a module."""

    def setUp(self) -> None:
        super().setUp()
        self.trips: list[tuple[str, float]] = []
        self.forwarder = BusForwarder(self.bus, lambda topic: True, lambda: 5.0, self.clock)
        self.forwarder.on_round_trip = lambda topic, s: self.trips.append((topic, s))

    def request(self, method: str, path: str, body: bytes = b"", **kw: Any) -> Request:
        return Request(method=method, path=path, request_id="rq-1", transport="rest",
                       body=body, principal=Principal(subject="ann", roles=("user",)), **kw)

    def requests_on_the_bus(self) -> list[str]:
        return [t for t, _ in self.bus.published if t.startswith("echo/")]

    def test_a_request_is_answered_in_the_call_with_no_message_on_the_bus(self) -> None:
        out = self.forwarder.forward(self.request("POST", "/api/v1/echo", b'{"text":"hi"}'),
                                     "echo/say/v1")
        assert not isinstance(out, Deferred)
        self.assertEqual((out.status, json.loads(out.body)["who"]), (200, "ann"))
        self.assertEqual(self.requests_on_the_bus(), [])
        self.assertEqual([t for t, _ in self.trips], ["echo/say/v1"])

    def test_the_module_receives_what_the_bus_would_carry(self) -> None:
        seen: list[ApiRequest] = []
        responder = self.bus.direct("echo/say/v1")
        assert responder is not None
        self.bus.serve_directly("echo/say/v1", lambda r: (seen.append(r), responder(r))[1])
        request = self.request("POST", "/api/v1/echo", b'{"text":"hi"}',
                               headers={"authorization": "Bearer secret", "x-trace": "1"})
        self.forwarder.forward(request, "echo/say/v1")
        self.assertEqual(seen, [to_api_request(request)])
        self.assertNotIn("authorization", seen[0].headers)

    def test_a_module_that_does_not_answer_in_time_is_a_bus_timeout(self) -> None:
        out = self.forwarder.forward(self.request("GET", "/api/v1/echo/never"), "echo/never/v1")
        assert isinstance(out, Deferred)
        self.clock.advance(4.9)
        self.assertNoResult(out)
        self.clock.advance(0.2)
        self.failureResultOf(out, BusTimeout)

    def test_a_late_answer_within_the_timeout_is_the_response(self) -> None:
        out = self.forwarder.forward(self.request("GET", "/api/v1/echo/later"), "echo/later/v1")
        assert isinstance(out, Deferred)
        self.clock.advance(2.0)
        self.assertEqual(self.successResultOf(out).status, 201)
        self.assertEqual(self.trips, [("echo/later/v1", 2.0)])

    def test_a_module_answering_5xx_is_a_backend_error_as_over_the_bus(self) -> None:
        with self.assertRaises(BackendError):
            self.forwarder.forward(self.request("GET", "/api/v1/echo/crash"), "echo/crash/v1")

    def test_a_streamed_request_still_goes_over_the_bus(self) -> None:
        d = self.forwarder.forward(self.request("POST", "/api/v1/echo", b'{"text":"hi"}',
                                                accepts_stream=True), "echo/say/v1")
        self.clock.advance(0)
        self.assertIsInstance(d, Deferred)
        self.assertEqual(self.requests_on_the_bus(), ["echo/say/v1"])
        self.assertEqual(self.successResultOf(d).status, 200)  # type: ignore[arg-type]

    def test_a_module_on_another_bus_client_is_reached_over_the_bus(self) -> None:
        other = MemoryBus(self.clock, "gateway-2")
        self.successResultOf(other.start())
        forwarder = BusForwarder(other, lambda topic: True, lambda: 5.0, self.clock)
        self.assertIsNone(other.direct("echo/say/v1"))
        d = forwarder.forward(self.request("POST", "/api/v1/echo", b'{"text":"hi"}'), "echo/say/v1")
        self.assertIsInstance(d, Deferred)
        self.assertIn("echo/say/v1", [t for t, _ in other.published])
