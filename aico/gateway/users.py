"""The users table of the registry: the one store that reads and writes it.

The gateway runs :class:`UserStore` over :class:`aico.gateway.store.Database` (queries on
the database's thread); the bootstrap and the ``aico-gateway user`` commands run the same
store over :class:`aico.gateway.store.SyncDatabase`, whose Deferreds have already fired,
and take each result with :func:`aico.gateway.store.sync_result`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

from aico.gateway.store import DatabaseLike

__all__ = ["User", "UserStore"]


@dataclass(frozen=True)
class User:
    username: str
    password_hash: str
    roles: tuple[str, ...]
    disabled: bool
    failed_logins: int
    locked_until: float
    lockouts: int
    created_at: float
    updated_at: float

    def public(self) -> dict[str, Any]:
        return {"username": self.username, "roles": list(self.roles), "disabled": self.disabled,
                "created_at": self.created_at, "updated_at": self.updated_at}


_COLUMNS = ("username, password_hash, roles, disabled, failed_logins, locked_until, lockouts, "
            "created_at, updated_at")


def _user(row: tuple[Any, ...]) -> User:
    return User(row[0], row[1], tuple(json.loads(row[2])), bool(row[3]), int(row[4]),
                float(row[5]), int(row[6]), float(row[7]), float(row[8]))


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

    async def create(self, username: str, password_hash: str, roles: tuple[str, ...]) -> bool:
        """False when the username is taken."""
        now = self._now()
        rows = await self.db.run_query(
            "INSERT INTO users (username, password_hash, roles, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(username) DO NOTHING RETURNING username",
            (username, password_hash, json.dumps(list(roles)), now, now),
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
            "INSERT INTO users (username, password_hash, roles, created_at, updated_at) "
            "SELECT ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM users) RETURNING username",
            (username, password_hash, json.dumps(list(roles)), now, now),
        )
        return bool(rows)

    async def update(self, username: str, *, password_hash: str | None = None,
                     roles: tuple[str, ...] | None = None, disabled: bool | None = None) -> bool:
        sets: list[str] = ["updated_at = ?"]
        params: list[Any] = [self._now()]
        if password_hash is not None:
            sets += ["password_hash = ?", "failed_logins = 0", "locked_until = 0"]
            params.append(password_hash)
        if roles is not None:
            sets.append("roles = ?")
            params.append(json.dumps(list(roles)))
        if disabled is not None:
            sets.append("disabled = ?")
            params.append(int(disabled))
        params.append(username)
        rows = await self.db.run_query(
            f"UPDATE users SET {', '.join(sets)} WHERE username = ? RETURNING username",  # noqa: S608
            tuple(params),
        )
        return bool(rows)

    async def delete(self, username: str) -> bool:
        rows = await self.db.run_query("DELETE FROM users WHERE username = ? RETURNING username",
                                       (username,))
        return bool(rows)

    async def record_failure(self, username: str, threshold: int, base: float,
                             longest: float) -> float:
        """Count a failed login; returns the lock's end when this failure set one, else 0.

        One interaction (the registry runs them one at a time): concurrent failures are
        all counted, and a lock is never shortened by a failure that raced it.
        """
        now = self._now()

        def count(cursor: Any) -> float:
            cursor.execute("UPDATE users SET failed_logins = failed_logins + 1 "
                           "WHERE username = ? RETURNING failed_logins, lockouts, locked_until",
                           (username,))
            row = cursor.fetchone()
            if row is None:
                return 0.0
            failures, lockouts, locked_until = int(row[0]), int(row[1]), float(row[2])
            if failures < threshold:
                return 0.0
            until = float(max(locked_until, now + min(base * 2.0 ** lockouts, longest)))
            cursor.execute("UPDATE users SET failed_logins = 0, locked_until = ?, "
                           "lockouts = lockouts + 1 WHERE username = ?", (until, username))
            return until

        result: float = await self.db.run_interaction(count)
        return result

    async def record_success(self, username: str) -> None:
        await self.db.run_operation(
            "UPDATE users SET failed_logins = 0, locked_until = 0, lockouts = 0 WHERE username = ?",
            (username,),
        )
