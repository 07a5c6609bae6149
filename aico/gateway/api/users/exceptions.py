"""Errors of the users domain."""

from __future__ import annotations

from aico.gateway.errors import Conflict, InvalidCredentials, NotFound, ValidationFailed


class LoginFailed(InvalidCredentials):
    """Wrong username, wrong password, disabled or locked account — one answer for all,
    so that a caller cannot tell which usernames exist."""

    def __init__(self) -> None:
        super().__init__("invalid username or password")


class UserExists(Conflict):
    def __init__(self, username: str) -> None:
        super().__init__(f"user {username!r} already exists")


class UserNotFound(NotFound):
    def __init__(self, username: str) -> None:
        super().__init__(f"no user {username!r}")


class WeakPassword(ValidationFailed):
    def __init__(self, minimum: int) -> None:
        super().__init__([{"pointer": "/password",
                           "detail": f"at least {minimum} characters"}])


class LastAdmin(Conflict):
    def __init__(self) -> None:
        super().__init__("this would leave no enabled admin")
