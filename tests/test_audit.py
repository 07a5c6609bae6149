"""The hash-chained audit log: chain, tamper detection, serialised appends, secret guard."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from aico.gateway.security.audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditLog,
    AuditSecretError,
    VerifyResult,
)
from aico.gateway.store import SyncDatabase

T = TypeVar("T")


class ManualSqlite(SyncDatabase):
    """Interactions wait until the test runs them, like a slow thread pool."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def run_interaction(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        self.pending.append((fn, args, d))
        return d

    def run_next(self) -> None:
        fn, args, d = self.pending.pop(0)
        SyncDatabase.run_interaction(self, fn, *args).chainDeferred(d)


class AuditTestBase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000.25)
        self.db = SyncDatabase()
        self.audit = AuditLog(self.db, self.clock)

    def append(self, event: str = "login", actor: str = "alice", **detail: Any) -> AuditEntry:
        entry = self.successResultOf(self.audit.append(event, actor, detail))
        self.clock.advance(1.5)
        return entry

    def fill(self, n: int = 5) -> list[AuditEntry]:
        return [self.append("login", f"user{i}", ip="127.0.0.1", n=i) for i in range(n)]

    def verify(self, audit: AuditLog | None = None) -> VerifyResult:
        return self.successResultOf((audit or self.audit).verify())

    def sql(self, statement: str, *params: Any) -> None:
        self.db.conn.execute(statement, params)
        self.db.conn.commit()


class ChainTests(AuditTestBase):
    def test_entries_form_a_sha256_chain_from_the_genesis_hash(self) -> None:
        entries = self.fill(3)
        self.assertEqual([e.seq for e in entries], [1, 2, 3])
        prev = GENESIS_HASH
        for e in entries:
            self.assertEqual(e.prev_hash, prev)
            body = json.dumps(
                [e.seq, e.ts, e.event, e.actor, dict(e.detail)],
                sort_keys=True,
                separators=(",", ":"),
                ensure_ascii=False,
            )
            self.assertEqual(e.hash, hashlib.sha256((prev + body).encode()).hexdigest())
            prev = e.hash

    def test_intact_chain_verifies(self) -> None:
        self.assertEqual(self.verify(), VerifyResult(True, 0))
        self.fill(5)
        self.assertEqual(self.verify(), VerifyResult(True, 5))

    def test_stored_rows_round_trip(self) -> None:
        written = self.fill(3)
        self.assertEqual(self.successResultOf(self.audit.list(10)), written)
        self.assertEqual(self.successResultOf(self.audit.list(1, after_seq=1)), written[1:2])
        self.assertEqual(self.successResultOf(self.audit.latest(2)), written[:0:-1])

    def test_chain_continues_across_instances(self) -> None:
        self.fill(2)
        again = AuditLog(self.db, self.clock)
        self.assertEqual(self.successResultOf(again.append("logout", "alice", {})).seq, 3)
        self.assertTrue(self.verify(again).ok)

    def test_appends_are_serialised(self) -> None:
        db = ManualSqlite()
        audit = AuditLog(db, self.clock)
        results = [audit.append("login", f"u{i}", {"i": i}) for i in range(3)]
        for expected_seq in (1, 2, 3):
            self.assertEqual(len(db.pending), 1)  # never two appends in flight
            db.run_next()
            self.assertEqual(self.successResultOf(results[expected_seq - 1]).seq, expected_seq)
        self.assertEqual(db.pending, [])
        d = audit.verify()
        db.run_next()
        self.assertTrue(self.successResultOf(d).ok)

    def test_detail_must_be_json(self) -> None:
        self.failureResultOf(self.audit.append("x", "y", {"when": object()}), ValueError)
        self.failureResultOf(self.audit.append("x", "y", {"n": float("nan")}), ValueError)
        self.failureResultOf(self.audit.append("", "y", {}), ValueError)


class AppendOnlyTests(AuditTestBase):
    """The log's database is the production schema, whose triggers keep rows as written."""

    def test_the_database_refuses_to_change_or_delete_an_entry(self) -> None:
        self.fill(3)
        for statement in (
            "UPDATE audit_log SET actor = 'mallory' WHERE seq = 2",
            "DELETE FROM audit_log WHERE seq = 3",
        ):
            failure = self.failureResultOf(self.db.run_operation(statement), sqlite3.IntegrityError)
            self.assertIn("append-only", str(failure.value))

        def edit(cursor: Any) -> None:
            cursor.execute("UPDATE audit_log SET detail = '{}' WHERE seq = 1")

        self.failureResultOf(self.db.run_interaction(edit), sqlite3.IntegrityError)
        self.assertEqual(self.verify(), VerifyResult(True, 3))

    def test_the_log_relies_on_the_migrated_schema(self) -> None:
        # The table comes from aico.gateway.store.MIGRATIONS only; AuditLog makes none.
        self.sql("DROP TABLE audit_log")
        self.failureResultOf(self.audit.append("login", "alice", {}), sqlite3.OperationalError)


class TamperTests(AuditTestBase):
    """Someone with write access to the file drops the triggers and edits the rows."""

    def setUp(self) -> None:
        super().setUp()
        self.sql("DROP TRIGGER audit_log_no_update")
        self.sql("DROP TRIGGER audit_log_no_delete")

    def test_edited_row_is_caught(self) -> None:
        self.fill(5)
        self.sql("UPDATE audit_log SET detail = ? WHERE seq = 3", '{"ip":"10.0.0.1","n":2}')
        result = self.verify()
        self.assertEqual((result.ok, result.first_bad_seq, result.checked), (False, 3, 2))
        self.assertIn("hash", result.reason)

    def test_edited_actor_is_caught(self) -> None:
        self.fill(5)
        self.sql("UPDATE audit_log SET actor = 'mallory' WHERE seq = 1")
        self.assertEqual(self.verify().first_bad_seq, 1)

    def test_edited_row_with_a_recomputed_hash_is_caught_at_the_next_row(self) -> None:
        self.fill(5)
        row = self.db.conn.execute("SELECT * FROM audit_log WHERE seq = 3").fetchone()
        seq, ts, event, _actor, detail, prev, _ = row
        body = json.dumps(
            [seq, ts, event, "mallory", json.loads(detail)], sort_keys=True, separators=(",", ":")
        )
        forged = hashlib.sha256((prev + body).encode()).hexdigest()
        self.sql("UPDATE audit_log SET actor = 'mallory', hash = ? WHERE seq = 3", forged)
        self.assertEqual(self.verify().first_bad_seq, 4)

    def test_deleted_row_is_caught(self) -> None:
        self.fill(5)
        self.sql("DELETE FROM audit_log WHERE seq = 3")
        result = self.verify()
        self.assertEqual((result.ok, result.first_bad_seq), (False, 3))
        self.assertIn("missing", result.reason)

    def test_deleted_first_row_is_caught(self) -> None:
        self.fill(3)
        self.sql("DELETE FROM audit_log WHERE seq = 1")
        self.assertEqual(self.verify().first_bad_seq, 1)

    def test_deleted_and_renumbered_row_is_caught(self) -> None:
        self.fill(5)
        self.sql("DELETE FROM audit_log WHERE seq = 3")
        self.sql("UPDATE audit_log SET seq = seq - 1 WHERE seq > 3")
        self.assertEqual(self.verify().first_bad_seq, 3)

    def test_reordered_rows_are_caught(self) -> None:
        self.fill(5)
        self.sql("UPDATE audit_log SET seq = 99 WHERE seq = 2")
        self.sql("UPDATE audit_log SET seq = 2 WHERE seq = 4")
        self.sql("UPDATE audit_log SET seq = 4 WHERE seq = 99")
        result = self.verify()
        self.assertEqual((result.ok, result.first_bad_seq), (False, 2))

    def test_swapped_contents_are_caught(self) -> None:
        self.fill(5)
        rows = {
            r[0]: r[1:5]
            for r in self.db.conn.execute("SELECT seq, ts, event, actor, detail FROM audit_log")
        }
        for seq, other in ((2, 3), (3, 2)):
            self.sql(
                "UPDATE audit_log SET ts = ?, event = ?, actor = ?, detail = ? WHERE seq = ?",
                *rows[other],
                seq,
            )
        self.assertEqual(self.verify().first_bad_seq, 2)

    def test_truncation_is_caught_against_the_remembered_head(self) -> None:
        self.fill(5)
        self.sql("DELETE FROM audit_log WHERE seq >= 4")
        result = self.verify()
        self.assertFalse(result.ok)
        self.assertEqual(result.first_bad_seq, 4)
        self.assertIn("truncated", result.reason)

    def test_truncation_is_caught_by_the_anchor_after_a_restart(self) -> None:
        anchor = self.mktemp()
        audit = AuditLog(self.db, self.clock, anchor_path=anchor)
        for i in range(4):
            self.successResultOf(audit.append("login", "alice", {"n": i}))
        self.sql("DELETE FROM audit_log WHERE seq = 4")
        restarted = AuditLog(self.db, self.clock, anchor_path=anchor)
        result = self.verify(restarted)
        self.assertEqual((result.ok, result.first_bad_seq), (False, 4))

    def test_truncation_without_any_head_is_undetectable(self) -> None:
        # The documented limit: a shorter chain is still a valid chain.
        self.fill(5)
        self.sql("DELETE FROM audit_log WHERE seq = 5")
        self.assertTrue(self.verify(AuditLog(self.db, self.clock)).ok)


class SecretGuardTests(AuditTestBase):
    def test_secret_like_keys_are_refused_and_nothing_is_written(self) -> None:
        hostile: list[dict[str, Any]] = [
            {"password": "hunter2"},
            {"new_password": "x"},
            {"Passwd": "x"},
            {"access_token": "x"},
            {"refresh-token": "x"},
            {"client_secret": "x"},
            {"Authorization": "Bearer x"},
            {"api_key": "x"},
            {"private_key": "x"},
            {"cookie": "x"},
            {"pairing_code": "123456"},
            {"user": {"name": "a", "password": "x"}},
            {"attempts": [{"otp": "123"}]},
        ]
        for detail in hostile:
            self.failureResultOf(self.audit.append("login", "alice", detail), AuditSecretError)
        self.assertEqual(self.successResultOf(self.audit.list(10)), [])

    def test_jwt_like_values_are_refused(self) -> None:
        detail = {"note": "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhIn0.c2ln"}
        self.failureResultOf(self.audit.append("x", "alice", detail), AuditSecretError)

    def test_ordinary_detail_is_accepted(self) -> None:
        entry = self.append(
            "login_failed",
            "alice",
            username="alice",
            ip="127.0.0.1",
            reason="invalid_credentials",
            device_id="ABC",
            tokens_revoked=3,
            password_changed=True,
        )
        self.assertEqual(entry.detail["reason"], "invalid_credentials")
