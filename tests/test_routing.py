"""The route table, the dispatcher's error conversion, and the response aggregator."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from aico.bus.errors import BusTimeout
from aico.gateway.errors import Forbidden, MethodNotAllowed, NotFound
from aico.gateway.routing.aggregator import fan_out
from aico.gateway.routing.dispatch import Dispatcher
from aico.gateway.routing.messages import Request, Response, StreamBody, request_id_from
from aico.gateway.routing.table import RouteConflict, RouteEntry, RouteTable


def ok(request: Request) -> Response:
    return Response(body=json.dumps(request.path_params).encode())


def entry(method: str, path: str, handler: Any = ok, **kw: Any) -> RouteEntry:
    kw.setdefault("public", True)
    return RouteEntry(method, path, handler, **kw)


def req(method: str = "GET", path: str = "/") -> Request:
    return Request(method=method, path=path, request_id="r1", transport="test")


def body(d: Deferred[Response]) -> tuple[int, dict[str, Any], dict[str, str]]:
    results: list[Response] = []
    d.addCallback(results.append)
    (r,) = results
    return r.status, json.loads(r.body), r.headers


class TableTests(SynchronousTestCase):
    def test_static_and_template_paths(self) -> None:
        t = RouteTable([entry("GET", "/a/{x}/c"), entry("GET", "/a/b/c")])
        self.assertEqual(t.match("GET", "/a/b/c")[1], {})
        self.assertEqual(t.match("GET", "/a/zz/c")[1], {"x": "zz"})

    def test_params_are_percent_decoded(self) -> None:
        t = RouteTable([entry("GET", "/u/{name}")])
        self.assertEqual(t.match("GET", "/u/a%20b")[1], {"name": "a b"})

    def test_placeholder_matches_one_segment_only(self) -> None:
        t = RouteTable([entry("GET", "/u/{name}")])
        self.assertRaises(NotFound, t.match, "GET", "/u/a/b")

    def test_unknown_path_is_not_found(self) -> None:
        self.assertRaises(NotFound, RouteTable([entry("GET", "/x")]).match, "GET", "/y")

    def test_wrong_method_lists_allowed(self) -> None:
        t = RouteTable([entry("GET", "/x"), entry("DELETE", "/x", capability="c", public=False)])
        e = self.assertRaises(MethodNotAllowed, t.match, "POST", "/x")
        self.assertEqual(e.headers["Allow"], "DELETE, GET, HEAD")

    def test_head_is_served_by_the_get_route(self) -> None:
        t = RouteTable([entry("GET", "/x"), entry("POST", "/y", capability="c", public=False)])
        self.assertEqual(t.match("HEAD", "/x")[0].method, "GET")
        e = self.assertRaises(MethodNotAllowed, t.match, "HEAD", "/y")
        self.assertEqual(e.headers["Allow"], "POST")

    def test_placeholder_names_may_differ_per_method(self) -> None:
        t = RouteTable([entry("GET", "/u/{a}"), entry("PUT", "/u/{b}")])
        self.assertEqual(t.match("PUT", "/u/1")[1], {"b": "1"})

    def test_conflicting_routes_refused(self) -> None:
        self.assertRaises(
            RouteConflict, RouteTable, [entry("GET", "/u/{a}"), entry("GET", "/u/{b}")]
        )

    def test_route_must_be_public_or_name_capability(self) -> None:
        self.assertRaises(ValueError, RouteEntry, "GET", "/x", ok)

    def test_with_routes_replaces_one_owner(self) -> None:
        t = RouteTable([entry("GET", "/g"), entry("GET", "/m1", owner="m")])
        t2 = t.with_routes("m", [entry("GET", "/m2", owner="m")])
        self.assertRaises(NotFound, t2.match, "GET", "/m1")
        t2.match("GET", "/m2")
        t2.match("GET", "/g")
        t.match("GET", "/m1")  # the old snapshot is unchanged


class DispatcherTests(SynchronousTestCase):
    def test_not_found_is_a_problem(self) -> None:
        status, problem, _ = body(Dispatcher(RouteTable()).handle(req(path="/nope")))
        self.assertEqual((status, problem["code"], problem["request_id"]), (404, "not_found", "r1"))
        self.assertEqual(problem["type"], "https://aico.dev/problems/not_found")

    def test_method_not_allowed_has_allow_header(self) -> None:
        d = Dispatcher(RouteTable([entry("GET", "/x")]))
        status, problem, headers = body(d.handle(req("POST", "/x")))
        self.assertEqual(
            (status, problem["code"], headers["Allow"]), (405, "method_not_allowed", "GET, HEAD")
        )

    def test_steps_run_in_order_and_can_refuse(self) -> None:
        seen: list[str] = []

        def a(r: Request) -> None:
            seen.append("a")

        def b(r: Request) -> Deferred[None]:
            seen.append("b")
            return fail(Forbidden("no"))

        status, problem, _ = body(
            Dispatcher(RouteTable([entry("GET", "/x")]), [a, b]).handle(req(path="/x"))
        )
        self.assertEqual((seen, status, problem["code"]), (["a", "b"], 403, "forbidden"))

    def test_async_step_then_handler(self) -> None:
        gate: Deferred[None] = Deferred()
        d = Dispatcher(RouteTable([entry("GET", "/x/{id}")]), [lambda r: gate]).handle(
            req(path="/x/7")
        )
        self.assertNoResult(d)
        gate.callback(None)
        self.assertEqual(body(d)[1], {"id": "7"})

    def test_unexpected_exception_is_internal_error_without_details(self) -> None:
        def boom(r: Request) -> Response:
            raise RuntimeError("secret internals")

        status, problem, _ = body(
            Dispatcher(RouteTable([entry("GET", "/x", boom)])).handle(req(path="/x"))
        )
        self.assertEqual((status, problem["code"]), (500, "internal_error"))
        self.assertNotIn("secret", json.dumps(problem))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_bus_timeout_is_backend_timeout(self) -> None:
        d = Dispatcher(RouteTable([entry("GET", "/x", lambda r: fail(BusTimeout("t", 1.0)))]))
        self.assertEqual(body(d.handle(req(path="/x")))[0], 504)

    def test_coroutine_handlers(self) -> None:
        async def h(r: Request) -> Response:
            return Response(body=b'{"a":1}')

        self.assertEqual(
            body(Dispatcher(RouteTable([entry("GET", "/x", h)])).handle(req(path="/x")))[1],
            {"a": 1},
        )


class HandleNowTests(SynchronousTestCase):
    """handle_now: the answer itself when nothing waited, a Deferred otherwise; the
    observers told once either way, and handle() the same answers as a Deferred."""

    def dispatcher(self, steps: list[Any], handler: Any = ok) -> tuple[Dispatcher, list[int]]:
        told: list[int] = []
        d = Dispatcher(RouteTable([entry("GET", "/x/{id}", handler)]), steps,
                       observers=[lambda r, status, size: told.append(status)])
        return d, told

    def test_a_chain_that_never_waits_answers_without_a_deferred(self) -> None:
        d, told = self.dispatcher([lambda r: None])
        out = d.handle_now(req(path="/x/5"))
        self.assertIsInstance(out, Response)
        assert isinstance(out, Response)
        self.assertEqual((out.status, json.loads(out.body), told), (200, {"id": "5"}, [200]))
        for path, status in (("/nope", 404), ("/x/5", 200)):
            now = d.handle_now(req(path=path))
            assert isinstance(now, Response)
            later = body(d.handle(req(path=path)))
            self.assertEqual((now.status, json.loads(now.body)), (status, later[1]))
            self.assertEqual(later[0], status)

    def test_a_refusal_or_an_exception_answers_at_once_too(self) -> None:
        def refuse(r: Request) -> None:
            raise Forbidden("no")

        d, told = self.dispatcher([refuse])
        out = d.handle_now(req(path="/x/1"))
        assert isinstance(out, Response)
        self.assertEqual((out.status, told), (403, [403]))

    def test_a_step_or_handler_that_waits_gives_a_deferred_and_one_observation(self) -> None:
        gate: Deferred[None] = Deferred()
        d, told = self.dispatcher([lambda r: gate])
        out = d.handle_now(req(path="/x/2"))
        self.assertIsInstance(out, Deferred)
        self.assertEqual(told, [])
        gate.callback(None)
        self.assertEqual((body(out)[0], told), (200, [200]))  # type: ignore[arg-type]
        later: Deferred[Response] = Deferred()
        d2, told2 = self.dispatcher([], handler=lambda r: later)
        out2 = d2.handle_now(req(path="/x/3"))
        later.callback(Response(status=201, body=b"{}"))
        self.assertEqual((body(out2)[0], told2), (201, [201]))  # type: ignore[arg-type]


class RequestIdTests(SynchronousTestCase):
    def test_well_formed_id_is_kept(self) -> None:
        self.assertEqual(request_id_from("abc-1.2_3"), "abc-1.2_3")

    def test_bad_ids_are_replaced(self) -> None:
        for bad in ["", "a b", "x" * 65, "é", None]:
            new = request_id_from(bad)
            self.assertNotEqual(new, bad)
            self.assertEqual(len(new), 32)


class StreamBodyTests(SynchronousTestCase):
    def test_chunks_before_subscribe_are_buffered(self) -> None:
        s = StreamBody()
        s.push(b"1")
        got: list[bytes] = []
        d = s.subscribe(got.append)
        s.push(b"2")
        self.assertNoResult(d)
        s.finish()
        self.successResultOf(d)
        self.assertEqual(got, [b"1", b"2"])


class AggregatorTests(SynchronousTestCase):
    def test_all_parts_in_time(self) -> None:
        clock = Clock()
        d = fan_out(clock, {"a": lambda: succeed(1), "b": lambda: succeed(2)}, 1.0)
        parts = self.successResultOf(d)
        self.assertEqual(
            {n: (p.status, p.value) for n, p in parts.items()}, {"a": ("ok", 1), "b": ("ok", 2)}
        )

    def test_late_part_marked_timeout_and_cancelled(self) -> None:
        clock = Clock()
        cancelled: list[bool] = []
        slow: Deferred[int] = Deferred(lambda _: cancelled.append(True))
        d = fan_out(clock, {"fast": lambda: succeed(1), "slow": lambda: slow}, 1.5)
        self.assertNoResult(d)
        clock.advance(1.5)
        parts = self.successResultOf(d)
        self.assertEqual(parts["slow"].status, "timeout")
        self.assertEqual(parts["fast"].status, "ok")
        self.assertEqual(cancelled, [True])  # nothing waits for it any more

    def test_failed_part_marked_error(self) -> None:
        parts = self.successResultOf(fan_out(Clock(), {"x": lambda: fail(ValueError("bad"))}, 1))
        self.assertEqual((parts["x"].status, parts["x"].error), ("error", "bad"))

    def test_no_calls_fires_at_once(self) -> None:
        self.assertEqual(self.successResultOf(fan_out(Clock(), {}, 1)), {})
