"""The registry database: migrations, pragmas, and queries through the thread pool."""

from __future__ import annotations

import sqlite3
import stat
import threading
from pathlib import Path
from typing import Any

from twisted.enterprise.adbapi import Transaction
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.gateway import store
from aico.gateway.store import (
    SCHEMA_VERSION,
    Database,
    SchemaError,
    SyncDatabase,
    migrate_sync,
    sync_result,
)

TABLES = {"users", "revoked_tokens", "refresh_tokens", "audit_log", "devices", "deleted_users",
          "login_failures", "pairing_windows", "sync_items", "sync_peers", "sync_acks"}


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


class MigrationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def test_fresh_file_gets_every_table_at_current_version(self) -> None:
        self.assertEqual(migrate_sync(self.path), (0, SCHEMA_VERSION))
        conn = sqlite3.connect(self.path)
        try:
            names = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            self.assertEqual(names, TABLES)
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
            self.assertEqual(
                _columns(conn, "users"),
                [
                    "username",
                    "password_hash",
                    "roles",
                    "disabled",
                    "failed_logins",
                    "locked_until",
                    "lockouts",
                    "created_at",
                    "updated_at",
                    "session_generation",
                ],
            )
            self.assertEqual(
                _columns(conn, "login_failures"),
                ["username", "source", "failures", "locked_until", "lockouts", "last_failure"],
            )
            self.assertEqual(
                _columns(conn, "devices"),
                [
                    "device_id",
                    "name",
                    "cert_pem",
                    "trusted_admin",
                    "capabilities",
                    "revoked",
                    "created_at",
                    "last_seen",
                    "paired_for",
                    "revoked_at",
                ],
            )
            self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        finally:
            conn.close()

    def test_a_version_1_registry_keeps_its_users_and_gains_generations_and_failure_counts(
        self,
    ) -> None:
        conn = store.connect_sync(self.path)
        try:
            for statement in store.MIGRATIONS[0]:
                conn.execute(statement)
            conn.execute("PRAGMA user_version = 1")
            conn.execute(
                "INSERT INTO users (username, password_hash, roles, failed_logins, locked_until, "
                "lockouts, created_at, updated_at) VALUES ('old', 'h', '[\"admin\"]', 2, 9.0, 1, 1, 1)"
            )
        finally:
            conn.close()
        self.assertEqual(migrate_sync(self.path), (1, SCHEMA_VERSION))
        db = SyncDatabase(self.path)
        self.addCleanup(db.close)
        from aico.gateway.users import UserStore

        users = UserStore(db)
        user = sync_result(users.get("old"))
        assert user is not None
        self.assertEqual((user.roles, user.session_generation), (("admin",), 0))
        self.assertEqual(sync_result(users.session_generations()), {"old": 0})
        self.assertEqual(sync_result(users.login_failures("old")), {})
        self.assertEqual(user.public()["username"], "old")

    def test_database_file_is_0600(self) -> None:
        migrate_sync(self.path)
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)

    def test_second_migration_is_a_no_op_that_writes_nothing(self) -> None:
        migrate_sync(self.path)
        before = (self.path.read_bytes(), self.path.stat().st_mtime_ns)
        self.assertEqual(migrate_sync(self.path), (SCHEMA_VERSION, SCHEMA_VERSION))
        self.assertEqual((self.path.read_bytes(), self.path.stat().st_mtime_ns), before)

    def test_newer_schema_is_refused(self) -> None:
        conn = sqlite3.connect(self.path)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.close()
        self.assertRaises(SchemaError, migrate_sync, self.path)

    def test_failed_migration_leaves_the_previous_version(self) -> None:
        broken = (*store.MIGRATIONS, ("CREATE TABLE extra (x)", "THIS IS NOT SQL"))
        migrate_sync(self.path)
        self.patch(store, "MIGRATIONS", broken)
        self.patch(store, "SCHEMA_VERSION", len(broken))
        self.assertRaises(sqlite3.OperationalError, migrate_sync, self.path)
        conn = sqlite3.connect(self.path)
        try:
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
            names = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            self.assertNotIn("extra", names)
        finally:
            conn.close()

    def test_audit_log_is_append_only(self) -> None:
        migrate_sync(self.path)
        conn = store.connect_sync(self.path)
        try:
            conn.execute(
                "INSERT INTO audit_log (ts, event, actor, detail, prev_hash, hash)"
                " VALUES (1, 'login', 'admin', '{}', '', 'h')"
            )
            self.assertRaises(
                sqlite3.IntegrityError, conn.execute, "UPDATE audit_log SET actor = 'x'"
            )
            self.assertRaises(sqlite3.IntegrityError, conn.execute, "DELETE FROM audit_log")
            self.assertEqual(conn.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0], 1)
        finally:
            conn.close()


class DatabaseTests(TestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        migrate_sync(self.path)
        self.db = Database(self.path, reactor=reactor)  # type: ignore[arg-type]
        self.addCleanup(self.db.close)

    @inlineCallbacks
    def test_operation_then_query_round_trip_through_a_real_file(self) -> Any:
        yield self.db.run_operation(
            "INSERT INTO users (username, password_hash, roles, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?)",
            ("alice", "h", '["user"]', 1.0, 1.0),
        )
        rows = yield self.db.run_query(
            "SELECT username, roles, disabled FROM users WHERE username = :u", {"u": "alice"}
        )
        self.assertEqual(rows, [("alice", '["user"]', 0)])
        # Committed: another connection sees it.
        conn = sqlite3.connect(self.path)
        try:
            self.assertEqual(conn.execute("SELECT COUNT(*) FROM users").fetchone()[0], 1)
        finally:
            conn.close()

    @inlineCallbacks
    def test_interaction_runs_off_the_reactor_thread_and_rolls_back_on_error(self) -> Any:
        main = threading.get_ident()

        def insert_then_fail(txn: Transaction, name: str) -> None:
            self.assertNotEqual(threading.get_ident(), main)
            txn.execute(
                "INSERT INTO devices (device_id, name, cert_pem, created_at) VALUES (?, ?, ?, ?)",
                ("ID", name, "pem", 1.0),
            )
            raise ValueError("boom")

        yield self.assertFailure(self.db.run_interaction(insert_then_fail, "phone"), ValueError)
        rows = yield self.db.run_query("SELECT COUNT(*) FROM devices")
        self.assertEqual(rows, [(0,)])

    @inlineCallbacks
    def test_interaction_returns_its_result(self) -> Any:
        def count(txn: Transaction) -> int:
            txn.execute("SELECT COUNT(*) FROM users")
            return int(txn.fetchone()[0])

        result = yield self.db.run_interaction(count)
        self.assertEqual(result, 0)

    @inlineCallbacks
    def test_connection_has_foreign_keys_and_busy_timeout(self) -> Any:
        rows = yield self.db.run_query("PRAGMA foreign_keys")
        self.assertEqual(rows, [(1,)])
        rows = yield self.db.run_query("PRAGMA busy_timeout")
        self.assertEqual(rows, [(store.BUSY_TIMEOUT_MS,)])
        rows = yield self.db.run_query("PRAGMA journal_mode")
        self.assertEqual(rows, [("wal",)])

    @inlineCallbacks
    def test_in_memory_database_works_for_tests(self) -> Any:
        db = Database(":memory:", reactor=reactor)  # type: ignore[arg-type]
        self.addCleanup(db.close)
        yield db.run_operation("CREATE TABLE t (x INTEGER)")
        yield db.run_operation("INSERT INTO t VALUES (?)", (7,))
        rows = yield db.run_query("SELECT x FROM t")
        self.assertEqual(rows, [(7,)])


def _schema(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    rows = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
    return [(t, n, s) for t, n, s in rows]


class SyncDatabaseTests(SynchronousTestCase):
    """The synchronous DatabaseLike of the bootstrap, the CLI and the unit tests."""

    def setUp(self) -> None:
        self.db = SyncDatabase()
        self.addCleanup(self.db.close)

    def test_it_has_exactly_the_migrated_schema_triggers_and_indexes_included(self) -> None:
        path = Path(self.mktemp())
        migrate_sync(path)
        conn = sqlite3.connect(path)
        try:
            expected = _schema(conn)
        finally:
            conn.close()
        self.assertEqual(_schema(self.db.conn), expected)
        kinds = {t for t, _, _ in expected}
        self.assertEqual(kinds, {"table", "index", "trigger"})
        self.assertEqual(self.db.migrated, (0, SCHEMA_VERSION))

    def test_a_file_is_created_0600_and_migrated_once(self) -> None:
        path = Path(self.mktemp())
        first = SyncDatabase(path)
        first.close()
        self.assertEqual(first.migrated, (0, SCHEMA_VERSION))
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        again = SyncDatabase(path)
        self.addCleanup(again.close)
        self.assertEqual(again.migrated, (SCHEMA_VERSION, SCHEMA_VERSION))

    def test_a_newer_file_is_refused(self) -> None:
        path = Path(self.mktemp())
        conn = sqlite3.connect(path)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.close()
        self.assertRaises(SchemaError, SyncDatabase, path)

    def test_every_answer_has_already_fired(self) -> None:
        self.assertIsNone(
            self.successResultOf(
                self.db.run_operation(
                    "INSERT INTO revoked_tokens (jti, expires_at) VALUES (?, ?)", ("a", 1.0)
                )
            )
        )
        self.assertEqual(
            self.successResultOf(self.db.run_query("SELECT jti, expires_at FROM revoked_tokens")),
            [("a", 1.0)],
        )
        self.failureResultOf(self.db.run_query("SELECT nothing FROM nowhere"), sqlite3.Error)
        self.failureResultOf(
            self.db.run_operation("INSERT INTO revoked_tokens (jti, expires_at) VALUES ('a', 2)"),
            sqlite3.IntegrityError,
        )

    def test_interaction_commits_its_result_or_rolls_back(self) -> None:
        def add(cursor: sqlite3.Cursor, jti: str, fail: bool) -> int:
            cursor.execute("INSERT INTO revoked_tokens (jti, expires_at) VALUES (?, 1)", (jti,))
            if fail:
                raise ValueError("boom")
            return int(cursor.execute("SELECT COUNT(*) FROM revoked_tokens").fetchone()[0])

        self.assertEqual(self.successResultOf(self.db.run_interaction(add, "a", False)), 1)
        self.failureResultOf(self.db.run_interaction(add, "b", True), ValueError)
        self.assertFalse(self.db.conn.in_transaction)
        self.assertEqual(
            self.successResultOf(self.db.run_query("SELECT jti FROM revoked_tokens")), [("a",)]
        )

    def test_sync_result_takes_a_stores_coroutine_at_once(self) -> None:
        async def count() -> int:
            rows = await self.db.run_query("SELECT COUNT(*) FROM users")
            return int(rows[0][0])

        async def broken() -> None:
            await self.db.run_query("SELECT nothing FROM nowhere")

        self.assertEqual(sync_result(count()), 0)
        self.assertEqual(sync_result(self.db.run_query("SELECT 1")), [(1,)])
        self.assertRaises(sqlite3.OperationalError, sync_result, broken())

    def test_sync_result_refuses_work_that_waits_for_a_reactor(self) -> None:
        waiting: Deferred[int] = Deferred()
        self.assertRaises(RuntimeError, sync_result, waiting)
        self.assertTrue(waiting.called)  # cancelled: nothing is left waiting
