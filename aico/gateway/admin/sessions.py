"""Browser sessions of the admin site: a cookie, a CSRF token, the user's token pair.

``POST /admin/login`` logs in through the users domain (the same handler, lockout and
rate limit as ``POST /api/v1/users/authenticate``) and keeps the token pair it issues in
an :class:`AdminSession`, in memory only: a gateway restart logs every browser out. The
cookie carries only a random session ID (a new one on every login: no session
fixation); the session's access token is refreshed through the users domain when it is
about to expire, so a session ends when the user's sessions end (password changed,
disabled, deleted, logged out), at the latest with its refresh token.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

__all__ = ["COOKIE", "AdminSession", "AdminSessions"]

#: The session cookie's name.
COOKIE = "aico_admin_session"
#: Seconds a session lives without use before it ends (also the cookie's ``Max-Age``).
SESSION_TTL = 8 * 3600.0


@dataclass
class AdminSession:
    session_id: str
    csrf_token: str
    username: str
    access_token: str
    refresh_token: str
    #: When the access token expires (clock seconds).
    access_expires: float
    #: When the session ends without use (clock seconds).
    expires_at: float

    def csrf_ok(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.csrf_token.encode())


class AdminSessions:
    """Sessions by ID, with expiry (in memory)."""

    def __init__(self, clock: IReactorTime, ttl: float = SESSION_TTL) -> None:
        self.clock = clock
        self.ttl = ttl
        self._sessions: dict[str, AdminSession] = {}

    def create(self, username: str, pair: dict[str, Any]) -> AdminSession:
        """A new session (a new random ID) for a token pair ``{access_token, refresh_token,
        expires_in}``."""
        self.sweep()
        now = self.clock.seconds()
        session = AdminSession(
            session_id=secrets.token_urlsafe(32), csrf_token=secrets.token_urlsafe(32),
            username=username, access_token=pair["access_token"],
            refresh_token=pair["refresh_token"],
            access_expires=now + float(pair.get("expires_in", 0)), expires_at=now + self.ttl)
        self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str | None) -> AdminSession | None:
        """The live session with this ID (its idle expiry pushed back), else ``None``."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self.clock.seconds()
        if session.expires_at <= now:
            self.drop(session_id)
            return None
        session.expires_at = now + self.ttl
        return session

    def update(self, session: AdminSession, pair: dict[str, Any]) -> None:
        session.access_token = pair["access_token"]
        session.refresh_token = pair["refresh_token"]
        session.access_expires = self.clock.seconds() + float(pair.get("expires_in", 0))

    def drop(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def drop_user(self, username: str) -> int:
        """End every session of *username*; returns how many."""
        ids = [k for k, s in self._sessions.items() if s.username == username]
        for k in ids:
            del self._sessions[k]
        return len(ids)

    def sweep(self) -> None:
        now = self.clock.seconds()
        for k in [k for k, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[k]

    def __len__(self) -> int:
        return len(self._sessions)
