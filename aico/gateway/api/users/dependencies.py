"""What the users domain needs: the user store (registry database), passwords, tokens,
the audit log and the live config.

:class:`User` and :class:`UserStore` live in :mod:`aico.gateway.users` (the bootstrap and
the CLI use the same store); they are re-exported here for the domain's wiring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from aico.gateway.config import Config
from aico.gateway.security.audit import AuditLog
from aico.gateway.security.chain import SecurityChain
from aico.gateway.security.passwords import PasswordService
from aico.gateway.security.tokens import TokenService
from aico.gateway.users import User, UserStore

__all__ = ["User", "UserStore", "UsersDeps"]


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
    #: Told the user whose password was changed (or who was deleted) here: the bootstrap
    #: admin's password file is removed then (a Deferred it returns is waited for).
    on_password_changed: Callable[[str], object] = lambda username: None
