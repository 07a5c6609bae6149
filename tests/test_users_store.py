"""The user store against a real registry file: concurrent failed logins are all counted
and a lock is never cleared by a failure that raced it."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial.unittest import TestCase

from aico.gateway.api.users.dependencies import UserStore
from aico.gateway.store import Database, migrate_sync


class UserStoreTests(TestCase):
    def setUp(self) -> None:
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        migrate_sync(path)
        self.db = Database(path, reactor)
        self.addCleanup(self.db.close)
        self.store = UserStore(self.db, reactor)

    async def test_concurrent_failures_lock_once_and_keep_the_lock(self) -> None:
        self.assertTrue(await self.store.create("kim", "hash", ("user",)))
        results = await gatherResults([
            ensureDeferred(self.store.record_failure("kim", 3, 60.0, 3600.0)) for _ in range(10)
        ])
        locks = [r for r in results if r]
        self.assertEqual(len(locks), 3)  # 10 failures, threshold 3: locked at 3, 6 and 9
        user = await self.store.get("kim")
        assert user is not None
        self.assertGreater(user.locked_until, reactor.seconds())
        self.assertEqual((user.failed_logins, user.lockouts), (1, 3))

    async def test_unknown_user_counts_nothing(self) -> None:
        self.assertEqual(await self.store.record_failure("nobody", 3, 60.0, 3600.0), 0.0)
