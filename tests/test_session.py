"""The session layer shared by WebSocket and IPC, in memory on the real security chain.

Each test runs the same session code under two transport names, ``websocket`` and
``ipc``: whatever the framing, a connection's requests, subscriptions and refusals are
treated alike.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from aico.gateway.adapters.session import MAX_AUTH_REFUSALS, Session, problem_code
from aico.gateway.connections import ConnectionInfo, Event, IConnection
from aico.gateway.errors import ApiError, BadRequest
from aico.gateway.routing.messages import Request, Response, json_response
from aico.gateway.routing.table import RouteEntry
from aico.gateway.testing.memory import MemoryGateway

TRANSPORTS = ("websocket", "ipc")


@implementer(IConnection)
class Conn:
    """A connection as the manager sees it, recording what it is told."""

    def __init__(self, transport: str) -> None:
        self.info = ConnectionInfo(transport=transport, peer="test", since=0.0)
        self.closed: list[int] = []
        self.events: list[Event] = []

    def deliver(self, event: Event) -> None:
        self.events.append(event)

    def auth_ended(self, error: ApiError) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        self.closed.append(code)


class Reading:
    """A SessionTransport that records pauses."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False


class SessionCase(SynchronousTestCase):
    config = ""

    def setUp(self) -> None:
        self.gw = MemoryGateway(self.config, test=self)
        self.token = self.gw.token()

    def session(self, name: str, queue_limit: int | None = None) -> tuple[Session, Conn, Reading]:
        conn, reading = Conn(name), Reading()
        self.gw.parts.connections.add(conn)
        core = Session(self.gw.parts.sessions, conn, reading, name=name, peer_host="127.0.0.1",
                       loopback=True, queue_limit=queue_limit)
        return core, conn, reading


class RequestBuildingTests(SessionCase):
    def test_a_frame_becomes_a_request_with_the_connections_token_and_identity(self) -> None:
        for name in TRANSPORTS:
            core, conn, _ = self.session(name)
            request = core.build_request(
                "get", "/api/v1/users/me?x=1", query={"y": "2"}, body=b"{}",
                headers={"Authorization": "Bearer forged", "Cookie": "c", "Host": "evil",
                         "X-Request-ID": "abc"}, token="socket-token")
            self.assertEqual((request.method, request.path, request.query),
                             ("GET", "/api/v1/users/me", {"x": "1", "y": "2"}))
            self.assertEqual(request.headers, {"authorization": "Bearer socket-token",
                                               "x-request-id": "abc",
                                               "content-type": "application/json"})
            self.assertEqual((request.request_id, request.transport, request.connection_id),
                             ("abc", name, conn.info.id))

    def test_without_a_connection_token_the_frames_own_authorization_is_kept(self) -> None:
        core, _, _ = self.session("ipc")
        request = core.build_request("GET", "/x", headers={"authorization": "Bearer t"}, token=None)
        self.assertEqual(request.headers["authorization"], "Bearer t")
        request = core.build_request("GET", "/x", headers={"authorization": "Bearer t"}, token="")
        self.assertNotIn("authorization", request.headers)

    def test_bad_methods_and_paths_are_400(self) -> None:
        core, _, _ = self.session("websocket")
        for method, path in [("", "/x"), ("G3T", "/x"), ("GET", "x"), ("GET", "/" + "a" * 3000)]:
            self.assertRaises(BadRequest, core.build_request, method, path)


class FairShareTests(SessionCase):
    config = "[limits]\nmax_inflight = 2\ninflight_queue = 3\n"

    def setUp(self) -> None:
        super().setUp()
        self.held: list[Deferred[Response]] = []

        def hold(request: Request) -> Deferred[Response]:
            d: Deferred[Response] = Deferred()
            self.held.append(d)
            return d

        dispatcher = self.gw.parts.dispatcher
        dispatcher.set_table(dispatcher.table.with_routes(
            "test", [RouteEntry("GET", "/hold", hold, owner="test", public=True, tier="public")]))

    def pipeline(self, core: Session, count: int) -> tuple[list[int], list[bool]]:
        answered: list[int] = []
        accepted = [core.dispatch(core.build_request("GET", "/hold"),
                                  lambda r, i=i: answered.append(i)) for i in range(count)]
        return answered, accepted

    def test_past_max_inflight_a_websocket_stops_being_read_and_requests_wait_in_order(self) -> None:
        core, _, reading = self.session("websocket")  # no queue limit: reading is held back
        answered, accepted = self.pipeline(core, 10)
        self.assertEqual(accepted, [True] * 10)
        self.assertEqual((core.in_flight, len(self.held), reading.paused), (2, 2, True))
        while self.held:
            self.held.pop(0).callback(json_response({}))
        self.assertEqual(answered, list(range(10)))
        self.assertEqual((core.max_in_flight_seen, reading.paused, reading.pauses), (2, False, 1))

    def test_past_the_queue_an_ipc_peers_request_is_refused_at_once(self) -> None:
        core, _, _ = self.session("ipc", queue_limit=3)
        _, accepted = self.pipeline(core, 10)
        self.assertEqual(accepted, [True] * 5 + [False] * 5)
        error = core.overloaded()
        self.assertEqual((error.status, error.code, error.headers), (429, "rate_limited",
                                                                     {"Retry-After": "1"}))

    def test_one_connections_backlog_never_holds_another_connections_request(self) -> None:
        busy, _, _ = self.session("websocket")
        self.pipeline(busy, 50)
        other, _, _ = self.session("websocket")
        got: list[Response] = []
        other.dispatch(other.build_request("GET", "/api/v1/health"), got.append)
        self.assertEqual(got[0].status, 200)

    def test_a_closed_session_drops_what_waits(self) -> None:
        core, _, _ = self.session("websocket")
        answered, _ = self.pipeline(core, 5)
        core.close()
        self.held.pop(0).callback(json_response({}))
        self.assertEqual(answered, [0])
        self.assertEqual(len(self.held), 1)  # nothing new started


class ControlTests(SessionCase):
    config = """
[ratelimit.tiers.standard]
requests = 3
per_seconds = 60
burst = 3
"""

    def result(self, d: Deferred[Any]) -> Any:
        self.gw.settle()
        return self.successResultOf(d)

    def test_subscribe_is_authenticated_authorized_for_the_topic_and_rate_limited(self) -> None:
        self.gw.add_user("ursula", "a-long-password-1", ("user",))
        user = self.gw.token("ursula", "a-long-password-1")
        for name in TRANSPORTS:
            core, conn, _ = self.session(name)
            bearer = f"Bearer {user}"
            statuses = [
                self.result(core.subscribe("conversation/", None)).status,
                self.result(core.subscribe("system/", bearer)).status,
                self.result(core.subscribe("conversation/", bearer)).status,
                self.result(core.subscribe("user/ursula/", bearer)).status,
            ]
            self.assertEqual(statuses, [401, 403, 200, 200], name)
            # three of ursula's budget of three are spent (the refusal counts too)
            self.assertEqual(problem_code(self.result(core.subscribe("events/", bearer))),
                             "rate_limited", name)
            self.assertEqual(conn.info.subscriptions, {"conversation/", "user/ursula/"})
            self.gw.parts.limiter.update(self.gw.config.ratelimit.tiers)  # a fresh budget
            self.gw.parts.limiter._clients.clear()

    def test_a_refused_token_costs_the_same_on_every_transport(self) -> None:
        charged = {}
        for name in TRANSPORTS:
            self.gw.parts.limiter._clients.clear()
            core, _, _ = self.session(name)
            codes = [problem_code(self.result(core.subscribe("conversation/", "Bearer nope")))
                     for _ in range(4)]
            charged[name] = codes
        self.assertEqual(charged["websocket"], charged["ipc"])
        self.assertEqual(charged["ipc"], ["token_invalid"] * 3 + ["rate_limited"])

    def test_an_unexpected_error_in_authentication_is_500_on_every_transport(self) -> None:
        def broken(token: str) -> Any:
            raise RuntimeError("the keyring fell over")

        self.patch(self.gw.parts.chain, "principal_for_token", broken)
        for name in TRANSPORTS:
            core, _, _ = self.session(name)
            principal, response = self.result(core.authenticate(self.token))
            self.assertEqual((principal, response.status, problem_code(response)),
                             (None, 500, "internal_error"))
            response = self.result(core.subscribe("conversation/", f"Bearer {self.token}"))
            self.assertEqual((response.status, problem_code(response)), (500, "internal_error"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 4)

    def test_unsubscribe_needs_no_token_but_refuses_a_bad_one(self) -> None:
        core, conn, _ = self.session("ipc")
        self.assertEqual(self.result(core.subscribe("conversation/", f"Bearer {self.token}")).status,
                         200)
        self.assertEqual(problem_code(self.result(core.unsubscribe("conversation/", "Bearer x"))),
                         "token_invalid")
        self.assertEqual(conn.info.subscriptions, {"conversation/"})
        self.assertEqual(self.result(core.unsubscribe("conversation/", None)).status, 200)
        self.assertEqual(conn.info.subscriptions, set())


class RefusalTests(SessionCase):
    def test_refused_tokens_close_the_connection_after_five(self) -> None:
        for name in TRANSPORTS:
            core, conn, _ = self.session(name)
            for i in range(MAX_AUTH_REFUSALS):
                self.assertEqual(conn.closed, [], (name, i))
                principal, response = self.successResultOf(core.authenticate("not-a-token"))
                self.assertIsNone(principal)
                core.refused(response)
            self.assertEqual(conn.closed, [1008], name)

    def test_other_refusals_do_not_count(self) -> None:
        core, conn, _ = self.session("ipc")
        token = self.gw.token()
        for _ in range(MAX_AUTH_REFUSALS * 2):
            response = self.successResultOf(core.subscribe("nope", f"Bearer {token}"))
            self.assertEqual(response.status, 403)
            core.refused(response)
        self.assertEqual(conn.closed, [])
