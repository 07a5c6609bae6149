"""The REST front (issue 12): one ``twisted.web`` resource instead of Klein, the cached
loopback parse, and the cheaper ``normalize`` — each shown to agree with what it replaced."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import random
from typing import Any

from klein import Klein
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest
from werkzeug.exceptions import HTTPException

from aico.gateway.adapters.rest import GatewaySite, LimitedRequest, RestAdapter, is_websocket_path, normalize
from aico.gateway.admin.hosts import host_allowed
from aico.gateway.routing.dispatch import Dispatcher
from aico.gateway.routing.messages import Request, Response, StreamBody, request_id_from
from aico.gateway.routing.table import RouteEntry, RouteTable
from aico.gateway.testing.memory import MemoryGateway
from aico.net import is_loopback

PEER = IPv4Address("TCP", "127.0.0.1", 31337)


class _WebSocketStandIn(Resource):
    """Stands in for Autobahn's resource: says it was reached, and with which path split."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"websocket endpoint: pre=%r post=%r" % (request.prepath, request.postpath)


def _site(routes: list[RouteEntry], *, websocket: Any = None, identify: Any = None,
          guarded: bool = False) -> tuple[GatewaySite, RestAdapter]:
    adapter = RestAdapter(Dispatcher(RouteTable(routes)), "http", websocket=websocket,
                          identify=identify,
                          host_allowed=(lambda h: host_allowed(h, ())) if guarded else None)
    site = GatewaySite(adapter.resource(), lambda: 1 << 20, lambda: (100, 16384),
                       reactor=MemoryReactorClock())
    return site, adapter


def _connect(site: Site) -> tuple[Any, StringTransport]:
    channel = site.buildProtocol(PEER)  # type: ignore[no-untyped-call]
    transport = StringTransport(peerAddress=PEER)
    channel.makeConnection(transport)
    return channel, transport


def _send(site: Site, raw: bytes) -> tuple[bytes, bytes]:
    """One raw request into a fresh connection: (status line and header fields, body)."""
    channel, transport = _connect(site)
    channel.dataReceived(raw)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return head, body


def _get(target: bytes, *extra: bytes, method: bytes = b"GET", host: bytes = b"localhost") -> bytes:
    return (method + b" " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
            + b"".join(e + b"\r\n" for e in extra) + b"\r\n")


def _json_route(method: str, path: str, handler: Any) -> RouteEntry:
    return RouteEntry(method, path, handler, public=True, tier="public", raw_body=True)


# -- which path is /ws: the Klein route's semantics, kept ---------------------------------


class _KleinFront:
    """The routes the REST adapter had in Klein before issue 12, answering only which one
    a request reached."""

    app = Klein()

    @app.route("/ws", branch=False)
    def ws(self, request: IRequest) -> bytes:
        return b"ws"

    @app.route("/", branch=True)
    def everything(self, request: IRequest) -> bytes:
        return b"api"

    @app.handle_errors(HTTPException)
    def unrouted(self, request: IRequest, failure: Failure) -> bytes:
        return b"api"


class _Choice(Resource):
    """The new front's choice for the same request (after Twisted's own path split)."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"ws" if is_websocket_path(request.postpath) else b"api"


#: Request targets around ``/ws``: what Klein (24.8, Werkzeug 3.1) chose for each, pinned.
WS_TARGETS = [b"/ws", b"/ws?x", b"/ws?", b"/ws?stream=true", b"//ws", b"///ws", b"/%77s",
              b"/%77%73", b"/%2fws", b"/%2F%2Fws"]
NOT_WS_TARGETS = [b"/ws/", b"/ws//", b"/ws/.", b"/ws/x", b"/ws%2f", b"/ws%2F", b"/WS", b"/Ws",
                  b"/ws;x", b"/ws#f", b"/./ws", b"/../ws", b"/a/../ws", b"/ws%00", b"/ws%0a",
                  b"/ws%20", b"/ws%3f", b"/wsx", b"/xws", b"/news", b"/api/v1/ws", b"/", b"ws",
                  b"http://localhost/ws", b"/api/v1/health", b"/api/v1/a%0Ab%0B"]


class WebSocketPathTests(SynchronousTestCase):
    def _chosen(self, resource: Resource, target: bytes) -> bytes:
        # On a clock of its own: the connections stay open (their idle timers unfired).
        _, body = _send(Site(resource, reactor=MemoryReactorClock()), _get(target))
        return body.split(b"\r\n")[1] if b"\r\n" in body else body  # chunked: the one chunk

    def test_the_paths_klein_took_to_ws_are_the_ones_taken_now(self) -> None:
        for target in WS_TARGETS:
            self.assertEqual(self._chosen(_Choice(), target), b"ws", target)
        for target in NOT_WS_TARGETS:
            self.assertEqual(self._chosen(_Choice(), target), b"api", target)

    def test_the_choice_agrees_with_a_live_klein_app_on_the_same_targets(self) -> None:
        segments = ["", "ws", "WS", "%77s", "%2f", "%2F", ".", "..", "x", "ws%2f", "%2fws", "w",
                    "s", "ws?", "%20"]
        rng = random.Random(12)
        generated = {"/" + "/".join(rng.choice(segments) for _ in range(rng.randint(1, 4)))
                     for _ in range(400)}
        targets = [*WS_TARGETS, *NOT_WS_TARGETS, *(t.encode() for t in sorted(generated))]
        klein = _KleinFront().app.resource()
        for target in targets:
            self.assertEqual(self._chosen(_Choice(), target), self._chosen(klein, target), target)

    def test_ws_gets_the_websocket_endpoint_with_the_path_split_as_klein_left_it(self) -> None:
        site, _ = _site([], websocket=_WebSocketStandIn())
        _, body = _send(site, _get(b"/ws?x", b"Upgrade: websocket"))
        self.assertEqual(body, b"websocket endpoint: pre=[b'ws'] post=[]")
        _, body = _send(site, _get(b"//ws", b"Upgrade: websocket"))
        self.assertEqual(body, b"websocket endpoint: pre=[b''] post=[b'ws']")

    def test_ws_without_an_upgrade_is_a_400_problem_naming_the_upgrade(self) -> None:
        site, _ = _site([], websocket=_WebSocketStandIn())
        head, body = _send(site, _get(b"/ws", b"X-Request-ID: plain-1"))
        self.assertTrue(head.startswith(b"HTTP/1.1 400 "), head)
        self.assertIn(b"Upgrade: websocket", head)
        self.assertIn(b"Content-Type: application/problem+json", head)
        self.assertIn(b'"request_id":"plain-1"', body)

    def test_a_site_without_websocket_serves_ws_from_its_route_table(self) -> None:
        site, _ = _site([_json_route("GET", "/ws", lambda r: Response(200, b'{"table":1}'))])
        head, body = _send(site, _get(b"/ws"))
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b'{"table":1}', body)

    def test_a_path_werkzeug_could_not_match_still_reaches_the_dispatcher(self) -> None:
        site, _ = _site([], websocket=_WebSocketStandIn())
        head, body = _send(site, _get(b"/api/v1/a%0Ab%0B"))
        self.assertTrue(head.startswith(b"HTTP/1.1 404 "), head)
        self.assertIn(b"application/problem+json", head)
        self.assertIn(b'"code":"not_found"', body)

    def test_a_host_werkzeug_could_not_encode_gets_the_dispatchers_answer_not_a_500(self) -> None:
        # Klein bound Werkzeug's map to the Host before routing: an empty or over-long DNS
        # label failed IDNA encoding, and an unguarded listener (tls, or http off loopback)
        # answered Twisted's HTML "Processing Failed" page with a logged traceback.
        site, _ = _site([_json_route("GET", "/api/v1/x", lambda r: Response(200, b"{}"))])
        for host in (b"a..b", b"a" * 64 + b".example"):
            head, _ = _send(site, _get(b"/api/v1/x", host=host))
            self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(self.flushLoggedErrors(), [])


# -- what Klein did with a handler's result ---------------------------------------------


class AnswerTests(SynchronousTestCase):
    def test_a_deferred_body_is_written_and_the_request_finished_when_it_fires(self) -> None:
        later: Deferred[Response] = Deferred()
        site, adapter = _site([_json_route("GET", "/api/v1/x", lambda r: later)])
        channel, transport = _connect(site)
        channel.dataReceived(_get(b"/api/v1/x"))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(adapter.inflight.count, 1)
        later.callback(Response(200, b'{"late":true}'))
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b'{"late":true}', body)
        self.assertTrue(body.endswith(b"0\r\n\r\n"))  # finished: the last chunk is out
        self.assertEqual(adapter.inflight.count, 0)

    def test_a_lost_connection_cancels_the_pending_answer_and_ends_its_inflight(self) -> None:
        cancelled: list[object] = []
        pending: Deferred[Response] = Deferred(cancelled.append)
        site, adapter = _site([_json_route("GET", "/api/v1/x", lambda r: pending)])
        channel, transport = _connect(site)
        channel.dataReceived(_get(b"/api/v1/x"))
        self.assertEqual(adapter.inflight.count, 1)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(cancelled, [pending])
        self.assertEqual(adapter.inflight.count, 0)
        self.assertEqual(transport.value(), b"")
        # The dispatcher turns the cancellation into its 500 (and logs it), as it did under
        # Klein; nothing is written to the gone client.
        self.flushLoggedErrors(CancelledError)

    def test_a_streamed_answer_ends_with_cancelled_error_when_the_client_goes(self) -> None:
        stream = StreamBody()
        stopped: list[str] = []
        stream.on_cancel = lambda: stopped.append("producer stopped")
        sent: list[int] = []
        stream.when_finished(sent.append)
        route = RouteEntry("POST", "/api/v1/s", lambda r: Response(200, stream=stream),
                           public=True, tier="public", raw_body=True, streaming=True)
        site, adapter = _site([route])
        channel, transport = _connect(site)
        channel.dataReceived(_get(b"/api/v1/s?stream=true", method=b"POST"))
        stream.push(b'{"chunk":0}')
        self.assertIn(b'{"chunk":0}\n', transport.value())
        self.assertFalse(stream._done.called)  # what the adapter waits on
        channel.connectionLost(Failure(ConnectionDone()))
        # The wait ends with CancelledError — the adapter's "client went away" case: any
        # other failure would be converted (and logged) as an unexpected error — and the
        # producer is told to stop.
        self.assertTrue(stream._done.called)
        self.assertEqual(stopped, ["producer stopped"])
        self.assertEqual(sent, [11])
        self.assertEqual(adapter.inflight.count, 0)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_failure_after_the_dispatcher_is_a_500_problem_json_and_logged(self) -> None:
        # A header value Latin-1 cannot carry: writing the response head fails.
        bad = Response(200, b"{}", headers={"x-note": "\u2603"})
        site, adapter = _site([_json_route("GET", "/api/v1/x", lambda r: bad)])
        head, body = _send(site, _get(b"/api/v1/x", b"X-Request-ID: fail-1"))
        self.assertTrue(head.startswith(b"HTTP/1.1 500 "), head)
        self.assertIn(b"Content-Type: application/problem+json", head)
        self.assertIn(b"X-Request-Id: fail-1", head)
        self.assertIn(b"Server: aico-gateway", head)
        problem = json.loads(body.split(b"\r\n")[1])
        self.assertEqual((problem["code"], problem["request_id"]), ("internal_error", "fail-1"))
        self.assertEqual(len(self.flushLoggedErrors(UnicodeEncodeError)), 1)
        self.assertEqual(adapter.inflight.count, 0)

    def test_a_failure_before_the_dispatcher_is_a_500_problem_json_too(self) -> None:
        def identify(request: Any) -> str:
            raise RuntimeError("no device")

        site, adapter = _site([_json_route("GET", "/api/v1/x", lambda r: Response(200, b"{}"))],
                              identify=identify)
        head, body = _send(site, _get(b"/api/v1/x", b"X-Request-ID: fail-2"))
        self.assertTrue(head.startswith(b"HTTP/1.1 500 "), head)
        self.assertIn(b'"request_id":"fail-2"', body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(adapter.inflight.count, 0)

    def test_head_has_the_get_answers_head_and_no_body(self) -> None:
        site, _ = _site([_json_route("GET", "/api/v1/x", lambda r: Response(200, b'{"a":1}'))])
        channel, transport = _connect(site)
        channel.dataReceived(_get(b"/api/v1/x", method=b"HEAD"))
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b"Content-Type: application/json", head)
        self.assertEqual(body, b"")
        channel.dataReceived(_get(b"/api/v1/x"))  # the connection is still usable
        self.assertIn(b'{"a":1}', transport.value())

    def test_204_has_no_body_and_no_body_type(self) -> None:
        site, _ = _site([_json_route("DELETE", "/api/v1/x", lambda r: Response(204, b""))])
        head, body = _send(site, _get(b"/api/v1/x", method=b"DELETE"))
        self.assertTrue(head.startswith(b"HTTP/1.1 204 "), head)
        self.assertNotIn(b"Content-Type", head)
        self.assertNotIn(b"Transfer-Encoding", head)
        self.assertEqual(body, b"")

    def test_every_answer_names_the_gateway_once_and_is_not_cached(self) -> None:
        site, _ = _site([_json_route("GET", "/api/v1/x", lambda r: Response(200, b"{}")),
                         _json_route("GET", "/api/v1/c", lambda r: Response(
                             200, b"{}", headers={"Cache-Control": "max-age=5"}))])
        for target, cache in ((b"/api/v1/x", b"no-store"), (b"/api/v1/nope", b"no-store"),
                              (b"/api/v1/c", b"max-age=5")):
            head, _ = _send(site, _get(target))
            self.assertEqual(head.count(b"Server: "), 1, head)
            self.assertIn(b"Server: aico-gateway", head)
            self.assertIn(b"Cache-Control: " + cache, head)

    def test_a_plain_twisted_request_gets_the_server_field_from_write_head(self) -> None:
        adapter = RestAdapter(Dispatcher(RouteTable([])))
        web = DummyRequest([b""])
        adapter._write_head(web, Request("GET", "/", "r-1", "http"), Response(200, b"{}"))
        self.assertEqual(web.responseHeaders.getRawHeaders(b"server"), [b"aico-gateway"])
        self.assertNotIsInstance(web, LimitedRequest)


# -- the loopback parse, cached -------------------------------------------------------


#: The uncached answer: what is_loopback computed on every call before issue 12.
_parsed_is_loopback = is_loopback.__wrapped__


class LoopbackCacheTests(SynchronousTestCase):
    HOSTS = [None, "", "localhost", "LOCALHOST", "localhost.", "127.0.0.1", "127.255.255.254",
             "127.1", "0.0.0.0", "10.0.0.1", "::1", "0:0:0:0:0:0:0:1", "::ffff:127.0.0.1",
             "fe80::1", "fe80::1%eth0", "[::1]", "::2", "evil.example", "127.0.0.1.evil.example",
             "1.2.3.4:80", " 127.0.0.1", "127.0.0.1 ", "\u0661\u0662\u0667.0.0.1"]

    def test_the_cached_answer_is_the_parse_for_every_host_asked_twice(self) -> None:
        for host in self.HOSTS * 2:
            self.assertEqual(is_loopback(host), _parsed_is_loopback(host), host)

    def test_the_cache_is_bounded_and_still_right_past_its_bound(self) -> None:
        self.assertEqual(is_loopback.cache_info().maxsize, 1024)
        hosts = [f"127.0.{i // 256}.{i % 256}" for i in range(1500)] + \
                [f"10.0.{i // 256}.{i % 256}" for i in range(1500)]
        for host in hosts:
            self.assertEqual(is_loopback(host), _parsed_is_loopback(host), host)
        self.assertLessEqual(is_loopback.cache_info().currsize, 1024)


class HostGuardReloadTests(SynchronousTestCase):
    def _status(self, gw: MemoryGateway, host: bytes) -> bytes:
        out, _ = gw.raw_http(_get(b"/api/v1/health", b"Connection: close", host=host))
        return out.split(b"\r\n", 1)[0]

    def test_a_reload_that_changes_allowed_hosts_applies_to_the_next_request(self) -> None:
        gw = MemoryGateway(test=self)
        config = gw.parts.config
        self.assertEqual(self._status(gw, b"gw.lan:8771"), b"HTTP/1.1 403 Forbidden")
        self.assertEqual(self._status(gw, b"127.0.0.1:8771"), b"HTTP/1.1 200 OK")
        gw.parts.reconfigure(config.replace(http=dataclasses.replace(
            config.http, allowed_hosts=("gw.lan",))))
        self.assertEqual(self._status(gw, b"gw.lan:8771"), b"HTTP/1.1 200 OK")
        gw.parts.reconfigure(config)
        self.assertEqual(self._status(gw, b"gw.lan:8771"), b"HTTP/1.1 403 Forbidden")
        self.assertEqual(self._status(gw, b"127.0.0.1:8771"), b"HTTP/1.1 200 OK")

    def test_the_guard_agrees_with_the_uncached_parse_for_every_host(self) -> None:
        names = ["localhost", "127.0.0.1", "[::1]", "::1", "127.9.9.9", "gw.lan", "evil.example",
                 "10.0.0.1", "[fe80::1]", "", "LOCALHOST"]
        for name, port, allowed in itertools.product(names, ["", ":8771", ":x"],
                                                     [(), ("gw.lan",)]):
            host = name + port
            slow_name = host.strip().lower()
            if slow_name.startswith("["):
                end = slow_name.find("]")
                slow_name = slow_name[1:end] if end > 0 else slow_name
            else:
                base, sep, p = slow_name.rpartition(":")
                if sep and p.isdigit() and ":" not in base:
                    slow_name = base
            expected = bool(slow_name) and (
                slow_name in ("localhost", "localhost.") or _parsed_is_loopback(slow_name)
                or any(slow_name == a for a in allowed))
            self.assertEqual(host_allowed(host, allowed), expected, (host, allowed))


# -- normalize: the same Request as before, for less --------------------------------------


def _normalize_before(request: Any, transport: str) -> Request:
    """``normalize`` as it was before issue 12 (the slow path)."""
    headers: dict[str, str] = {}
    for name, values in request.requestHeaders.getAllRawHeaders():
        headers[name.decode("latin-1").lower()] = ", ".join(v.decode("latin-1") for v in values)
    query = {k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace")
             for k, v in request.args.items() if v}
    peer = request.getClientAddress()
    host = getattr(peer, "host", "") or ""
    body = request.content.read() if request.content is not None else b""
    return Request(method=request.method.decode("ascii", "replace"),
                   path=request.path.decode("latin-1"),
                   request_id=request_id_from(headers.get("x-request-id")), transport=transport,
                   peer_host=host, loopback=_parsed_is_loopback(host), headers=headers,
                   query=query, body=body, accepts_stream=query.get("stream") == "true")


class NormalizeTests(SynchronousTestCase):
    def _requests(self) -> list[tuple[bytes, list[tuple[bytes, bytes]], str]]:
        return [
            (b"/api/v1/x", [(b"Host", b"localhost"), (b"X-Request-ID", b"n-1")], "127.0.0.1"),
            (b"/api/v1/x?stream=true&a=1&a=2&b=%ff", [(b"Accept", b"a"), (b"Accept", b"b"),
                                                      (b"X-Request-ID", b"n-2")], "::1"),
            (b"/api/v1/x?stream=false", [(b"x-CUSTOM-name", b"\xe9t\xe9"),
                                         (b"X-Request-ID", b"bad id!")], "10.0.0.1"),
            (b"/a%0Ab", [(b"Cookie", b"a=1"), (b"Cookie", b"b=2"), (b"Cookie", b"c=3"),
                         (b"X-Request-ID", b"n-4")], ""),
        ]

    def test_normalize_gives_the_request_the_slow_path_gave(self) -> None:
        for target, headers, peer in self._requests():
            made = []
            for fn in (normalize, _normalize_before):
                web = DummyRequest([b""])
                web.method = b"POST"
                web.uri = target
                web.path = target.split(b"?")[0]
                web.args = {}
                for pair in target.partition(b"?")[2].split(b"&") if b"?" in target else []:
                    k, _, v = pair.partition(b"=")
                    web.args.setdefault(k, []).append(v.replace(b"%ff", b"\xff"))
                web.client = IPv4Address("TCP", peer, 1) if peer else None  # type: ignore[assignment]
                for name, value in headers:
                    web.requestHeaders.addRawHeader(name, value)
                web.content = io.BytesIO(b'{"a":1}')
                made.append(fn(web, "http"))
            new, old = made
            if headers[-1][1] == b"bad id!":  # a fresh random ID on both sides
                old.request_id = new.request_id
            self.assertEqual(new, old, target)

    def test_many_distinct_header_names_are_all_still_read(self) -> None:
        for i in range(1500):
            web = DummyRequest([b""])
            web.path = b"/"
            web.content = io.BytesIO(b"")
            web.requestHeaders.addRawHeader(b"X-Odd-%d" % i, b"v")
            web.client = PEER  # type: ignore[assignment]
            self.assertEqual(normalize(web, "http").headers[f"x-odd-{i}"], "v")


# -- the listeners serve this front ---------------------------------------------------


class ListenerTests(SynchronousTestCase):
    def test_http_tls_and_admin_sites_serve_the_rest_front(self) -> None:
        gw = MemoryGateway(test=self)
        parts = gw.parts
        for site, adapter in ((parts.http_site, parts.rest), (parts.tls_site, parts.tls_rest),
                              (parts.admin.site, parts.admin.adapter)):
            self.assertEqual(type(site.resource).__name__, "_Front")
            self.assertIs(site.resource.adapter, adapter)  # type: ignore[attr-defined]
        self.assertFalse(hasattr(RestAdapter, "app"))

    def test_an_answer_that_fires_at_once_is_written_at_once(self) -> None:
        site, _ = _site([_json_route("GET", "/api/v1/x", lambda r: succeed(Response(200, b"{}")))])
        head, _ = _send(site, _get(b"/api/v1/x"))
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)


class HotPathTrimTests(SynchronousTestCase):
    """Per-request work done once (issue 12): the Date field per second, one
    notifyFinish per request, no Host re-parse for an ASCII Host."""

    def test_the_date_field_is_twisteds_text_formatted_once_a_second(self) -> None:
        from twisted.web import http as web_http
        from twisted.web import server as web_server

        from aico.gateway.adapters import rest

        cached = rest._HttpDate(web_http.datetimeToString)
        now = [1_700_000_000.25]
        self.patch(rest.time, "time", lambda: now[0])
        calls: list[object] = []
        original = cached.original
        cached.original = lambda *a: calls.append(a) or original(*a)  # type: ignore[method-assign]
        first = cached()
        self.assertEqual(first, web_http.datetimeToString(1_700_000_000))
        now[0] = 1_700_000_000.99
        self.assertIs(cached(), first)
        now[0] = 1_700_000_001.0
        self.assertEqual(cached(), web_http.datetimeToString(1_700_000_001))
        self.assertEqual(len(calls), 2)
        self.assertEqual(cached(86400.0), web_http.datetimeToString(86400.0))
        # every gateway site installs it in twisted.web.server, once
        _site([])
        _site([])
        installed = getattr(web_server, "datetimeToString")
        self.assertIsInstance(installed, rest._HttpDate)
        self.assertNotIsInstance(installed.original, rest._HttpDate)

    def test_one_notify_finish_per_request_and_the_inflight_count_ends(self) -> None:
        site, adapter = _site([_json_route("GET", "/api/v1/x",
                                           lambda r: Response(200, b'{"ok":true}'))])
        channel, transport = _connect(site)
        from twisted.web.server import Request as WebRequest

        calls: list[object] = []
        original = WebRequest.notifyFinish
        self.patch(WebRequest, "notifyFinish",
                   lambda self: calls.append(self) or original(self))
        channel.dataReceived(_get(b"/api/v1/x"))
        self.assertIn(b'{"ok":true}', transport.value())
        self.assertEqual(len(calls), 1)
        self.assertEqual(adapter.inflight.count, 0)

    def test_a_host_that_is_not_utf8_is_still_refused(self) -> None:
        site, _ = _site([_json_route("GET", "/api/v1/x", lambda r: Response(200, b"{}"))])
        channel, transport = _connect(site)
        channel.dataReceived(_get(b"/api/v1/x", host=b"\xff\xfe.example"))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "), transport.value()[:80])
