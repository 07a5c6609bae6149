"""Typed errors and their RFC 9457 problem form (docs/rest.md § Errors).

Handlers and security steps raise an :class:`ApiError`; each adapter turns it into its
transport's error form in exactly one place, through :func:`problem_body`.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from twisted.python.failure import Failure

from aico.bus.errors import BusStopped, BusTimeout
from aico.gateway.security.passwords import PasswordServiceBusy
from aico.gateway.security.tokens import TokenError

PROBLEM_TYPE_BASE = "https://aico.dev/problems/"
PROBLEM_CONTENT_TYPE = "application/problem+json"


class ApiError(Exception):
    """An error with a stable ``code`` and HTTP ``status``."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.detail = detail or self.title
        self.headers = headers or {}
        self.extra = extra or {}
        super().__init__(self.detail)

    def problem(self, request_id: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + self.code,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
            "request_id": request_id,
        }
        body.update(self.extra)
        return body


class MalformedJson(ApiError):
    status, code, title = 400, "malformed_json", "Malformed JSON"


class BadRequest(ApiError):
    status, code, title = 400, "bad_request", "Bad request"


class ValidationFailed(ApiError):
    status, code, title = 400, "validation_failed", "Validation failed"

    def __init__(self, errors: list[dict[str, str]], detail: str | None = None) -> None:
        super().__init__(
            detail or f"{len(errors)} validation error(s)", extra={"errors": errors}
        )


class _Unauthorized(ApiError):
    status = 401

    def __init__(self, detail: str | None = None, **kw: Any) -> None:
        super().__init__(detail, **kw)
        error = "invalid_token" if self.code.startswith("token_") else "invalid_request"
        self.headers.setdefault(
            "WWW-Authenticate", f'Bearer realm="aico", error="{error}"'
        )


class Unauthenticated(_Unauthorized):
    code, title = "unauthenticated", "Authentication required"

    def __init__(self, detail: str | None = None, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.headers["WWW-Authenticate"] = 'Bearer realm="aico"'


class TokenInvalid(_Unauthorized):
    code, title = "token_invalid", "Invalid token"


class TokenExpired(_Unauthorized):
    code, title = "token_expired", "Token expired"


class TokenRevoked(_Unauthorized):
    code, title = "token_revoked", "Token revoked"


class InvalidCredentials(_Unauthorized):
    code, title = "invalid_credentials", "Invalid credentials"


class Forbidden(ApiError):
    status, code, title = 403, "forbidden", "Forbidden"


class NotFound(ApiError):
    status, code, title = 404, "not_found", "Not found"


class MethodNotAllowed(ApiError):
    status, code, title = 405, "method_not_allowed", "Method not allowed"

    def __init__(self, allowed: list[str]) -> None:
        super().__init__(
            f"allowed methods: {', '.join(allowed)}", headers={"Allow": ", ".join(allowed)}
        )


class Conflict(ApiError):
    status, code, title = 409, "conflict", "Conflict"


class PayloadTooLarge(ApiError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class UnsupportedMediaType(ApiError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class RateLimited(ApiError):
    status, code, title = 429, "rate_limited", "Too many requests"


class TemporarilyBlocked(ApiError):
    status, code, title = 429, "temporarily_blocked", "Temporarily blocked"


class BackendError(ApiError):
    status, code, title = 502, "backend_error", "Backend error"


class BackendUnavailable(ApiError):
    status, code, title = 503, "backend_unavailable", "Backend unavailable"


class ServerBusy(BackendUnavailable):
    """The gateway's own bounded work is full (password hashing past
    ``auth.password_concurrency`` and ``auth.password_queue``); always with
    ``Retry-After``. SPEC §4 has one 503 code, ``backend_unavailable``."""

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after))})


class BackendTimeout(ApiError):
    status, code, title = 504, "backend_timeout", "Backend timeout"


class InternalError(ApiError):
    status, code, title = 500, "internal_error", "Internal error"

    def __init__(self) -> None:
        super().__init__("an unexpected error occurred; quote the request_id when reporting it")


def problem_body(error: ApiError, request_id: str) -> bytes:
    return json.dumps(error.problem(request_id), separators=(",", ":")).encode()


_TOKEN_ERRORS: dict[str, type[ApiError]] = {
    "token_invalid": TokenInvalid,
    "token_expired": TokenExpired,
    "token_revoked": TokenRevoked,
}


def to_api_error(failure: Failure | BaseException) -> ApiError:
    """The problem an exception is, on every transport: an :class:`ApiError` as it is; a
    refused token as its 401 (the reason stays in the logs); a bus timeout 504, a bus
    that stopped 503, password work past its cap 503 with ``Retry-After``; anything else
    500 ``internal_error`` (no internals in ``detail``).
    """
    error = failure.value if isinstance(failure, Failure) else failure
    if isinstance(error, ApiError):
        return error
    if isinstance(error, TokenError):
        return _TOKEN_ERRORS.get(error.code, TokenInvalid)()
    if isinstance(error, BusTimeout):
        return BackendTimeout("the backend module did not answer in time")
    if isinstance(error, PasswordServiceBusy):
        return ServerBusy("too many password checks in progress; retry shortly",
                          error.retry_after)
    if isinstance(error, BusStopped):
        return BackendUnavailable("the message bus is shutting down")
    return InternalError()
