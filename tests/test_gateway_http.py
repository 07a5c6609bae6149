"""End to end on the in-memory gateway: REST adapter, router, bus and modules.

The production composition on a memory reactor and bus (``aico.gateway.testing.memory``);
time moves only when a test advances it. Backend modules are SDK modules on the memory bus
(``tests/memmodules.py``); the plain-pyzmq module that proves the language-independent
wire contract runs against a real gateway in ``tests/test_http_real.py``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, cast

import treq
from openapi_spec_validator import validate as validate_openapi
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from aico.bus.module import RouteSpec
from aico.gateway.testing.memory import MemoryGateway, MemoryResponse
from tests.memmodules import RawLike, raw_module, send

RAW_SCHEMA = json.dumps({
    "type": "object",
    "properties": {"n": {"type": "integer"}, "text": {"type": "string"}},
    "required": ["n"],
})


def check_raw_echo(test: TestCase, status: int, body: Any) -> None:
    """What a raw module echoes for ``POST /api/v1/raw/items/a%20b {"n": 3, "text": "é"}``
    with ``X-Request-ID: req-1`` from admin over HTTP (the memory and the real layer)."""
    test.assertEqual(status, 200)
    test.assertEqual(body["params"], {"item": "a b"})
    test.assertEqual(body["body"], {"n": 3, "text": "é"})
    test.assertEqual(body["request_id"], "req-1")
    test.assertEqual(body["transport"], "http")
    test.assertEqual(body["subject"], "admin")


async def get_json(http: Any, url: str, **kw: Any) -> tuple[int, Any, Any]:
    r = await http.get(url, **kw)
    return r.code, json.loads(await r.content()), r.headers


async def check_health_ok(test: TestCase, http: Any, base: str) -> None:
    """``GET /api/v1/health``: both built-in modules ok, with a latency; the gateway's own
    headers (a request ID, ``Server: aico-gateway``). Shared by the memory and real layers."""
    status, body, headers = await get_json(http, base + "/api/v1/health")
    test.assertEqual(status, 200)
    test.assertEqual(body["status"], "ok")
    test.assertEqual(sorted(body["modules"]), ["conversation", "health"])
    for module in body["modules"].values():
        test.assertEqual(module["status"], "ok")
        test.assertIsInstance(module["latency_ms"], float)
    test.assertTrue(headers.getRawHeaders("x-request-id"))
    test.assertEqual(headers.getRawHeaders("server"), ["aico-gateway"])


async def post_json(http: Any, url: str, body: Any, **kw: Any) -> tuple[int, Any, Any]:
    r = await http.post(url, json=body, **kw)
    return r.code, json.loads(await r.content()), r.headers


class GatewayCase(TestCase):
    extra = ""

    def setUp(self) -> None:
        self.gw = MemoryGateway(self.extra, test=self)
        self.base = ""
        self.token = self.gw.token()
        self.http = self.gw.client(token=self.token)

    def raw_module(self, routes: list[RouteSpec], **kw: Any) -> RawLike:
        module = cast(RawLike, self.gw.add_module(raw_module(routes, **kw)))
        self.addCleanup(module.stop)
        return module

    async def served(self, method: str, path: str, body: Any = None, advance: float = 0.0) -> bool:
        r = await self.http.request(method, self.base + path, json=body, advance=advance)
        await r.content()
        return r.code not in (404, 503)

    async def within(self, seconds: float, check: Callable[[], Awaitable[bool]]) -> None:
        """*check* holds within *seconds* on the gateway's clock (looked at every 50 ms)."""
        deadline = self.gw.clock.seconds() + seconds
        while not await check():
            if self.gw.clock.seconds() >= deadline:
                self.fail(f"condition not met within {seconds} s")
            self.gw.advance(0.05)


class HealthTests(GatewayCase):
    async def test_health_lists_every_builtin_module(self) -> None:
        await check_health_ok(self, self.http, self.base)

    async def test_silent_module_reported_as_timeout_within_two_seconds(self) -> None:
        module = self.raw_module([RouteSpec("GET", "/api/v1/raw", "raw/x", public=True)],
                                 health_topic="raw/health")
        await self.within(1.0, lambda: _has_module(self.http, self.base, "raw"))
        _, body, _ = await get_json(self.http, self.base + "/api/v1/health")
        self.assertEqual(body["modules"]["raw"]["status"], "ok")
        module.mode = "silent"
        self.gw.advance(1.1)  # past the cached health answer (at most 1 s old)
        start = self.gw.clock.seconds()
        status, body, _ = await get_json(self.http, self.base + "/api/v1/health", advance=5)
        self.assertLess(self.gw.clock.seconds() - start, 2.0)
        self.assertEqual((status, body["status"]), (200, "degraded"))
        self.assertEqual(body["modules"]["raw"]["status"], "timeout")
        self.assertEqual(body["partial"], ["raw"])
        self.assertEqual(body["modules"]["conversation"]["status"], "ok")


async def _has_module(http: Any, base: str, name: str) -> bool:
    _, body, _ = await get_json(http, base + "/api/v1/health")
    return name in body["modules"]


class ErrorTests(GatewayCase):
    def _problem(self, body: Any, status: int, code: str) -> None:
        self.assertEqual(body["status"], status)
        self.assertEqual(body["code"], code)
        for key in ("type", "title", "detail", "request_id"):
            self.assertIn(key, body)

    async def test_unknown_path_is_404_problem(self) -> None:
        r = await self.http.get(self.base + "/api/v1/nope")
        self.assertEqual(r.code, 404)
        self.assertEqual(r.headers.getRawHeaders("content-type"), ["application/problem+json"])
        self._problem(json.loads(await r.content()), 404, "not_found")

    async def test_wrong_method_is_405_with_allow(self) -> None:
        r = await self.http.delete(self.base + "/api/v1/health")
        self.assertEqual(r.code, 405)
        self.assertEqual(r.headers.getRawHeaders("allow"), ["GET, HEAD"])
        self._problem(json.loads(await r.content()), 405, "method_not_allowed")
        r = await self.http.head(self.base + "/api/v1/health")
        self.assertEqual(r.code, 200)
        self.assertEqual(await r.content(), b"")

    async def test_paths_werkzeug_cannot_match_still_get_problem_json(self) -> None:
        r = await self.http.get(self.base + "/api/v1/a%0Ab%0B")
        self.assertEqual(r.code, 404)
        self.assertEqual(r.headers.getRawHeaders("content-type"), ["application/problem+json"])
        self._problem(json.loads(await r.content()), 404, "not_found")

    async def test_a_body_on_any_method_is_checked(self) -> None:
        r = await self.http.delete(self.base + "/api/v1/users/nobody", data=b"\x01\x02not json\xff",
                                   headers={"Content-Type": "text/plain"})
        self._problem(json.loads(await r.content()), 415, "unsupported_media_type")
        r = await self.http.request("GET", self.base + "/api/v1/health", data=b"{nope",
                                    headers={"Content-Type": "application/json"})
        self._problem(json.loads(await r.content()), 400, "malformed_json")

    async def test_stream_parameter_is_true_or_false(self) -> None:
        status, body, _ = await post_json(self.http, self.base + "/api/v1/conversations/messages?stream=maybe",
                                          {"message": "hi"})
        self.assertEqual((status, body["code"], body["errors"][0]["parameter"]),
                         (400, "validation_failed", "stream"))

    async def test_request_id_kept_when_well_formed_and_replaced_otherwise(self) -> None:
        _, body, headers = await get_json(self.http, self.base + "/api/v1/nope", headers={"X-Request-ID": "abc.123"})
        self.assertEqual(headers.getRawHeaders("x-request-id"), ["abc.123"])
        self.assertEqual(body["request_id"], "abc.123")
        _, body, headers = await get_json(self.http, self.base + "/api/v1/nope", headers={"X-Request-ID": "bad id!"})
        self.assertNotEqual(headers.getRawHeaders("x-request-id"), ["bad id!"])
        self.assertEqual(body["request_id"], headers.getRawHeaders("x-request-id")[0])

    async def test_malformed_json_is_400(self) -> None:
        r = await self.http.post(self.base + "/api/v1/conversations/messages", data=b"{nope",
                            headers={"Content-Type": "application/json"})
        self.assertEqual(r.code, 400)
        self._problem(json.loads(await r.content()), 400, "malformed_json")

    async def test_schema_violation_lists_pointers(self) -> None:
        status, body, _ = await post_json(self.http, self.base + "/api/v1/conversations/messages",
                                          {"message": 5, "extra": True})
        self.assertEqual(status, 400)
        self._problem(body, 400, "validation_failed")
        pointers = sorted(e["pointer"] for e in body["errors"])
        self.assertEqual(pointers, ["/extra", "/message"])

    async def test_wrong_content_type_is_415(self) -> None:
        r = await self.http.post(self.base + "/api/v1/conversations/messages", data=b"message=hi",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual(r.code, 415)
        self._problem(json.loads(await r.content()), 415, "unsupported_media_type")

    async def test_body_over_limit_is_413(self) -> None:
        big = json.dumps({"message": "x" * (1024 * 1024 + 10)}).encode()
        r = await self.http.post(self.base + "/api/v1/conversations/messages", data=big,
                            headers={"Content-Type": "application/json"})
        self.assertEqual(r.code, 413)
        self._problem(json.loads(await r.content()), 413, "payload_too_large")


class ConversationTests(GatewayCase):
    async def test_message_is_answered_by_the_conversation_module(self) -> None:
        status, body, _ = await post_json(self.http, self.base + "/api/v1/conversations/messages",
                                          {"message": "hello there", "conversation_id": "c1"})
        self.assertEqual(status, 200)
        self.assertEqual((body["reply"], body["conversation_id"]), ("hello there", "c1"))

    async def test_streamed_message_is_ndjson(self) -> None:
        r = await self.http.post(self.base + "/api/v1/conversations/messages?stream=true",
                                 json={"message": "one two three"}, advance=2)
        self.assertEqual(r.code, 200)
        self.assertEqual(r.headers.getRawHeaders("content-type"), ["application/x-ndjson"])
        lines = [json.loads(line) for line in (await r.content()).splitlines() if line]
        self.assertEqual("".join(line.get("delta", "") for line in lines), "one two three")
        self.assertTrue(lines[-1]["done"])


class SchemaCoverageTests(GatewayCase):
    async def test_every_gateway_route_has_schemas_for_its_bodies(self) -> None:
        for entry in self.gw.parts.own_routes:  # type: ignore[union-attr]
            where = f"{entry.method} {entry.path}"
            if entry.method in ("POST", "PUT", "PATCH"):
                self.assertIsNotNone(entry.request_schema, where)
            if entry.success_status != 204:
                self.assertIsNotNone(entry.response_schema, where)


class NoModuleTests(GatewayCase):
    extra = "[modules]\nbuiltin = []\n"

    async def test_route_without_module_is_503(self) -> None:
        status, body, _ = await post_json(self.http, self.base + "/api/v1/conversations/messages", {"message": "hi"})
        self.assertEqual((status, body["code"]), (503, "backend_unavailable"))

    async def test_health_without_modules_is_down_503(self) -> None:
        status, body, _ = await get_json(self.http, self.base + "/api/v1/health")
        self.assertEqual((status, body["status"]), (503, "down"))


class ModuleRouteTests(GatewayCase):
    """A module on the memory bus (the SDK); the wire contract of a module written with
    plain pyzmq is proved over real sockets in ``tests/test_http_real.py``."""

    extra = "[bus]\nrequest_timeout = 3.0\n"

    def routes(self) -> list[RouteSpec]:
        return [
            RouteSpec("POST", "/api/v1/raw/items/{item}", "raw/items",
                      capability="raw:write", request_schema=json.loads(RAW_SCHEMA)),
            RouteSpec("GET", "/api/v1/raw/stream", "raw/stream", public=True),
        ]

    async def registered(self, module: RawLike) -> None:
        await self.within(1.0, lambda: self.served("POST", "/api/v1/raw/items/x", {"n": 1}))

    async def test_registered_route_is_served_within_a_second(self) -> None:
        self.assertFalse(await self.served("POST", "/api/v1/raw/items/x", {"n": 1}))
        module = self.raw_module(self.routes())
        await self.registered(module)
        status, body, _ = await post_json(self.http, self.base + "/api/v1/raw/items/a%20b", {"n": 3, "text": "é"},
                                          headers={"X-Request-ID": "req-1"})
        check_raw_echo(self, status, body)

    async def test_module_schema_is_enforced_with_unknown_fields_rejected(self) -> None:
        module = self.raw_module(self.routes())
        await self.registered(module)
        before = module.received
        status, body, _ = await post_json(self.http, self.base + "/api/v1/raw/items/x", {"n": "no", "zzz": 1})
        self.assertEqual(status, 400)
        self.assertEqual(sorted(e["pointer"] for e in body["errors"]), ["/n", "/zzz"])
        self.assertEqual(module.received, before)

    async def test_hundred_concurrent_requests_answered_shuffled_each_gets_its_own(self) -> None:
        module = self.raw_module(self.routes())
        await self.registered(module)
        module.mode = "batch:100"

        async def one(i: int) -> None:
            response: MemoryResponse = await send(self.gw, "POST", f"/api/v1/raw/items/{i}",
                                                  token=self.token, json_body={"n": i})
            status, body = response.code, response.json()
            self.assertEqual(status, 200)
            self.assertEqual((body["params"]["item"], body["body"]["n"]), (str(i), i))

        # All hundred are in flight before the module answers any (it holds them).
        done = gatherResults([Deferred.fromCoroutine(one(i)) for i in range(100)])
        self.gw.settle()
        self.successResultOf(done)
        self.assertEqual(sorted(module.answered, key=int), [str(i) for i in range(100)])
        self.assertNotEqual(module.answered, [str(i) for i in range(100)])  # out of order

    async def test_first_chunk_reaches_client_before_module_produces_last(self) -> None:
        module = self.raw_module(self.routes())
        await self.registered(module)
        module.mode = "stream"
        d = send(self.gw, "GET", "/api/v1/raw/stream?stream=true", token=self.token, unbuffered=True)
        self.gw.settle()
        r = self.successResultOf(d)
        self.assertEqual(r.code, 200)
        lines: list[bytes] = []
        done = treq.collect(r, lines.append)
        self.gw.settle()
        self.assertTrue(lines)
        self.assertIn(b'"chunk":0', b"".join(lines))
        self.assertNotIn(b'"chunk":2', b"".join(lines))  # the module has not produced it yet
        self.assertEqual(module.events, ["chunk0"])
        self.assertNoResult(done)
        module.release.put(None)
        module.release.put(None)
        self.gw.settle()
        self.successResultOf(done)
        got = [json.loads(x) for x in b"".join(lines).splitlines() if x]
        self.assertEqual(got, [{"chunk": 0}, {"chunk": 1}, {"chunk": 2}])

    async def test_silent_module_is_504(self) -> None:
        module = self.raw_module(self.routes())
        await self.registered(module)
        module.mode = "silent"
        self.gw.advance(1.1)  # past the cached health answer (at most 1 s old)
        start = self.gw.clock.seconds()
        status, body, _ = await post_json(self.http, self.base + "/api/v1/raw/items/x", {"n": 1}, advance=10)
        self.assertEqual((status, body["code"]), (504, "backend_timeout"))
        elapsed = self.gw.clock.seconds() - start
        self.assertTrue(3.0 <= elapsed < 3.1, elapsed)  # the configured request_timeout

    async def test_module_5xx_is_502(self) -> None:
        module = self.raw_module(self.routes())
        await self.registered(module)
        module.mode = "crash"
        status, body, _ = await post_json(self.http, self.base + "/api/v1/raw/items/x", {"n": 1})
        self.assertEqual((status, body["code"]), (502, "backend_error"))

    async def test_heartbeats_stop_then_503_until_it_registers_again(self) -> None:
        module = self.raw_module(self.routes(), heartbeat_interval=0.1)
        await self.registered(module)
        module.beating = False

        async def unavailable() -> bool:
            status, body, _ = await post_json(self.http, self.base + "/api/v1/raw/items/x", {"n": 1})
            return status == 503 and body["code"] == "backend_unavailable"

        await self.within(3, unavailable)
        module.beating = True
        module.register()
        await self.registered(module)

    async def test_openapi_valid_before_and_after_a_module_registers(self) -> None:
        status, before, _ = await get_json(self.http, self.base + "/openapi.json")
        self.assertEqual(status, 200)
        validate_openapi(before)
        self.assertNotIn("/api/v1/raw/items/{item}", before["paths"])
        self.assertIn("/api/v1/conversations/messages", before["paths"])
        module = self.raw_module(self.routes())
        await self.registered(module)
        _, after, _ = await get_json(self.http, self.base + "/openapi.json")
        validate_openapi(after)
        op = after["paths"]["/api/v1/raw/items/{item}"]["post"]
        self.assertEqual(op["requestBody"]["content"]["application/json"]["schema"]["required"], ["n"])
        self.assertEqual(op["parameters"][0]["name"], "item")


class FanOutAndInternalErrorTests(GatewayCase):
    extra = "[bus]\nrequest_timeout = 1.0\n"

    async def test_route_naming_several_topics_answers_every_part_marking_the_late_one(self) -> None:
        answering = self.raw_module([RouteSpec("GET", "/api/v1/raw/both", "fan/a,fan/b", public=True)],
                                    name="fan")
        answering.silent_topics.add("fan/b")
        await self.within(1.0, lambda: self.served("GET", "/api/v1/raw/both", advance=5))
        status, body, _ = await get_json(self.http, self.base + "/api/v1/raw/both", advance=5)
        self.assertEqual(status, 200)
        self.assertEqual(body["parts"]["fan/a"]["status"], "ok")
        self.assertEqual(body["parts"]["fan/a"]["body"]["path"], "/api/v1/raw/both")
        self.assertEqual(body["parts"]["fan/b"]["status"], "timeout")
        self.assertEqual(body["partial"], ["fan/b"])
        answering.mode = "silent"
        status, body, _ = await get_json(self.http, self.base + "/api/v1/raw/both", advance=5)
        self.assertEqual((status, body["code"]), (503, "backend_unavailable"))

    async def test_unexpected_exception_is_500_with_request_id_and_no_internals(self) -> None:
        from aico.gateway.routing.table import RouteEntry

        def broken(request: Any) -> Any:
            raise RuntimeError("database password is hunter2")

        gateway = self.gw.parts
        table = gateway.dispatcher.table.with_routes(  # type: ignore[union-attr]
            "test", [RouteEntry("GET", "/api/v1/broken", broken, owner="test", public=True)])
        gateway.dispatcher.set_table(table)  # type: ignore[union-attr]
        r = await self.http.get(self.base + "/api/v1/broken", headers={"X-Request-ID": "boom-1"})
        body = json.loads(await r.content())
        self.assertEqual((r.code, body["code"], body["request_id"]), (500, "internal_error", "boom-1"))
        self.assertNotIn("hunter2", json.dumps(body))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
