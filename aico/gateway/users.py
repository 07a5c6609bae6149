"""The users table of the registry: the one store that reads and writes it.

The gateway runs :class:`UserStore` over :class:`aico.gateway.store.Database` (queries on
the database's thread); the bootstrap and the ``aico-gateway user`` commands run the same
store over :class:`aico.gateway.store.SyncDatabase`, whose Deferreds have already fired,
and take each result with :func:`aico.gateway.store.sync_result`.

Two rules live here, so that every caller (the REST domain, the CLI, the bootstrap) gets
them alike:

* **Sessions follow the account.** A change that ends a user's sessions — a new password,
  disabling, other roles, deletion — raises the user's ``session_generation`` in the
  same statement as the change. Tokens carry the generation they were issued under, and
  the token service refuses older ones (``docs/security.md``, "Sessions follow the
  account"). A deleted user's generation is kept (``deleted_users``), so a user created
  again under that name starts above it.
* **Lockout per (account, source).** Failed logins are counted per account *and* per
  source (:func:`aico.net.source_identity`), in ``login_failures``; a lock earned from
  one source never refuses another, and its growth decays (:meth:`UserStore.record_failure`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

from aico.gateway.store import DatabaseLike

__all__ = [
    "RESERVED_USERNAMES",
    "NoAdminLeft",
    "User",
    "UserChange",
    "UserStore",
    "username_problem",
]

#: Names that equal a static path segment under ``/api/v1/users/``: a user so named could
#: not be reached at ``/api/v1/users/{username}`` (the static route wins), so they are
#: refused at creation (REST and CLI). The users domain checks at start-up that every
#: static route under ``/api/v1/users/`` is listed here.
RESERVED_USERNAMES = frozenset({"authenticate", "refresh", "logout", "me"})

_USERNAME = re.compile(r"(?!\.+$)[A-Za-z0-9._-]{1,64}")


def username_problem(username: str) -> str | None:
    """Why *username* cannot be given to a new user, or None when it can."""
    if not _USERNAME.fullmatch(username):
        return "1-64 characters from A-Z a-z 0-9 . _ -, not only dots"
    if username in RESERVED_USERNAMES:
        return (f"{username!r} is reserved: /api/v1/users/{username} is a route of its own, "
                "so such a user could not be managed")
    return None


class NoAdminLeft(Exception):
    """The change would leave no enabled admin; nothing was changed."""


@dataclass(frozen=True)
class User:
    username: str
    password_hash: str
    roles: tuple[str, ...]
    disabled: bool
    #: Raised by every change that ends the user's sessions (see the module docstring).
    session_generation: int
    created_at: float
    updated_at: float

    @property
    def enabled_admin(self) -> bool:
        return "admin" in self.roles and not self.disabled

    def public(self) -> dict[str, Any]:
        return {"username": self.username, "roles": list(self.roles), "disabled": self.disabled,
                "created_at": self.created_at, "updated_at": self.updated_at}


@dataclass(frozen=True)
class UserChange:
    """What :meth:`UserStore.update` and :meth:`UserStore.delete` did."""

    before: User
    #: The row after the change (for a deletion: the row as it was, with the generation
    #: its old tokens are now below).
    after: User

    @property
    def sessions_ended(self) -> bool:
        return self.after.session_generation != self.before.session_generation


_COLUMNS = "username, password_hash, roles, disabled, session_generation, created_at, updated_at"


def _user(row: tuple[Any, ...] | list[Any]) -> User:
    return User(str(row[0]), str(row[1]), tuple(json.loads(row[2])), bool(row[3]), int(row[4]),
                float(row[5]), float(row[6]))


def _other_enabled_admin(cursor: Any, username: str) -> bool:
    cursor.execute("SELECT roles FROM users WHERE username != ? AND disabled = 0", (username,))
    return any("admin" in json.loads(roles) for (roles,) in cursor.fetchall())


class UserStore:
    """Users in the registry database, over any :class:`DatabaseLike`."""

    def __init__(self, db: DatabaseLike, clock: IReactorTime | None = None) -> None:
        self.db = db
        self._now: Callable[[], float] = clock.seconds if clock is not None else time.time

    async def get(self, username: str) -> User | None:
        rows = await self.db.run_query(f"SELECT {_COLUMNS} FROM users WHERE username = ?",  # noqa: S608
                                       (username,))
        return _user(rows[0]) if rows else None

    async def list(self) -> list[User]:
        rows = await self.db.run_query(f"SELECT {_COLUMNS} FROM users ORDER BY username")  # noqa: S608
        return [_user(r) for r in rows]

    async def count(self) -> int:
        rows = await self.db.run_query("SELECT COUNT(*) FROM users")
        return int(rows[0][0])

    async def session_generations(self) -> dict[str, int]:
        """Every user's session generation, deleted users' included (the token service
        loads them at start)."""
        rows = await self.db.run_query(
            "SELECT username, MAX(g) FROM (SELECT username, session_generation AS g FROM users "
            "UNION ALL SELECT username, session_generation AS g FROM deleted_users) "
            "GROUP BY username")
        return {str(name): int(gen) for name, gen in rows}

    async def create(self, username: str, password_hash: str, roles: tuple[str, ...]) -> bool:
        """False when the username is taken.

        A user created again under a deleted user's name starts at the generation the
        old one reached, so the old user's tokens stay refused.
        """
        now = self._now()
        rows = await self.db.run_query(
            "INSERT INTO users (username, password_hash, roles, created_at, updated_at, "
            "session_generation) VALUES (?, ?, ?, ?, ?, COALESCE((SELECT session_generation "
            "FROM deleted_users WHERE username = ?), 0)) "
            "ON CONFLICT(username) DO NOTHING RETURNING username",
            (username, password_hash, json.dumps(list(roles)), now, now, username),
        )
        return bool(rows)

    async def create_first(self, username: str, password_hash: str, roles: tuple[str, ...]) -> bool:
        """Create the user only while the table is empty (the bootstrap ``admin``).

        One statement, so the check and the insert are one atomic step: of two
        concurrent callers (two processes on one file), at most one creates a user.
        False when the table already has a user.
        """
        now = self._now()
        rows = await self.db.run_query(
            "INSERT INTO users (username, password_hash, roles, created_at, updated_at, "
            "session_generation) SELECT ?, ?, ?, ?, ?, COALESCE((SELECT session_generation "
            "FROM deleted_users WHERE username = ?), 0) "
            "WHERE NOT EXISTS (SELECT 1 FROM users) RETURNING username",
            (username, password_hash, json.dumps(list(roles)), now, now, username),
        )
        return bool(rows)

    async def update(self, username: str, *, password_hash: str | None = None,
                     roles: tuple[str, ...] | None = None, disabled: bool | None = None,
                     keep_an_admin: bool = False) -> UserChange | None:
        """Change a user in one transaction; None when there is no such user.

        A new password, ``disabled=True`` or roles other than the current ones end the
        user's sessions: ``session_generation`` goes up in the same statement. A new
        password also clears the account's login failures. With *keep_an_admin*, a
        change that would leave no enabled admin raises :class:`NoAdminLeft` and changes
        nothing — the check and the write are one transaction, so two concurrent
        demotions of the last two admins cannot both pass.
        """
        now = self._now()

        def change(cursor: Any) -> UserChange | None:
            cursor.execute(f"SELECT {_COLUMNS} FROM users WHERE username = ?", (username,))  # noqa: S608
            row = cursor.fetchone()
            if row is None:
                return None
            before = _user(row)
            new_roles = before.roles if roles is None else roles
            new_disabled = before.disabled if disabled is None else disabled
            still_admin = "admin" in new_roles and not new_disabled
            if (keep_an_admin and before.enabled_admin and not still_admin
                    and not _other_enabled_admin(cursor, username)):
                raise NoAdminLeft()
            ends = password_hash is not None or disabled is True or new_roles != before.roles
            sets = ["updated_at = ?", "roles = ?", "disabled = ?",
                    "session_generation = session_generation + ?"]
            params: list[Any] = [now, json.dumps(list(new_roles)), int(new_disabled), int(ends)]
            if password_hash is not None:
                sets.append("password_hash = ?")
                params.append(password_hash)
            cursor.execute(f"UPDATE users SET {', '.join(sets)} WHERE username = ? "  # noqa: S608
                           f"RETURNING {_COLUMNS}", (*params, username))
            after = _user(cursor.fetchone())
            if password_hash is not None:
                cursor.execute("DELETE FROM login_failures WHERE username = ?", (username,))
            return UserChange(before, after)

        result: UserChange | None = await self.db.run_interaction(change)
        return result

    async def delete(self, username: str, *, keep_an_admin: bool = False) -> UserChange | None:
        """Delete a user in one transaction; None when there is no such user.

        Its session generation, raised by one, is kept in ``deleted_users`` (its tokens
        stay refused, and a user created again under the name starts there); its login
        failures go. *keep_an_admin* as for :meth:`update`.
        """
        now = self._now()

        def remove(cursor: Any) -> UserChange | None:
            cursor.execute(f"SELECT {_COLUMNS} FROM users WHERE username = ?", (username,))  # noqa: S608
            row = cursor.fetchone()
            if row is None:
                return None
            before = _user(row)
            if keep_an_admin and before.enabled_admin and not _other_enabled_admin(cursor, username):
                raise NoAdminLeft()
            generation = before.session_generation + 1
            cursor.execute("DELETE FROM users WHERE username = ?", (username,))
            cursor.execute("DELETE FROM login_failures WHERE username = ?", (username,))
            cursor.execute(
                "INSERT INTO deleted_users (username, session_generation, deleted_at) "
                "VALUES (?, ?, ?) ON CONFLICT(username) DO UPDATE SET "
                "session_generation = MAX(session_generation, excluded.session_generation), "
                "deleted_at = excluded.deleted_at", (username, generation, now))
            after = User(before.username, before.password_hash, before.roles, before.disabled,
                         generation, before.created_at, now)
            return UserChange(before, after)

        result: UserChange | None = await self.db.run_interaction(remove)
        return result

    # ------------------------------------------------------------------ login failures

    async def login_state(self, username: str, source: str) -> tuple[User | None, float]:
        """The user (None if unknown) and when its lock for *source* ends (0: none).

        One query, whether or not the user exists (a login's work does not depend on it).
        """
        rows = await self.db.run_query(
            f"SELECT {', '.join('u.' + c for c in _COLUMNS.split(', '))}, "  # noqa: S608
            "COALESCE(f.locked_until, 0) FROM users u LEFT JOIN login_failures f "
            "ON f.username = u.username AND f.source = ? WHERE u.username = ?",
            (source, username),
        )
        if not rows:
            return None, 0.0
        return _user(rows[0]), float(rows[0][-1])

    async def record_failure(self, username: str, source: str, threshold: int, base: float,
                             longest: float) -> float:
        """Count a failed login of *username* from *source*; returns the lock's end when
        this failure set one, else 0. Unknown users count nothing (no rows for names that
        do not exist).

        *threshold* failures in a row from one source lock the account for that source
        for ``base * 2 ** level`` seconds (at most *longest*), and raise the level by one.
        The growth decays: for every *longest* seconds without a failure from that source
        (counted from the later of its last failure and the end of its lock), the level
        drops by one and the failures in a row start again from zero. Rows that have
        decayed completely are dropped.

        One interaction (the registry runs them one at a time): concurrent failures are
        all counted, and a lock is never shortened by a failure that raced it.
        """
        now = self._now()

        def count(cursor: Any) -> float:
            cursor.execute("SELECT 1 FROM users WHERE username = ?", (username,))
            if cursor.fetchone() is None:
                return 0.0
            cursor.execute("SELECT failures, locked_until, lockouts, last_failure "
                           "FROM login_failures WHERE username = ? AND source = ?",
                           (username, source))
            row = cursor.fetchone()
            failures, locked_until, level, last = (
                (0, 0.0, 0, 0.0) if row is None
                else (int(row[0]), float(row[1]), int(row[2]), float(row[3])))
            quiet = now - max(last, locked_until)
            if longest > 0 and quiet >= longest:
                failures = 0
                level = max(0, level - int(quiet // longest))
            failures += 1
            until = 0.0
            if failures >= threshold:
                until = float(max(locked_until, now + min(base * 2.0 ** level, longest)))
                locked_until, level, failures = until, level + 1, 0
            cursor.execute(
                "INSERT INTO login_failures (username, source, failures, locked_until, lockouts, "
                "last_failure) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(username, source) DO UPDATE "
                "SET failures = excluded.failures, locked_until = excluded.locked_until, "
                "lockouts = excluded.lockouts, last_failure = excluded.last_failure",
                (username, source, failures, locked_until, level, now))
            # Forget what has decayed completely (no lock, level 0, failures reset).
            cursor.execute(
                "DELETE FROM login_failures WHERE ? > 0 AND "
                "? - MAX(last_failure, locked_until) >= ? * MAX(lockouts, 1)",
                (longest, now, longest))
            return until

        result: float = await self.db.run_interaction(count)
        return result

    async def record_success(self, username: str, source: str) -> None:
        """A login from *source* succeeded: that source's failures and lock are forgotten
        (other sources' are not)."""
        await self.db.run_operation(
            "DELETE FROM login_failures WHERE username = ? AND source = ?", (username, source))

    async def login_failures(self, username: str) -> dict[str, tuple[int, float, int]]:
        """``{source: (failures in a row, lock end, lock level)}`` of *username*."""
        rows = await self.db.run_query(
            "SELECT source, failures, locked_until, lockouts FROM login_failures "
            "WHERE username = ? ORDER BY source", (username,))
        return {str(s): (int(f), float(u), int(n)) for s, f, u, n in rows}

    async def unlock(self, username: str) -> int:
        """Forget every lock and failure of *username* (``aico-gateway user unlock``);
        returns how many sources had any."""
        rows = await self.db.run_query(
            "DELETE FROM login_failures WHERE username = ? RETURNING source", (username,))
        return len(rows)
