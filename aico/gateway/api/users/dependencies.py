"""What the users domain needs: the user store (registry database), passwords, tokens,
the audit log and the live config."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

from aico.gateway.config import Config
from aico.gateway.security.audit import AuditLog
from aico.gateway.security.chain import SecurityChain
from aico.gateway.security.passwords import PasswordService
from aico.gateway.security.tokens import TokenService
from aico.gateway.store import DatabaseLike


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
    """Users in the registry database; every query runs on the database's thread pool."""

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

    async def create(self, username: str, password_hash: str, roles: tuple[str, ...]) -> bool:
        """False when the username is taken."""
        now = self._now()
        rows = await self.db.run_query(
            "INSERT INTO users (username, password_hash, roles, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(username) DO NOTHING RETURNING username",
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


@dataclass(frozen=True)
class UsersDeps:
    store: UserStore
    passwords: PasswordService
    tokens: TokenService
    chain: SecurityChain
    audit: AuditLog
    clock: IReactorTime
    config: Callable[[], Config]
    #: Told the ``jti`` of every token revoked here (open sockets holding it are told).
    on_revoke: Callable[[str], object] = lambda jti: None
    #: Told the subject whose every session was revoked (its open sockets are told).
    on_revoke_subject: Callable[[str], object] = lambda subject: None
    #: Told each session family revoked here (logout, refresh-token reuse).
    on_revoke_family: Callable[[str], object] = lambda family: None
