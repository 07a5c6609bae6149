"""Bootstrap secret hygiene: STATE_DIR/initial-admin-password is removed once the admin
has a password of their own — when it is changed through the API, and at start when the
file no longer opens ``admin`` — and the "ready" line stops pointing to it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from aico.gateway.security.passwords import hash_password
from aico.gateway.state import bootstrap
from aico.gateway.store import SyncDatabase, sync_result
from aico.gateway.testing.harness import http_client, login, start_gateway
from aico.gateway.testing.memory import CHEAP_HASHER
from aico.gateway.users import UserStore
from aico.keystore import TEST_KDF

NEW_PASSWORD = "a-password-of-my-own-42"


class BootstrapPasswordTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.lines: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "aico.gateway.composition":
                from twisted.logger import formatEvent

                self.lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def ready_line(self) -> str:
        ready = [line for line in self.lines if line.startswith("aico-gateway ready")]
        self.assertEqual(len(ready), 1, self.lines)
        return ready[0]

    def state(self) -> Path:
        root = Path(self.mktemp())
        bootstrap(root, ("conversation", "health"), kdf=TEST_KDF, env={"AICO_NO_KEYRING": "1"})
        return root

    def set_admin_password(self, root: Path, password: str) -> None:
        db = SyncDatabase(root / "registry.db")
        try:
            sync_result(UserStore(db).update(
                "admin", password_hash=hash_password(password, CHEAP_HASHER)))
        finally:
            db.close()

    async def test_the_file_is_kept_and_named_while_it_still_opens_admin(self) -> None:
        gw = await start_gateway(self)
        password_file = gw.state_dir / "initial-admin-password"
        self.assertTrue(password_file.exists())
        self.assertIn(str(password_file), self.ready_line())

    async def test_changing_admins_password_through_the_api_removes_the_file(self) -> None:
        gw = await start_gateway(self)
        password_file = gw.state_dir / "initial-admin-password"
        http = http_client(self)
        tokens = await login(http, gw.base, "admin", gw.admin_password)
        auth = {"Authorization": f"Bearer {tokens['access_token']}"}
        r = await http.patch(gw.base + "/api/v1/users/admin", json={"password": NEW_PASSWORD},
                             headers=auth)
        self.assertEqual(r.code, 200, await r.content())
        self.assertFalse(password_file.exists())
        self.assertFalse(gw.parts.bootstrap_password_present)
        await login(http, gw.base, "admin", NEW_PASSWORD)

    async def test_changing_another_users_password_keeps_the_file(self) -> None:
        gw = await start_gateway(self)
        http = http_client(self)
        tokens = await login(http, gw.base, "admin", gw.admin_password)
        auth = {"Authorization": f"Bearer {tokens['access_token']}"}
        r = await http.post(gw.base + "/api/v1/users", headers=auth,
                            json={"username": "bob", "password": NEW_PASSWORD,
                                  "roles": ["user"]})
        self.assertEqual(r.code, 201, await r.content())
        r = await http.patch(gw.base + "/api/v1/users/bob", headers=auth,
                             json={"password": NEW_PASSWORD + "x"})
        self.assertEqual(r.code, 200, json.loads(await r.content()))
        self.assertTrue((gw.state_dir / "initial-admin-password").exists())

    async def test_a_stale_file_is_removed_at_start_and_not_named_in_the_ready_line(
            self) -> None:
        root = self.state()
        password_file = root / "initial-admin-password"
        self.set_admin_password(root, NEW_PASSWORD)  # e.g. changed while the gateway was down
        self.assertTrue(password_file.exists())
        gw = await start_gateway(self, state_dir=root)
        self.assertFalse(password_file.exists())
        line = self.ready_line()
        self.assertNotIn("initial-admin-password", line)
        self.assertNotIn("bootstrap admin password", line)
        http = http_client(self)
        await login(http, gw.base, "admin", NEW_PASSWORD)

    async def test_a_start_without_the_file_does_not_name_it(self) -> None:
        root = self.state()
        (root / "initial-admin-password").unlink()
        await start_gateway(self, state_dir=root)
        self.assertNotIn("initial-admin-password", self.ready_line())
