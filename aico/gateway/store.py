"""The registry database: one SQLite file, used through a single-connection thread pool.

The schema is plain SQL that libSQL also accepts (no SQLite-only extensions beyond
``PRAGMA user_version``, triggers and indexes), so the file can move to libSQL unchanged.

* :func:`migrate_sync` brings a file up to :data:`SCHEMA_VERSION` with the standard
  library's ``sqlite3``; bootstrap calls it before the reactor starts.
* :class:`Database` is what the running gateway uses: an ``adbapi.ConnectionPool`` with
  exactly one connection (SQLite has one writer anyway; one connection also means one
  consistent view and no ``database is locked`` between our own threads), in WAL mode with
  foreign keys on and a busy timeout for other processes (the CLI) touching the same file.
* :class:`SyncDatabase` is the same :class:`DatabaseLike` on one connection in the calling
  thread, migrated when opened, whose Deferreds have already fired: the bootstrap and the
  CLI use it (through the same stores as the gateway, with :func:`sync_result`), and so
  do tests, so everything runs on the one schema in :data:`MIGRATIONS`.

Every table's columns are documented in ``docs/state.md``. Booleans are INTEGER 0/1,
times are REAL seconds since the epoch, lists and objects are JSON text.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, cast

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Database",
    "DatabaseLike",
    "SchemaError",
    "SyncDatabase",
    "connect_sync",
    "migrate_sync",
    "schema_version",
    "sync_result",
]

P = ParamSpec("P")
T = TypeVar("T")

#: Milliseconds a statement waits for another process's lock before failing.
BUSY_TIMEOUT_MS = 5000

#: ``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``. Append, never edit.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE users (
            username TEXT PRIMARY KEY,
            password_hash TEXT NOT NULL,
            roles TEXT NOT NULL,
            disabled INTEGER NOT NULL DEFAULT 0,
            failed_logins INTEGER NOT NULL DEFAULT 0,
            locked_until REAL NOT NULL DEFAULT 0,
            lockouts INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE revoked_tokens (
            jti TEXT PRIMARY KEY,
            expires_at REAL NOT NULL
        )""",
        "CREATE INDEX revoked_tokens_expires_at ON revoked_tokens (expires_at)",
        """CREATE TABLE refresh_tokens (
            jti TEXT PRIMARY KEY,
            family TEXT NOT NULL,
            username TEXT NOT NULL,
            expires_at REAL NOT NULL,
            used INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX refresh_tokens_family ON refresh_tokens (family)",
        "CREATE INDEX refresh_tokens_username ON refresh_tokens (username)",
        "CREATE INDEX refresh_tokens_expires_at ON refresh_tokens (expires_at)",
        """CREATE TABLE audit_log (
            seq INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            event TEXT NOT NULL,
            actor TEXT NOT NULL,
            detail TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )""",
        # Append-only: the hash chain is verified from admin; rows never change or go.
        """CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
           BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""",
        """CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
           BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""",
        """CREATE TABLE devices (
            device_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            cert_pem TEXT NOT NULL,
            trusted_admin INTEGER NOT NULL DEFAULT 0,
            capabilities TEXT NOT NULL DEFAULT '[]',
            revoked INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            last_seen REAL
        )""",
    ),
    (
        # Sessions follow the account: every change that ends a user's sessions (new
        # password, disabled, other roles, deleted) raises this number in the same
        # statement; tokens carry the number they were issued under.
        "ALTER TABLE users ADD COLUMN session_generation INTEGER NOT NULL DEFAULT 0",
        # The generation a deleted user had reached, so that a user created again under
        # the same name never accepts the old user's tokens (also across a restart).
        """CREATE TABLE deleted_users (
            username TEXT PRIMARY KEY,
            session_generation INTEGER NOT NULL,
            deleted_at REAL NOT NULL
        )""",
        # Failed logins per (account, source): a lock earned from one source never
        # refuses another. users.failed_logins, locked_until and lockouts are unused
        # from this version on (left in place, always 0 for new users).
        """CREATE TABLE login_failures (
            username TEXT NOT NULL,
            source TEXT NOT NULL,
            failures INTEGER NOT NULL DEFAULT 0,
            locked_until REAL NOT NULL DEFAULT 0,
            lockouts INTEGER NOT NULL DEFAULT 0,
            last_failure REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (username, source)
        )""",
    ),
    (
        # Detached mode: the device registry grows the user a device was paired for and
        # when it was revoked; pairing windows opened by `aico-gateway pair` or the admin
        # API are rows, so a running gateway sees one opened from another process.
        "ALTER TABLE devices ADD COLUMN paired_for TEXT",
        "ALTER TABLE devices ADD COLUMN revoked_at REAL",
        """CREATE TABLE pairing_windows (
            window_id TEXT PRIMARY KEY,
            code TEXT NOT NULL,
            device_name TEXT,
            paired_for TEXT,
            opened_by TEXT NOT NULL,
            opened_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            failures INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL DEFAULT 'open',
            device_id TEXT
        )""",
        "CREATE INDEX pairing_windows_state ON pairing_windows (state, expires_at)",
    ),
    (
        # Federated sync (docs/sync.md): every item of every collection with its CRDT
        # state (committed before a write is acknowledged), the gateways this one is
        # paired with for sync, and what each peer acknowledged (tombstone collection).
        """CREATE TABLE sync_items (
            collection TEXT NOT NULL,
            key TEXT NOT NULL,
            state TEXT NOT NULL,
            digest BLOB NOT NULL,
            hlc TEXT NOT NULL,
            deleted INTEGER NOT NULL DEFAULT 0,
            updated_at REAL NOT NULL,
            PRIMARY KEY (collection, key)
        )""",
        "CREATE INDEX sync_items_tombstones ON sync_items (deleted, hlc)",
        """CREATE TABLE sync_peers (
            peer_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            device_id TEXT NOT NULL,
            host TEXT NOT NULL DEFAULT '',
            port INTEGER NOT NULL DEFAULT 0,
            their_ca TEXT NOT NULL,
            our_device_id TEXT NOT NULL,
            our_cert TEXT NOT NULL,
            our_key TEXT NOT NULL,
            added_at REAL NOT NULL,
            last_round REAL,
            last_error TEXT
        )""",
        """CREATE TABLE sync_acks (
            peer_id TEXT NOT NULL,
            collection TEXT NOT NULL,
            hlc TEXT NOT NULL,
            PRIMARY KEY (peer_id, collection)
        )""",
    ),
)

#: The schema version this code reads and writes (``PRAGMA user_version``).
SCHEMA_VERSION = len(MIGRATIONS)

_log = Logger()


class SchemaError(RuntimeError):
    """The database's schema is newer than this code, or a migration failed."""


def _ensure_file(path: Path) -> bool:
    """Create *path* empty with mode 0600 unless it exists; True if created.

    SQLite creates its ``-wal`` and ``-shm`` files with the database file's mode, so
    they are 0600 as well.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _configure(conn: sqlite3.Connection) -> None:
    """Per-connection settings (also ``cp_openfun`` of the pool)."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    if mode != "wal" and conn.execute("PRAGMA database_list").fetchone()[2]:
        # Persistent in the file; only set when needed, so opening a migrated file
        # writes nothing. (In-memory databases have no file name and cannot use WAL.)
        conn.execute("PRAGMA journal_mode = WAL")
    # NORMAL is durable across application crashes in WAL mode; only an OS crash can
    # lose the last transactions.
    conn.execute("PRAGMA synchronous = NORMAL")


def connect_sync(path: Path | str) -> sqlite3.Connection:
    """A configured stdlib connection (for bootstrap and the CLI; blocking).

    The connection is in autocommit mode (``isolation_level=None``): use explicit
    ``BEGIN``/``COMMIT``, or ``with conn:`` for a transaction.
    """
    if str(path) != ":memory:":
        _ensure_file(Path(path))
    conn = sqlite3.connect(str(path), isolation_level=None)
    _configure(conn)
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _migrate(conn: sqlite3.Connection) -> tuple[int, int]:
    before = schema_version(conn)
    if before > SCHEMA_VERSION:
        raise SchemaError(
            f"the registry database has schema version {before}, newer than this "
            f"gateway's {SCHEMA_VERSION}; upgrade the gateway"
        )
    for version in range(before, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while we waited for the lock.
            if schema_version(conn) != version:
                conn.execute("ROLLBACK")
                return _migrate(conn)
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        _log.info("registry schema migrated to version {version}", version=version + 1)
    return before, SCHEMA_VERSION


def migrate_sync(path: Path | str) -> tuple[int, int]:
    """Create or upgrade the database at *path* (mode 0600); returns (before, after).

    Each migration runs in one transaction together with its ``user_version`` bump, so a
    crash leaves the file at a whole version. A file already at :data:`SCHEMA_VERSION`
    is only read. Raises :class:`SchemaError` for a file newer than this code.
    """
    conn = connect_sync(path)
    try:
        return _migrate(conn)
    finally:
        conn.close()


Params = Sequence[Any] | Mapping[str, Any]


def _params(params: Params) -> tuple[Any, ...] | Mapping[str, Any]:
    return params if isinstance(params, Mapping) else tuple(params)


class DatabaseLike(Protocol):
    """What code that uses the registry needs of it (:class:`Database`, or a test double)."""

    def run_query(self, sql: str, params: Any = ()) -> Deferred[list[tuple[Any, ...]]]: ...

    def run_operation(self, sql: str, params: Any = ()) -> Deferred[None]: ...

    def run_interaction(self, fn: Callable[..., T], *args: Any) -> Deferred[T]: ...


class Database:
    """The registry on a one-connection ``adbapi`` pool; every method returns a Deferred.

    *path* is a file (created 0600 if missing; run :func:`migrate_sync` first) or
    ``":memory:"`` for tests. The pool starts when *reactor* runs; call :meth:`close`
    when done (the pool also closes at reactor shutdown).
    """

    def __init__(self, path: Path | str, reactor: IReactorCore | None = None) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            _ensure_file(Path(path))
        kwargs: dict[str, Any] = {
            "check_same_thread": False,
            "cp_min": 1,
            "cp_max": 1,
            "cp_openfun": _configure,
            "cp_noisy": False,
        }
        if reactor is not None:
            kwargs["cp_reactor"] = reactor
        self._pool = adbapi.ConnectionPool("sqlite3", self.path, **kwargs)

    def run_query(self, sql: str, params: Params = ()) -> Deferred[list[tuple[Any, ...]]]:
        """Execute one statement (``?`` or ``:name`` parameters) and fetch every row."""
        d = self._pool.runQuery(sql, _params(params))
        return cast("Deferred[list[tuple[Any, ...]]]", d)

    def run_operation(self, sql: str, params: Params = ()) -> Deferred[None]:
        """Execute one statement in its own transaction; no result."""
        d = self._pool.runOperation(sql, _params(params))
        return cast("Deferred[None]", d)

    def run_interaction(
        self,
        fn: Callable[Concatenate[adbapi.Transaction, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Deferred[T]:
        """Run ``fn(txn, *args, **kwargs)`` in the pool's thread inside one transaction.

        *txn* behaves as a DB-API cursor (``execute``, ``fetchone``, ``fetchall``,
        ``lastrowid``…). The transaction commits when *fn* returns and rolls back if it
        raises. *fn* blocks the pool thread only, never the reactor.
        """
        d = self._pool.runInteraction(fn, *args, **kwargs)
        return cast("Deferred[T]", d)

    def close(self) -> None:
        """Stop the pool's thread and close the connection (queued work finishes first)."""
        self._pool.close()


class SyncDatabase:
    """The registry on one stdlib connection in the calling thread; the :class:`DatabaseLike`
    of the bootstrap, the CLI and the tests.

    Opening *path* (a file, created 0600 if missing, or ``":memory:"``) configures the
    connection like :class:`Database`'s and brings the schema to :data:`SCHEMA_VERSION`
    with :data:`MIGRATIONS`, triggers and indexes included (raising :class:`SchemaError`
    for a newer file); :attr:`migrated` tells what that did. Every method blocks, then
    returns a Deferred that has already fired (with the result, or with the failure), so
    :func:`sync_result` can take the result of a store's coroutine at once. The
    connection is in autocommit mode: each statement commits by itself, and
    :meth:`run_interaction` wraps its function in one write transaction.
    """

    def __init__(self, path: Path | str = ":memory:") -> None:
        self.path = str(path)
        #: The stdlib connection (tests read and tamper with the tables through it).
        self.conn = connect_sync(path)
        try:
            #: ``(before, after)`` schema versions of this open (equal when nothing changed).
            self.migrated: tuple[int, int] = _migrate(self.conn)
        except BaseException:
            self.conn.close()
            raise

    def run_query(self, sql: str, params: Params = ()) -> Deferred[list[tuple[Any, ...]]]:
        """Execute one statement and fetch every row."""
        try:
            rows: list[tuple[Any, ...]] = self.conn.execute(sql, _params(params)).fetchall()
        except Exception:
            return fail()
        return succeed(rows)

    def run_operation(self, sql: str, params: Params = ()) -> Deferred[None]:
        """Execute one statement; no result."""
        try:
            self.conn.execute(sql, _params(params))
        except Exception:
            return fail()
        return succeed(None)

    def run_interaction(
        self,
        fn: Callable[Concatenate[sqlite3.Cursor, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Deferred[T]:
        """Run ``fn(cursor, *args, **kwargs)`` in one transaction, taken with the write
        lock up front (``BEGIN IMMEDIATE``): it commits when *fn* returns and rolls back
        if it raises."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except Exception:
            return fail()
        try:
            result = fn(self.conn.cursor(), *args, **kwargs)
        except Exception:
            failure = Failure()
            self.conn.execute("ROLLBACK")
            return fail(failure)
        try:
            self.conn.execute("COMMIT")
        except Exception:
            failure = Failure()
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            return fail(failure)
        return succeed(result)

    def close(self) -> None:
        self.conn.close()


def sync_result(work: Deferred[T] | Coroutine[Any, Any, T]) -> T:
    """The result of *work*, which must already be done: a Deferred that has fired, or a
    coroutine that awaits only such Deferreds (a store's method over a
    :class:`SyncDatabase`). Raises the failure's exception; raises RuntimeError, after
    cancelling it, if *work* is still waiting for something.
    """
    d: Deferred[T] = work if isinstance(work, Deferred) else Deferred.fromCoroutine(work)
    outcome: list[T | Failure] = []
    d.addBoth(outcome.append)
    if not outcome:
        d.cancel()
        raise RuntimeError(f"{work!r} has not finished; it needs a reactor")
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result
