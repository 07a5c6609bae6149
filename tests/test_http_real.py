"""The deliberate real layer: a real gateway on 127.0.0.1 sockets, real treq, real ZeroMQ.

Everything else about HTTP runs on the in-memory gateway (``tests/test_gateway_http.py``,
``tests/test_security_http.py``). What stays here is what memory cannot prove:

* a smoke test of the assembled process (state directory, Curve-secured bus, built-in
  modules over ZeroMQ, TCP listener): health, login, a message, a streamed one, a problem;
* the language-independent module wire contract, with a module written in plain pyzmq
  and the generated protobuf classes only (``tests/rawmodule.py``): its registration is
  served, streamed chunks cross the real sockets one by one, a silent module is a 504.

Real gateways take about a second to start: keep this file small.
"""

from __future__ import annotations

import json
import queue
from typing import Any

import treq
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from aico.gateway.testing.harness import RunningGateway, http_client, login, start_gateway
from aico.gateway.testing.waiting import eventually
from aico.proto.aico.gateway.v1.gateway_pb2 import Route
from tests.rawmodule import RawModule
from tests.test_gateway_http import (
    RAW_SCHEMA,
    check_health_ok,
    check_raw_echo,
    post_json,
)


def _next_event(module: RawModule) -> str | None:
    try:
        return module.events.get_nowait()
    except queue.Empty:
        return None


class RealGatewayCase(TestCase):
    timeout = 30
    extra = ""

    async def setUp(self) -> None:
        self.gw: RunningGateway = await start_gateway(self, self.extra)
        self.base = self.gw.base
        self.anon = http_client(self)
        self.tokens = await login(self.anon, self.base, "admin", self.gw.admin_password)
        self.http = http_client(self, token=self.tokens["access_token"])


class SmokeTests(RealGatewayCase):
    async def test_health_login_message_stream_and_problem_over_real_sockets(self) -> None:
        # Health: both built-in modules answer over the Curve-secured ZeroMQ bus.
        await check_health_ok(self, self.anon, self.base)
        # Login (setUp logged in too): a token pair.
        self.assertEqual(self.tokens["token_type"].lower(), "bearer")
        self.assertEqual(len(self.tokens["access_token"].split(".")), 3)
        # A message, answered by the conversation module.
        status, body, _ = await post_json(self.http, self.base + "/api/v1/conversations/messages",
                                          {"message": "hello there", "conversation_id": "c1"})
        self.assertEqual((status, body["reply"], body["conversation_id"]), (200, "hello there", "c1"))
        # A streamed one: NDJSON.
        r = await self.http.post(self.base + "/api/v1/conversations/messages?stream=true",
                                 json={"message": "one two three"})
        self.assertEqual(r.code, 200)
        self.assertEqual(r.headers.getRawHeaders("content-type"), ["application/x-ndjson"])
        lines = [json.loads(line) for line in (await r.content()).splitlines() if line]
        self.assertEqual("".join(line.get("delta", "") for line in lines), "one two three")
        self.assertTrue(lines[-1]["done"])
        # A problem.
        r = await self.http.get(self.base + "/api/v1/nope", headers={"X-Request-ID": "smoke-1"})
        self.assertEqual(r.code, 404)
        self.assertEqual(r.headers.getRawHeaders("content-type"), ["application/problem+json"])
        self.assertEqual(r.headers.getRawHeaders("x-request-id"), ["smoke-1"])
        self.assertEqual(r.headers.getRawHeaders("server"), ["aico-gateway"])
        problem = json.loads(await r.content())
        self.assertEqual((problem["status"], problem["code"], problem["request_id"]),
                         (404, "not_found", "smoke-1"))


class RawModuleWireTests(RealGatewayCase):
    """A module written with plain pyzmq proves the wire contract."""

    extra = "[bus]\nrequest_timeout = 1.5\n"

    def routes(self) -> list[Route]:
        return [
            Route(method="POST", path="/api/v1/raw/items/{item}", topic="raw/items",
                  capability="raw:write", request_schema=RAW_SCHEMA),
            Route(method="GET", path="/api/v1/raw/stream", topic="raw/stream", public=True),
        ]

    def raw_module(self, routes: list[Route], **kw: Any) -> RawModule:
        module = RawModule(self.gw.state_dir, self.gw.bus_pub, self.gw.bus_sub, routes=routes, **kw)
        module.authorize(self.gw.state_dir)
        module.start()
        self.addCleanup(module.stop)
        return module

    async def served(self, method: str, path: str, body: Any = None) -> bool:
        r = await self.http.request(method, self.base + path, json=body)
        await r.content()
        return r.code not in (404, 503)

    async def registered(self, module: RawModule) -> None:
        await eventually(lambda: self.served("POST", "/api/v1/raw/items/x", {"n": 1}))

    async def test_registered_route_is_served_within_a_second(self) -> None:
        module = self.raw_module(self.routes())
        self.assertEqual(await eventually(lambda: _next_event(module)), "registered")
        start = reactor.seconds()
        await self.registered(module)
        self.assertLess(reactor.seconds() - start, 1.0)
        status, body, _ = await post_json(self.http, self.base + "/api/v1/raw/items/a%20b", {"n": 3, "text": "é"},
                                          headers={"X-Request-ID": "req-1"})
        check_raw_echo(self, status, body)

    async def test_first_chunk_reaches_client_before_module_produces_last(self) -> None:
        module = self.raw_module(self.routes())
        await self.registered(module)
        module.mode = "stream"
        r = await self.http.get(self.base + "/api/v1/raw/stream?stream=true", unbuffered=True)
        self.assertEqual(r.code, 200)
        lines: list[bytes] = []
        done = treq.collect(r, lines.append)
        await eventually(lambda: bool(lines))
        self.assertIn(b'"chunk": 0', b"".join(lines))
        self.assertNotIn(b'"chunk": 2', b"".join(lines))  # the module has not produced it yet
        module.release.put(None)
        module.release.put(None)
        await done
        got = [json.loads(x) for x in b"".join(lines).splitlines() if x]
        self.assertEqual(got, [{"chunk": 0}, {"chunk": 1}, {"chunk": 2}])

    async def test_silent_module_is_504(self) -> None:
        module = self.raw_module(self.routes())
        await self.registered(module)
        module.mode = "silent"
        status, body, _ = await post_json(self.http, self.base + "/api/v1/raw/items/x", {"n": 1})
        self.assertEqual((status, body["code"]), (504, "backend_timeout"))
