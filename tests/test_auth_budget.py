"""Whose budget a login or a refresh spends, and how much password work can pile up.

* The caller cannot choose its rate-limit key: every loopback address is one source
  (:func:`aico.net.source_identity`), and a bearer token sent with a login does not move
  the login's charge to that token's user.
* No local client can shut the others out: a login is charged to (account attempted,
  source), a refresh to its session family, so one process failing logins for ``x``
  spends only that budget, on every transport.
* Argon2 work is capped gateway-wide: past ``auth.password_concurrency`` running and
  ``auth.password_queue`` waiting, a login is refused at once with 503 and
  ``Retry-After``, without reaching Argon2.

All in memory (:class:`~aico.gateway.testing.memory.MemoryGateway`); REST requests from
other source addresses go into a connection of the gateway's own site whose peer is that
address, WebSocket and IPC sessions are the session layer both adapters share.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from aico.gateway import config as configuration
from aico.gateway.adapters.session import Session, problem_code
from aico.gateway.connections import ConnectionInfo, Event, IConnection
from aico.gateway.errors import ApiError
from aico.gateway.routing.messages import Principal, Request, Response
from aico.gateway.routing.table import RouteEntry
from aico.gateway.security.chain import limit_key
from aico.gateway.testing.memory import ADMIN_PASSWORD, MemoryGateway
from aico.net import source_identity

AUTHENTICATE = "/api/v1/users/authenticate"
REFRESH = "/api/v1/users/refresh"

#: The production defaults of the auth tier and of blocks (the memory gateway's own
#: limits are generous), so the numbers are those of the audit's reproduction.
PRODUCTION_AUTH_LIMITS = """
[ratelimit]
block_after = 20
block_base = 60
block_max = 3600
[ratelimit.tiers.auth]
requests = 10
per_seconds = 60
burst = 5
"""


# --------------------------------------------------------------------------- helpers


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out


def http_from(gw: MemoryGateway, host: str, path: str, body: Any,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """POST *body* to *path* on a fresh connection of the gateway's site whose peer is
    *host*: ``(status, lower-case headers, JSON body)``."""
    address: IPv4Address | IPv6Address = (
        IPv6Address("TCP", host, 40000) if ":" in host else IPv4Address("TCP", host, 40000))
    channel = gw.parts.http_site.buildProtocol(address)  # type: ignore[no-untyped-call]
    transport = StringTransport(peerAddress=address)
    channel.makeConnection(transport)
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:8771\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n")
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    channel.dataReceived(head.encode() + b"\r\n" + data)
    gw.settle()
    raw = transport.value()
    head_bytes, _, rest = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if fields.get("transfer-encoding") == "chunked":
        rest = _dechunk(rest)
    channel.connectionLost(None)
    return status, fields, (json.loads(rest) if rest else None)


@implementer(IConnection)
class Conn:
    def __init__(self, transport: str) -> None:
        self.info = ConnectionInfo(transport=transport, peer="test", since=0.0)

    def deliver(self, event: Event) -> None:
        pass

    def auth_ended(self, error: ApiError) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        pass


class Reading:
    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def session_request(gw: MemoryGateway, transport: str, host: str, path: str,
                    body: Any) -> Response:
    """One request through a WebSocket or IPC session (the layer both adapters share)
    whose peer is *host*."""
    conn = Conn(transport)
    gw.parts.connections.add(conn)
    core = Session(gw.parts.sessions, conn, Reading(), name=transport, peer_host=host,
                   loopback=True)
    answers: list[Response] = []
    core.dispatch(core.build_request("POST", path, body=json.dumps(body).encode()),
                  answers.append)
    gw.settle()
    assert len(answers) == 1, answers
    return answers[0]


class HandFired:
    """A password runner whose work runs only when the test fires it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []
        self.fired = 0

    def __call__(self, f: Callable[..., Any], /, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    @property
    def pending(self) -> int:
        return len(self.calls) - self.fired

    def fire_next(self) -> None:
        f, args, d = self.calls[self.fired]
        self.fired += 1
        d.callback(f(*args))


# --------------------------------------------------------------------------- the source


class SourceIdentityTests(SynchronousTestCase):
    def test_every_loopback_address_is_one_source(self) -> None:
        for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.255.255.254", "::1",
                     "localhost", "::ffff:127.0.0.5"):
            self.assertEqual(source_identity(host), "loopback", host)

    def test_ipv6_counts_per_64_network_and_ipv4_per_address(self) -> None:
        self.assertEqual(source_identity("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        self.assertEqual(source_identity("2001:db8:1:2:ffff::9"), "2001:db8:1:2::/64")
        self.assertEqual(source_identity("2001:db8:1:3::1"), "2001:db8:1:3::/64")
        self.assertEqual(source_identity("fe80::1%eth0"), "fe80::/64")
        self.assertEqual(source_identity("192.0.2.7"), "192.0.2.7")
        self.assertEqual(source_identity("192.0.2.8"), "192.0.2.8")
        # IPv4 seen through a dual-stack socket is still that IPv4 address, not one /64
        # shared by the whole IPv4 internet.
        self.assertEqual(source_identity("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(source_identity(""), "")

    def test_anonymous_requests_without_a_connection_count_per_source(self) -> None:
        a = Request(method="GET", path="/x", request_id="r", transport="http",
                    peer_host="127.0.0.9")
        b = Request(method="GET", path="/x", request_id="r", transport="http", peer_host="::1")
        self.assertEqual(a.client_key, "addr:loopback")
        self.assertEqual(b.client_key, a.client_key)


class LimitKeyTests(SynchronousTestCase):
    """The keys of the auth tier (unit level: :func:`limit_key`)."""

    def setUp(self) -> None:
        self.gw = MemoryGateway(test=self)
        table = self.gw.parts.dispatcher.table
        self.login_route = table.match("POST", AUTHENTICATE)[0]
        self.refresh_route = table.match("POST", REFRESH)[0]

    def request(self, route: RouteEntry, host: str, body: Any = None,
                principal: Principal | None = None) -> Request:
        request = Request(method="POST", path=route.path, request_id="r", transport="http",
                          peer_host=host, route=route, principal=principal,
                          connection_id="c1")
        if body is not None:
            request.json = body
        return request

    def test_the_user_routes_say_how_they_are_keyed(self) -> None:
        self.assertEqual((self.login_route.tier, self.login_route.limit_by), ("auth", "login"))
        self.assertEqual((self.refresh_route.tier, self.refresh_route.limit_by),
                         ("auth", "refresh"))
        with self.assertRaises(ValueError):
            RouteEntry("POST", "/x", lambda r: Response(), public=True, limit_by="nonsense")

    def test_a_login_is_keyed_by_account_and_source_never_by_token_or_connection(self) -> None:
        key = limit_key(self.request(self.login_route, "127.0.0.1", {"username": "x"}))
        self.assertEqual(key, 'login:loopback:"x"')
        for host in ("127.0.0.3", "::1"):
            self.assertEqual(limit_key(self.request(self.login_route, host, {"username": "x"})),
                             key)
        with_token = self.request(self.login_route, "127.0.0.1", {"username": "x"},
                                  principal=Principal(subject="ursula"))
        self.assertEqual(limit_key(with_token), key)
        self.assertNotEqual(limit_key(self.request(self.login_route, "127.0.0.1",
                                                   {"username": "admin"})), key)
        self.assertEqual(limit_key(self.request(self.login_route, "192.0.2.7", {"username": "x"})),
                         'login:192.0.2.7:"x"')

    def test_a_login_refused_before_validation_has_a_key_no_account_can_have(self) -> None:
        unread = limit_key(self.request(self.login_route, "127.0.0.1"))
        self.assertEqual(unread, "login-unread:loopback")
        # Control characters and quotes in a name stay inside its JSON string.
        odd = limit_key(self.request(self.login_route, "127.0.0.1",
                                     {"username": 'a"\r\n\u2028'}))
        self.assertEqual(odd, 'login:loopback:"a\\"\\r\\n\\u2028"')

    def test_a_refresh_is_keyed_by_its_session_family_else_by_source(self) -> None:
        tokens = self.gw.parts.tokens
        pair = tokens.issue_pair("ursula", ["user"], ["users:self"])
        family = tokens.verify_refresh(pair.refresh_token).fam
        key = limit_key(self.request(self.refresh_route, "127.0.0.1",
                                     {"refresh_token": pair.refresh_token}), tokens)
        self.assertEqual(key, "refresh:fam:" + family)
        self.assertEqual(limit_key(self.request(self.refresh_route, "::1",
                                                {"refresh_token": pair.refresh_token}), tokens), key)
        bad = limit_key(self.request(self.refresh_route, "127.0.0.2",
                                     {"refresh_token": "not-a-token"}), tokens)
        self.assertEqual(bad, "refresh:src:loopback")
        self.assertEqual(limit_key(self.request(self.refresh_route, "127.0.0.2"), tokens), bad)

    def test_a_block_on_one_key_does_not_block_the_sources_other_keys(self) -> None:
        limiter = self.gw.parts.limiter
        limiter.update(self.gw.config.ratelimit.tiers, block_after=2)
        x = limit_key(self.request(self.login_route, "127.0.0.1", {"username": "x"}))
        while not limiter.check(x, "auth").blocked:
            pass
        admin = limit_key(self.request(self.login_route, "127.0.0.1", {"username": "admin"}))
        for key in (admin, "refresh:fam:f1", "refresh:src:loopback", "login-unread:loopback",
                    "addr:loopback"):
            self.assertTrue(limiter.check(key, "auth").allowed, key)
        self.assertTrue(limiter.check(x, "auth").blocked)


# --------------------------------------------------------------------------- end to end


class LoopbackBudgetTests(SynchronousTestCase):
    """The audit's reproductions, on the production limits of the auth tier."""

    def setUp(self) -> None:
        self.gw = MemoryGateway(PRODUCTION_AUTH_LIMITS, test=self)
        self.gw.add_user("ursula", "a-long-password-1")

    def fail_logins(self, count: int, host: str = "127.0.0.1", username: str = "x",
                    headers: dict[str, str] | None = None) -> list[tuple[int, str]]:
        out = []
        for _ in range(count):
            status, _, body = http_from(self.gw, host, AUTHENTICATE,
                                        {"username": username, "password": "wrong-guess"},
                                        headers)
            out.append((status, body["code"]))
        return out

    def test_failed_logins_for_one_account_never_block_other_logins_or_refreshes(self) -> None:
        # Another local client's session, made before the flood.
        session = self.gw.login("ursula", "a-long-password-1")
        codes = self.fail_logins(40)
        self.assertEqual(codes[:5], [(401, "invalid_credentials")] * 5)
        self.assertIn((429, "temporarily_blocked"), codes)  # the flood itself is stopped
        admin = {"username": "admin", "password": ADMIN_PASSWORD}
        # Six admin logins follow, 6 s apart (the auth tier's steady rate, 10 a minute):
        # all within the first block of "x" (60 s).
        # REST from another loopback address, from ::1, and from the flood's own address
        for host in ("127.0.0.2", "::1", "127.0.0.1"):
            self.gw.advance(6)
            status, _, body = http_from(self.gw, host, AUTHENTICATE, admin)
            self.assertEqual(status, 200, (host, body))
        # WebSocket: the real adapter (its peer is 127.0.0.1, the flood's own address)...
        self.gw.advance(6)
        ws = self.gw.websocket()
        ws.recv()  # welcome
        ws.send({"type": "request", "id": 1, "method": "POST", "path": AUTHENTICATE,
                 "body": admin})
        answer = ws.recv()
        self.assertEqual(answer["status"], 200, answer)
        # ...and WebSocket and IPC sessions from ::1 and 127.0.0.1
        for transport, host in (("websocket", "::1"), ("ipc", "127.0.0.1")):
            self.gw.advance(6)
            response = session_request(self.gw, transport, host, AUTHENTICATE, admin)
            self.assertEqual((response.status, problem_code(response)), (200, ""),
                             (transport, host))
        # Another client's refresh, from the flood's own address.
        status, _, body = http_from(self.gw, "127.0.0.1", REFRESH,
                                    {"refresh_token": session["refresh_token"]})
        self.assertEqual(status, 200, body)
        # The flooding account itself is still blocked, from every loopback address.
        self.assertEqual(self.fail_logins(1, "127.0.0.4"), [(429, "temporarily_blocked")])

    def test_another_loopback_address_is_no_fresh_budget_for_the_same_account(self) -> None:
        codes = self.fail_logins(5, "127.0.0.1")
        self.assertEqual(codes, [(401, "invalid_credentials")] * 5)
        for host in ("127.0.0.3", "127.1.2.3", "::1"):
            status, headers, body = http_from(self.gw, host, AUTHENTICATE,
                                              {"username": "x", "password": "wrong-guess"})
            self.assertEqual((status, body["code"]), (429, "rate_limited"), host)
            self.assertIn("retry-after", headers)

    def test_a_bearer_token_on_a_login_does_not_reset_its_budget(self) -> None:
        token = self.gw.parts.tokens.issue_pair("ursula", ["user"], ["users:self"]).access_token
        self.assertEqual(self.fail_logins(5), [(401, "invalid_credentials")] * 5)
        codes = self.fail_logins(2, headers={"Authorization": f"Bearer {token}"})
        self.assertEqual(codes, [(429, "rate_limited")] * 2)

    def test_failed_refreshes_never_block_a_valid_refresh(self) -> None:
        session = self.gw.login("ursula", "a-long-password-1")
        for _ in range(40):
            http_from(self.gw, "127.0.0.1", REFRESH, {"refresh_token": "forged.token.value"})
        status, _, body = http_from(self.gw, "127.0.0.1", REFRESH, {"refresh_token": "x.y.z"})
        self.assertEqual((status, body["code"]), (429, "temporarily_blocked"))
        status, _, body = http_from(self.gw, "127.0.0.1", REFRESH,
                                    {"refresh_token": session["refresh_token"]})
        self.assertEqual(status, 200, body)


class PasswordCapTests(SynchronousTestCase):
    """A flood of logins gets 503s, not an unbounded queue of Argon2 work."""

    def setUp(self) -> None:
        self.gw = MemoryGateway("[auth]\npassword_concurrency = 2\npassword_queue = 3\n",
                                test=self)
        self.runner = HandFired()
        self.gw.parts.passwords.runner = self.runner

    def login_later(self, username: str, password: str) -> list[Any]:
        out: list[Any] = []
        self.gw.send("POST", AUTHENTICATE,
                     json_body={"username": username, "password": password}).addBoth(out.append)
        return out

    def test_past_the_running_and_waiting_logins_the_next_gets_503_at_once(self) -> None:
        accepted = [self.login_later("admin" if i % 2 else "nobody", ADMIN_PASSWORD)
                    for i in range(5)]
        self.gw.settle()
        self.assertEqual(self.runner.pending, 2)  # two run, three wait
        self.assertEqual(self.gw.parts.passwords.waiting, 3)
        self.assertEqual([a for a in accepted if a], [])
        refused = self.login_later("admin", ADMIN_PASSWORD)
        self.gw.settle()
        self.assertEqual(len(refused), 1)
        response = refused[0]
        self.assertEqual((response.code, response.json()["code"]), (503, "backend_unavailable"))
        self.assertEqual(response.header("Retry-After"), "1")
        self.assertEqual(len(self.runner.calls), 2)  # the refused login never reached Argon2
        # One finishes: a waiting one starts.
        self.runner.fire_next()
        self.gw.settle()
        self.assertEqual(len(self.runner.calls), 3)
        self.assertEqual(self.gw.parts.passwords.waiting, 2)
        while self.runner.pending:
            self.runner.fire_next()
            self.gw.settle()
        self.assertEqual(len(self.runner.calls), 5)
        self.assertEqual(sorted(a[0].code for a in accepted), [200, 200, 401, 401, 401])

    def test_a_flood_of_logins_is_mostly_refused_and_the_queue_stays_bounded(self) -> None:
        answers = [self.login_later("nobody", "guess") for _ in range(100)]
        self.gw.settle()
        refused = [a[0] for a in answers if a]
        self.assertEqual(len(refused), 95)
        self.assertTrue(all(r.code == 503 and r.header("Retry-After") for r in refused))
        self.assertEqual((self.runner.pending, self.gw.parts.passwords.waiting), (2, 3))
        while self.runner.pending:
            self.runner.fire_next()
            self.gw.settle()
        self.assertEqual(len(self.runner.calls), 5)
        self.assertTrue(all(a and a[0].code == 401 for a in answers if a[0] not in refused))

    def test_the_cap_follows_a_config_reload(self) -> None:
        config = self.gw.config
        self.gw.parts.reconfigure(dataclasses.replace(config, auth=dataclasses.replace(
            config.auth, password_concurrency=4, password_queue=0)))
        passwords = self.gw.parts.passwords
        self.assertEqual((passwords.concurrency, passwords.queue), (4, 0))

    def test_the_password_limits_are_checked_in_the_config(self) -> None:
        for key, value in (("password_concurrency", 0), ("password_queue", -1)):
            with self.assertRaises(configuration.ConfigError) as e:
                configuration.from_mapping({"auth": {key: value}}, "<t>")
            self.assertIn("auth." + key, str(e.exception))
