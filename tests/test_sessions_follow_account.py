"""Sessions follow the account: a login that races a password change, a disable or a
demotion never yields tokens that outlive the change, and neither does a deleted user's.

The races are deterministic. A :class:`~tests.stepping.Stepper` stands between the
gateway and its registry (users store, revocation store, audit log) and between the
password service and its runner: while it holds, every such call waits in a queue (as
work waiting for the database's or the CPU pool's thread does), and the test lets them
run one at a time. For every point ``k`` of a login's progress (after its ``k``-th
asynchronous step), the test lets the login get that far, then makes the change through
``PATCH``, then lets the login finish — every interleaving of the two, one by one.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from aico.bus.directory import ModuleDirectory
from aico.bus.testing import MemoryBroker, MemoryBus
from aico.gateway.composition import GatewayParts, Materials
from aico.gateway.security.tokens import SessionEnded
from aico.gateway.testing.memory import MemoryGateway, MemoryResponse
from tests.stepping import Stepper

PASSWORD = "the-old-password-1"
#: ``(k, login status, /users/me status, refresh status, roles /users/me showed)``
Outcome = tuple[int, int, int, int, Any]
AUTH = "/api/v1/users/authenticate"


class RacingLoginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = MemoryGateway(test=self)
        self.admin = self.gw.token()
        self.stepper = Stepper(self.gw.database)
        self.stepper.install(self, self.gw)
        self.count = 0

    def finish(self, d: Deferred[MemoryResponse]) -> MemoryResponse:
        while self.stepper.step():
            self.gw.settle()
        self.gw.settle()
        return self.successResultOf(d)

    def race(self, roles: tuple[str, ...], change: dict[str, Any]) -> list[Outcome]:
        """For every point of a login's progress, that login raced by ``PATCH change``:
        ``(k, login status, /users/me status, refresh status, roles /users/me showed)``
        (0 and None: no token to try)."""
        outcomes = []
        k = 0
        while True:
            self.count += 1
            name = f"racer{self.count}"
            self.gw.add_user(name, PASSWORD, roles)
            self.stepper.holding = True
            login = self.gw.send("POST", AUTH, json_body={"username": name, "password": PASSWORD})
            self.gw.settle()
            for _ in range(k):
                self.stepper.step()
                self.gw.settle()
            raced = bool(self.stepper.queue)  # the login is still under way
            self.stepper.holding = False
            patch = self.gw.send("PATCH", f"/api/v1/users/{name}", json_body=change,
                                 token=self.admin)
            self.gw.settle()
            r = self.finish(login)
            self.assertEqual(self.finish(patch).code, 200)
            me = refresh = 0
            seen = None
            if r.code == 200:
                answer = self.gw.get("/api/v1/users/me", token=r.json()["access_token"])
                me, seen = answer.code, answer.json().get("roles")
                refresh = self.gw.post("/api/v1/users/refresh",
                                       {"refresh_token": r.json()["refresh_token"]}).code
            outcomes.append((k, r.code, me, refresh, seen))
            if not raced:
                return outcomes
            k += 1

    def assertNoSessionOutlivesTheChange(self, outcomes: list[Outcome],
                                         roles_after: list[str] | None = None) -> None:
        """Every login that raced the change was refused, or its tokens are (401 on
        ``/users/me`` and on refresh) — unless, with *roles_after*, it read the account
        after the change and its session has exactly those roles."""
        for k, login, me, refresh, seen in outcomes:
            if login != 200:
                self.assertEqual(login, 401, outcomes)
            elif roles_after is not None and me == 200:
                self.assertEqual((seen, refresh), (roles_after, 200), f"step {k}: {outcomes}")
            else:
                self.assertEqual((me, refresh), (401, 401), f"raced after step {k}: {outcomes}")
        # The race reached the point where the login had its tokens issued before the
        # change and handed them out after it (not only logins refused outright).
        self.assertIn((200, 401, 401), [(login, me, refresh) for _, login, me, refresh, _ in outcomes])

    def test_a_login_racing_a_password_change_yields_no_lasting_session(self) -> None:
        self.assertNoSessionOutlivesTheChange(
            self.race(("user",), {"password": "a-brand-new-password"}))

    def test_a_login_racing_a_disable_yields_no_lasting_session(self) -> None:
        self.assertNoSessionOutlivesTheChange(self.race(("user",), {"disabled": True}))

    def test_a_login_racing_a_demotion_yields_no_lasting_admin_session(self) -> None:
        self.assertNoSessionOutlivesTheChange(self.race(("admin",), {"roles": ["user"]}),
                                              roles_after=["user"])


class DemotionTests(SynchronousTestCase):
    def test_the_demoted_admins_old_role_token_is_refused(self) -> None:
        gw = MemoryGateway(test=self)
        gw.add_user("ada", PASSWORD, ("admin",))
        pair = gw.login("ada", PASSWORD)
        self.assertEqual(gw.get("/api/v1/users", token=pair["access_token"]).code, 200)
        r = gw.request("PATCH", "/api/v1/users/ada", json_body={"roles": ["user"]},
                       token=gw.token())
        self.assertEqual(r.code, 200)
        for path in ("/api/v1/users", "/api/v1/users/me"):
            r = gw.get(path, token=pair["access_token"])
            self.assertEqual((r.code, r.json()["code"]), (401, "token_revoked"))
        r = gw.post("/api/v1/users/refresh", {"refresh_token": pair["refresh_token"]})
        self.assertEqual(r.code, 401)
        # Its new login has the new role only.
        me = gw.get("/api/v1/users/me", token=gw.token("ada", PASSWORD)).json()
        self.assertEqual(me["roles"], ["user"])


class DeletedUserTests(SynchronousTestCase):
    def test_a_user_created_again_never_accepts_the_deleted_users_tokens(self) -> None:
        gw = MemoryGateway(test=self)
        admin = gw.token()
        gw.add_user("dora", PASSWORD)
        tokens = gw.parts.tokens
        # What a login racing the deletion ends up with: tokens of the row it read before
        # the deletion, issued after it (so no revocation of its family covers them).
        old = gw.parts.user_store
        row = self.successResultOf(Deferred.fromCoroutine(old.get("dora")))
        assert row is not None
        self.assertEqual(gw.request("DELETE", "/api/v1/users/dora", token=admin).code, 204)
        pair = tokens.issue_pair("dora", row.roles, [], generation=row.session_generation)
        r = gw.post("/api/v1/users", {"username": "dora", "password": "another-password-2",
                                      "roles": ["user"]}, token=admin)
        self.assertEqual(r.code, 201)
        self.assertEqual(gw.get("/api/v1/users/me", token=pair.access_token).code, 401)
        self.assertEqual(gw.post("/api/v1/users/refresh",
                                 {"refresh_token": pair.refresh_token}).code, 401)
        new = gw.token("dora", "another-password-2")
        self.assertEqual(gw.get("/api/v1/users/me", token=new).code, 200)
        # After a restart too: the generations come back from the registry.
        restarted = restart(gw)
        late = restarted.tokens.issue_pair("dora", row.roles, [], generation=row.session_generation)
        self.assertRaises(SessionEnded, restarted.tokens.verify_access, late.access_token)
        self.assertEqual(restarted.tokens.verify_access(new).sub, "dora")


def restart(gw: MemoryGateway) -> GatewayParts:
    """A second gateway on *gw*'s registry and keys, started (what a restart reads)."""
    clock = MemoryReactorClock()
    clock.advance(gw.clock.seconds())
    bus = MemoryBus(clock, "gateway", broker=MemoryBroker(), record=False)
    materials = Materials(keyring=gw.parts.tokens.keyring, database=gw.database,
                          passwords=gw.passwords)
    parts = GatewayParts(gw.config, clock, bus, ModuleDirectory(bus, clock), materials)
    d = parts.start()
    assert d.called
    return parts


class RestartTests(SynchronousTestCase):
    def test_a_restarted_gateway_refuses_tokens_of_an_ended_generation(self) -> None:
        gw = MemoryGateway(test=self)
        gw.add_user("rita", PASSWORD)
        rows = gw.parts.user_store
        row = self.successResultOf(Deferred.fromCoroutine(rows.get("rita")))
        assert row is not None
        r = gw.request("PATCH", "/api/v1/users/rita", json_body={"disabled": True},
                       token=gw.token())
        self.assertEqual(r.code, 200)
        # A racing login's tokens: of the row read before the change, issued after it.
        stale = gw.parts.tokens.issue_pair("rita", row.roles, [], generation=row.session_generation)
        self.assertRaises(SessionEnded, gw.parts.tokens.verify_access, stale.access_token)
        parts = restart(gw)
        self.assertEqual(parts.tokens.generation_of("rita"), 1)
        self.assertRaises(SessionEnded, parts.tokens.verify_access, stale.access_token)
