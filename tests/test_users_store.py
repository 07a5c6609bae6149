"""The user store against a real registry file: concurrent failed logins are all counted,
a lock is never cleared by a failure that raced it, the last enabled admin stays under
concurrent changes, session generations go up with every change that ends sessions, and
the bootstrap's first user is created only into an empty table."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.gateway.store import Database, SyncDatabase, migrate_sync, sync_result
from aico.gateway.users import NoAdminLeft, UserStore


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
            ensureDeferred(self.store.record_failure("kim", "loopback", 3, 60.0, 3600.0))
            for _ in range(10)
        ])
        locks = [r for r in results if r]
        self.assertEqual(len(locks), 3)  # 10 failures, threshold 3: locked at 3, 6 and 9
        failures, locked_until, level = (await self.store.login_failures("kim"))["loopback"]
        self.assertGreater(locked_until, reactor.seconds())
        self.assertEqual((failures, level), (1, 3))
        _, lock = await self.store.login_state("kim", "loopback")
        self.assertEqual(lock, locked_until)
        _, other = await self.store.login_state("kim", "192.0.2.7")
        self.assertEqual(other, 0.0)

    async def test_unknown_user_counts_nothing(self) -> None:
        self.assertEqual(await self.store.record_failure("nobody", "loopback", 3, 60.0, 3600.0), 0.0)
        self.assertEqual(await self.store.login_failures("nobody"), {})

    async def test_concurrent_demotions_of_the_last_two_admins_leave_one(self) -> None:
        for name in ("ra0", "rb0"):
            self.assertTrue(await self.store.create(name, "hash", ("admin",)))
        outcomes = await gatherResults([
            ensureDeferred(self.store.update(name, roles=("user",), keep_an_admin=True))
            .addCallbacks(lambda change: "changed",
                          lambda f: f.trap(NoAdminLeft) and "refused")
            for name in ("ra0", "rb0")
        ])
        self.assertEqual(sorted(outcomes), ["changed", "refused"])
        admins = [u.username for u in await self.store.list() if u.enabled_admin]
        self.assertEqual(len(admins), 1)

    async def test_disabling_deleting_and_demoting_the_last_admin_concurrently_leave_one(self) -> None:
        for name in ("ra0", "rb0", "rc0"):
            self.assertTrue(await self.store.create(name, "hash", ("admin",)))
        outcomes = await gatherResults([
            ensureDeferred(work).addCallbacks(lambda change: "changed",
                                              lambda f: f.trap(NoAdminLeft) and "refused")
            for work in (self.store.update("ra0", disabled=True, keep_an_admin=True),
                         self.store.delete("rb0", keep_an_admin=True),
                         self.store.update("rc0", roles=("user",), keep_an_admin=True))
        ])
        self.assertEqual(sorted(outcomes), ["changed", "changed", "refused"])
        admins = [u.username for u in await self.store.list() if u.enabled_admin]
        self.assertEqual(len(admins), 1)


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
            (user.username, user.password_hash, user.roles, user.disabled, user.session_generation),
            ("admin", "hash", ("admin",), False, 0),
        )
        self.assertEqual(user.created_at, user.updated_at)
