"""Role → capability sets are computed once per role mapping, and a changed role applies
to the very next request (config reload, or the mapping changed in place).

A user's own role change ends their sessions at once (session generations):
tests/test_sessions_follow_account.py proves that, with the cache in place.
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from aico.gateway.security.capabilities import CapabilityCache, capabilities_for, grants
from aico.gateway.testing.memory import MEMORY_CONFIG, MemoryGateway

PASSWORD = "a-long-password-1"


class CapabilityCacheTests(SynchronousTestCase):
    def test_it_answers_what_capabilities_for_and_grants_answer(self) -> None:
        mapping = {"user": ("users:self", "echo:*"), "admin": ("*",), "device": ()}
        cache = CapabilityCache()
        token_caps = ("users:self", "echo:write", "admin:users", "other")
        for roles in [(), ("user",), ("admin",), ("user", "admin"), ("nobody",), ("device",)]:
            expected = capabilities_for(roles, mapping)
            self.assertEqual(cache.for_roles(roles, mapping), expected)
            self.assertEqual(cache.narrowed(roles, token_caps, mapping),
                             frozenset(c for c in token_caps if grants(expected, c)))

    def test_a_new_mapping_or_one_changed_in_place_is_used_at_once(self) -> None:
        cache = CapabilityCache()
        mapping: dict[str, tuple[str, ...]] = {"user": ("users:self", "echo:write")}
        caps = ("users:self", "echo:write")
        self.assertEqual(cache.narrowed(("user",), caps, mapping), frozenset(caps))
        reloaded = {"user": ("users:self",)}
        self.assertEqual(cache.narrowed(("user",), caps, reloaded), frozenset({"users:self"}))
        self.assertEqual(cache.for_roles(("user",), reloaded), frozenset({"users:self"}))
        reloaded["user"] = ()
        self.assertEqual(cache.narrowed(("user",), caps, reloaded), frozenset())
        self.assertEqual(cache.for_roles(("user",), reloaded), frozenset())

    def test_it_stays_bounded(self) -> None:
        cache = CapabilityCache(size=4)
        mapping = {"r": ("a",)}
        for i in range(50):
            cache.narrowed(("r", str(i)), ("a", str(i)), mapping)
        self.assertLessEqual(len(cache._roles), 4)
        self.assertLessEqual(len(cache._narrowed), 4)


class RoleChangeAppliesAtOnceTests(SynchronousTestCase):
    def gateway(self, user_caps: str) -> tuple[MemoryGateway, Path]:
        path = Path(self.mktemp())
        path.write_text(MEMORY_CONFIG + f"[roles]\nuser = [{user_caps}]\n")
        gw = MemoryGateway(test=self, config_path=str(path))
        gw.add_user("ursula", PASSWORD, ("user",))
        return gw, path

    def reload(self, gw: MemoryGateway, path: Path, user_caps: str) -> None:
        path.write_text(MEMORY_CONFIG + f"[roles]\nuser = [{user_caps}]\n")
        r = gw.admin_request("POST", "/admin/api/config/reload", token=gw.token())
        self.assertEqual(r.code, 200, r.body)
        self.assertIn("roles", r.json()["live"])

    def test_a_capability_taken_from_a_role_by_a_reload_is_refused_on_the_next_request(
            self) -> None:
        gw, path = self.gateway('"users:self", "conversations:write"')
        token = gw.token("ursula", PASSWORD)
        self.assertEqual(gw.get("/api/v1/users/me", token=token).code, 200)
        self.assertEqual(gw.get("/api/v1/users/me", token=token).code, 200)  # cached now
        self.reload(gw, path, '"conversations:write"')
        r = gw.get("/api/v1/users/me", token=token)
        self.assertEqual(r.code, 403, r.body)
        self.assertEqual(r.json()["code"], "forbidden")
        # given back by the next reload: the same token (it still carries it) works again
        self.reload(gw, path, '"users:self", "conversations:write"')
        self.assertEqual(gw.get("/api/v1/users/me", token=token).code, 200)

    def test_the_same_holds_over_a_websocket_that_is_already_authenticated(self) -> None:
        gw, path = self.gateway('"users:self", "conversations:write"')
        token = gw.token("ursula", PASSWORD)
        ws = gw.websocket(headers={"Authorization": f"Bearer {token}"})
        ws.recv_all()
        ws.send({"type": "request", "id": 1, "method": "GET", "path": "/api/v1/users/me"})
        self.assertEqual(ws.recv()["status"], 200)
        self.reload(gw, path, '"conversations:write"')
        ws.send({"type": "request", "id": 2, "method": "GET", "path": "/api/v1/users/me"})
        self.assertEqual(ws.recv()["status"], 403)
