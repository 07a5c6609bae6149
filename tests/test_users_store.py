"""The user store against a real registry file: concurrent failed logins are all counted,
a lock is never cleared by a failure that raced it, and the bootstrap's first user is
created only into an empty table."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.gateway.store import Database, SyncDatabase, migrate_sync, sync_result
from aico.gateway.users import UserStore


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


class FirstUserTests(SynchronousTestCase):
    """``create_first``: the bootstrap's ``admin``, created only while the table is empty."""

    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = SyncDatabase(self.path)
        self.addCleanup(self.db.close)
        self.store = UserStore(self.db)

    def test_only_into_an_empty_table(self) -> None:
        self.assertEqual(sync_result(self.store.count()), 0)
        self.assertTrue(sync_result(self.store.create_first("admin", "h", ("admin",))))
        self.assertFalse(sync_result(self.store.create_first("admin2", "h", ("admin",))))
        self.assertTrue(sync_result(self.store.create("grace", "h", ("user",))))
        self.assertTrue(sync_result(self.store.delete("admin")))
        self.assertFalse(sync_result(self.store.create_first("admin", "h", ("admin",))))
        self.assertEqual([u.username for u in sync_result(self.store.list())], ["grace"])

    def test_two_processes_that_both_saw_an_empty_table_create_one_user(self) -> None:
        other = SyncDatabase(self.path)  # a second connection, as another process has
        self.addCleanup(other.close)
        stores = (self.store, UserStore(other))
        self.assertEqual([sync_result(s.count()) for s in stores], [0, 0])
        made = [sync_result(s.create_first("admin", f"h{i}", ("admin",))) for i, s in enumerate(stores)]
        self.assertEqual(made, [True, False])
        self.assertEqual(sync_result(UserStore(other).count()), 1)

    def test_the_user_has_the_stores_usual_fields(self) -> None:
        sync_result(self.store.create_first("admin", "hash", ("admin",)))
        user = sync_result(self.store.get("admin"))
        assert user is not None
        self.assertEqual(
            (user.username, user.password_hash, user.roles, user.disabled, user.failed_logins,
             user.locked_until, user.lockouts),
            ("admin", "hash", ("admin",), False, 0, 0.0, 0),
        )
        self.assertEqual(user.created_at, user.updated_at)
