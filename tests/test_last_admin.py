"""The last admin stays: the last-enabled-admin check and the write are one transaction,
so concurrent demotions, disables and deletions of the last admins leave one (409 for
the change that would have removed it).

Once on a real gateway (the registry a real SQLite file behind the database thread),
with the requests handed to its dispatcher in the same reactor turn, so that each one's
database work queues behind the other's; once in memory, with the registry stepped by
hand (:class:`~tests.stepping.Stepper`).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.gateway.routing.messages import Request, Response, request_id_from
from aico.gateway.state import StatePaths
from aico.gateway.store import Database
from aico.gateway.testing.harness import http_client, login, start_gateway
from aico.gateway.testing.memory import MemoryGateway, MemoryResponse
from tests.stepping import Stepper

PASSWORD = "an-admins-password-1"


def admin_request(method: str, username: str, token: str, body: Any = None) -> Request:
    headers = {"authorization": f"Bearer {token}"}
    if body is not None:
        headers["content-type"] = "application/json"
    return Request(method, f"/api/v1/users/{username}", request_id_from(None), "http",
                   peer_host="127.0.0.1", loopback=True, headers=headers,
                   body=b"" if body is None else json.dumps(body).encode())


class RealRegistryTests(TestCase):
    timeout = 60

    async def start(self, admins: list[str]) -> tuple[Any, dict[str, str]]:
        gw = await start_gateway(self)
        self.assertIsInstance(gw.parts.db, Database)
        http = http_client(self)
        tokens = {"admin": (await login(http, gw.base, "admin", gw.admin_password))["access_token"]}
        for name in admins:
            r = await http.post(gw.base + "/api/v1/users",
                                json={"username": name, "password": PASSWORD, "roles": ["admin"]},
                                headers={"Authorization": f"Bearer {tokens['admin']}"})
            self.assertEqual(r.code, 201, await r.content())
            tokens[name] = (await login(http, gw.base, name, PASSWORD))["access_token"]
        return gw, tokens

    def enabled_admins(self, gw: Any) -> list[str]:
        """Read from the registry file itself, by another connection."""
        conn = sqlite3.connect(StatePaths(gw.state_dir).registry_db)
        try:
            rows = conn.execute("SELECT username, roles, disabled FROM users").fetchall()
        finally:
            conn.close()
        return [name for name, roles, disabled in rows if "admin" in json.loads(roles) and not disabled]

    async def test_two_concurrent_demotions_of_the_last_two_admins_leave_one(self) -> None:
        gw, tokens = await self.start(["rb0"])
        handle = gw.parts.dispatcher.handle
        answers: list[Response] = await gatherResults([
            handle(admin_request("PATCH", "rb0", tokens["admin"], {"roles": ["user"]})),
            handle(admin_request("PATCH", "admin", tokens["rb0"], {"roles": ["user"]})),
        ])
        self.assertEqual(sorted(a.status for a in answers), [200, 409])
        refused = next(a for a in answers if a.status == 409)
        self.assertEqual(json.loads(refused.body)["code"], "conflict")
        self.assertEqual(len(self.enabled_admins(gw)), 1)

    async def test_concurrent_disable_delete_and_demotion_of_the_last_admins_leave_one(self) -> None:
        gw, tokens = await self.start(["rb0", "rc0"])
        handle = gw.parts.dispatcher.handle
        answers: list[Response] = await gatherResults([
            handle(admin_request("PATCH", "rb0", tokens["admin"], {"disabled": True})),
            handle(admin_request("DELETE", "rc0", tokens["rb0"])),
            handle(admin_request("PATCH", "admin", tokens["rc0"], {"roles": ["user"]})),
        ])
        self.assertEqual(sorted(a.status for a in answers), [200, 204, 409])
        self.assertEqual(len(self.enabled_admins(gw)), 1)


class InMemoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = MemoryGateway(test=self)
        self.stepper = Stepper(self.gw.database)
        self.stepper.install(self, self.gw)

    def concurrently(self, *requests: tuple[str, str, str, Any]) -> list[int]:
        """Send every ``(method, user, token, body)`` at once, then let their registry
        work run one call at a time, in the order it was asked for."""
        self.stepper.holding = True
        sent: list[Deferred[MemoryResponse]] = [
            self.gw.send(method, f"/api/v1/users/{user}", json_body=body, token=token)
            for method, user, token, body in requests]
        self.gw.settle()
        while self.stepper.step():
            self.gw.settle()
        self.stepper.holding = False
        return [self.successResultOf(d).code for d in sent]

    def admins(self) -> list[str]:
        users = self.gw.get("/api/v1/users", token=self.gw.token()).json()["users"]
        return [u["username"] for u in users if "admin" in u["roles"] and not u["disabled"]]

    def test_two_concurrent_demotions_of_the_last_two_admins_leave_one(self) -> None:
        self.gw.add_user("rb0", PASSWORD, ("admin",))
        admin, rb0 = self.gw.token(), self.gw.token("rb0", PASSWORD)
        codes = self.concurrently(("PATCH", "rb0", admin, {"roles": ["user"]}),
                                  ("PATCH", "admin", rb0, {"roles": ["user"]}))
        self.assertEqual(sorted(codes), [200, 409])
        self.assertEqual(len(self.admins()), 1)

    def test_a_concurrent_delete_and_disable_of_the_last_two_admins_leave_one(self) -> None:
        self.gw.add_user("rb0", PASSWORD, ("admin",))
        admin, rb0 = self.gw.token(), self.gw.token("rb0", PASSWORD)
        codes = self.concurrently(("DELETE", "rb0", admin, None),
                                  ("PATCH", "admin", rb0, {"disabled": True}))
        self.assertEqual(sorted(codes), [204, 409])
        self.assertEqual(len(self.admins()), 1)
