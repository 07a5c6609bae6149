"""``aico-gateway user add/list/unlock`` and ``keys rotate``, and a running gateway picking
up a rotated key on SIGHUP while tokens signed with the old key stay valid, and an unlock
at once."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import jwt
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from aico.gateway.cli import main
from aico.gateway.security.audit import AuditLog
from aico.gateway.security.passwords import verify_password
from aico.gateway.state import StatePaths, bootstrap
from aico.gateway.store import SyncDatabase, sync_result
from aico.gateway.testing.harness import http_client, login, start_gateway
from aico.gateway.users import UserStore
from aico.keystore import TEST_KDF


def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    import sys

    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        code = main(list(argv), stdout=out, stderr=err, environ={"AICO_NO_KEYRING": "1"})
    finally:
        sys.stdin = old
    return code, out.getvalue(), err.getvalue()


class UserCommandTests(TestCase):
    def setUp(self) -> None:
        self.state = Path(self.mktemp())
        bootstrap(self.state, ["conversation"], kdf=TEST_KDF, env={"AICO_NO_KEYRING": "1"})

    def test_user_add_then_list(self) -> None:
        code, out, _ = run("user", "add", "grace", "--role", "user", "--role", "device",
                           "--state-dir", str(self.state), stdin="a-very-good-password\n")
        self.assertEqual(code, 0)
        self.assertNotIn("a-very-good-password", out)
        code, out, _ = run("user", "list", "--state-dir", str(self.state))
        self.assertEqual(code, 0)
        self.assertIn("grace\tuser,device", out)
        self.assertIn("admin\tadmin", out)

    def test_user_add_writes_through_the_gateways_user_store(self) -> None:
        before = time.time()
        code, _, _ = run("user", "add", "judy", "--role", "admin", "--role", "device",
                         "--state-dir", str(self.state), stdin="a-very-good-password\n")
        self.assertEqual(code, 0)
        db = SyncDatabase(StatePaths(self.state).registry_db)
        self.addCleanup(db.close)
        user = sync_result(UserStore(db).get("judy"))
        assert user is not None
        self.assertEqual(
            (user.username, user.roles, user.disabled, user.session_generation),
            ("judy", ("admin", "device"), False, 0),
        )
        self.assertTrue(verify_password(user.password_hash, "a-very-good-password"))
        self.assertEqual(user.created_at, user.updated_at)
        self.assertGreaterEqual(user.created_at, before)

    def test_user_list_shows_what_the_user_store_holds(self) -> None:
        db = SyncDatabase(StatePaths(self.state).registry_db)
        self.addCleanup(db.close)
        store = UserStore(db)
        self.assertTrue(sync_result(store.create("mallory", "hash", ("service",))))
        self.assertTrue(sync_result(store.update("mallory", disabled=True)))
        code, out, _ = run("user", "list", "--state-dir", str(self.state))
        self.assertEqual(code, 0)
        self.assertEqual(out, "admin\tadmin\nmallory\tservice  (disabled)\n")

    def test_user_commands_need_an_initialised_registry(self) -> None:
        empty = Path(self.mktemp())
        code, _, err = run("user", "list", "--state-dir", str(empty))
        self.assertEqual((code, "run `aico-gateway init` first" in err), (1, True))
        code, _, err = run("user", "add", "kim", "--state-dir", str(empty),
                           stdin="a-very-good-password\n")
        self.assertEqual((code, "run `aico-gateway init` first" in err), (1, True))
        self.assertFalse(StatePaths(empty).registry_db.exists())

    def test_duplicate_and_weak_passwords_are_refused(self) -> None:
        run("user", "add", "heidi", "--state-dir", str(self.state), stdin="a-very-good-password\n")
        code, _, err = run("user", "add", "heidi", "--state-dir", str(self.state), stdin="another-good-one\n")
        self.assertEqual((code, "already exists" in err), (1, True))
        code, _, err = run("user", "add", "ivan", "--state-dir", str(self.state), stdin="short\n")
        self.assertEqual((code, "password" in err), (2, True))

    def test_names_of_routes_are_refused(self) -> None:
        for name in ("me", "refresh", "logout", "authenticate"):
            code, _, err = run("user", "add", name, "--state-dir", str(self.state),
                               stdin="a-very-good-password\n")
            self.assertEqual(code, 2, err)
            self.assertIn(f"'{name}' is reserved: /api/v1/users/{name} is a route", err)
        code, out, _ = run("user", "list", "--state-dir", str(self.state))
        self.assertEqual(out, "admin\tadmin\n")

    def test_user_unlock_clears_every_lock_of_the_account_and_is_audited(self) -> None:
        db = SyncDatabase(StatePaths(self.state).registry_db)
        self.addCleanup(db.close)
        store = UserStore(db)
        sync_result(store.create("kim", "hash", ("user",)))
        for source in ("loopback", "192.0.2.7", "loopback", "192.0.2.7"):
            sync_result(store.record_failure(source=source, username="kim", threshold=2,
                                             base=60.0, longest=3600.0))
        sync_result(store.record_failure("admin", "loopback", 2, 60.0, 3600.0))
        self.assertEqual(sorted(sync_result(store.login_failures("kim"))), ["192.0.2.7", "loopback"])
        code, out, err = run("user", "unlock", "kim", "--state-dir", str(self.state))
        self.assertEqual(code, 0, err)
        self.assertIn("unlocked kim", out)
        self.assertEqual(sync_result(store.login_failures("kim")), {})
        self.assertEqual(list(sync_result(store.login_failures("admin"))), ["loopback"])  # untouched
        audit = AuditLog(db, Clock(), anchor_path=self.state / "audit-head.json")
        entry = sync_result(audit.latest(1))[0]
        self.assertEqual((entry.event, entry.actor, entry.detail),
                         ("account_unlocked", "cli", {"username": "kim", "sources": 2}))
        self.assertTrue(sync_result(audit.verify()).ok)
        code, _, err = run("user", "unlock", "nobody", "--state-dir", str(self.state))
        self.assertEqual((code, "no user 'nobody'" in err), (1, True))


class RunningGatewayUnlockTests(TestCase):
    timeout = 60

    async def test_a_running_gateway_accepts_the_right_password_at_once_after_an_unlock(self) -> None:
        gw = await start_gateway(self, "[auth]\nlockout_threshold = 2\nlockout_base = 600.0\n")
        anon = http_client(self)

        async def attempt(password: str) -> int:
            r = await anon.post(gw.base + "/api/v1/users/authenticate",
                                json={"username": "admin", "password": password})
            await r.content()
            return int(r.code)

        self.assertEqual([await attempt("a-guess"), await attempt("a-guess")], [401, 401])
        self.assertEqual(await attempt(gw.admin_password), 401)  # locked for loopback
        code, _, err = run("user", "unlock", "admin", "--state-dir", str(gw.state_dir))
        self.assertEqual(code, 0, err)
        self.assertEqual(await attempt(gw.admin_password), 200)


class KeyRotationTests(TestCase):
    timeout = 60

    async def test_rotated_key_signs_after_sighup_and_old_tokens_stay_valid(self) -> None:
        gw = await start_gateway(self)
        anon = http_client(self)
        old = await login(anon, gw.base, "admin", gw.admin_password)
        old_kid = jwt.get_unverified_header(old["access_token"])["kid"]
        code, out, _ = run("keys", "rotate", "--state-dir", str(gw.state_dir))
        self.assertEqual(code, 0, out)
        await gw.service.reload()  # what SIGHUP does
        await gw.parts.reload_keys()  # type: ignore[union-attr]
        new = await login(anon, gw.base, "admin", gw.admin_password)
        new_kid = jwt.get_unverified_header(new["access_token"])["kid"]
        self.assertNotEqual(new_kid, old_kid)
        for token in (old["access_token"], new["access_token"]):
            r = await anon.get(gw.base + "/api/v1/users/me", headers={"Authorization": f"Bearer {token}"})
            self.assertEqual(r.code, 200)
            await r.content()
        r = await anon.get(gw.base + "/.well-known/jwks.json")
        kids = {k["kid"] for k in json.loads(await r.content())["keys"]}
        self.assertEqual(kids, {old_kid, new_kid})
