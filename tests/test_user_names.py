"""Names that look like routes: a user named like a static segment under
``/api/v1/users/`` (``me``, ``refresh``, ``logout``, ``authenticate``) could not be
managed at ``/api/v1/users/{username}`` (the static route wins), so such names are
refused at creation with a 400 problem that names the reason."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from aico.gateway.testing.memory import MemoryGateway
from aico.gateway.users import RESERVED_USERNAMES

BASE = "/api/v1/users"


class ReservedNameTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = MemoryGateway(test=self)
        self.admin = self.gw.token()

    def test_names_of_routes_are_refused_at_creation_with_the_reason(self) -> None:
        for name in ("me", "refresh", "logout", "authenticate"):
            r = self.gw.post(BASE, {"username": name, "password": "a-long-password-1",
                                    "roles": ["user"]}, token=self.admin)
            self.assertEqual(r.code, 400, name)
            problem = r.json()
            self.assertEqual(problem["code"], "validation_failed")
            self.assertEqual(problem["errors"][0]["pointer"], "/username")
            self.assertIn("reserved", problem["detail"])
            self.assertIn(f"{BASE}/{name}", problem["errors"][0]["detail"])
        names = [u["username"] for u in self.gw.get(BASE, token=self.admin).json()["users"]]
        self.assertEqual(names, ["admin"])

    def test_every_static_segment_under_the_users_routes_is_reserved(self) -> None:
        segments = {e.path[len(BASE) + 1:].split("/")[0]
                    for e in self.gw.parts.dispatcher.table.entries
                    if e.path.startswith(BASE + "/") and "{" not in e.path.split("/")[4]}
        self.assertEqual(segments, {"me", "refresh", "logout", "authenticate"})
        self.assertLessEqual(segments, RESERVED_USERNAMES)

    def test_names_that_only_resemble_routes_are_allowed_and_managed(self) -> None:
        for name in ("Me", "me2", "refresh-bot"):
            r = self.gw.post(BASE, {"username": name, "password": "a-long-password-1",
                                    "roles": ["user"]}, token=self.admin)
            self.assertEqual(r.code, 201, r.body)
            r = self.gw.request("PATCH", f"{BASE}/{name}", json_body={"disabled": True},
                                token=self.admin)
            self.assertEqual((r.code, r.json()["disabled"]), (200, True))
            self.assertEqual(self.gw.request("DELETE", f"{BASE}/{name}", token=self.admin).code, 204)
