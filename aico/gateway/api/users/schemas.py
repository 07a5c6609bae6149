"""JSON Schemas of the users domain (docs/rest.md, docs/security.md)."""

from __future__ import annotations

from typing import Any

_DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: Letters, digits, ".", "_" and "-"; not only dots ("." and ".." are path segments).
USERNAME: dict[str, Any] = {"type": "string", "pattern": "^(?!\\.+$)[A-Za-z0-9._-]{1,64}$"}
PASSWORD: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": 1024}
ROLES: dict[str, Any] = {
    "type": "array",
    "items": {"enum": ["admin", "user", "device", "service"]},
    "uniqueItems": True,
    "maxItems": 4,
}

AUTHENTICATE: dict[str, Any] = {
    "$schema": _DIALECT, "title": "Credentials", "type": "object",
    "properties": {"username": {"type": "string", "minLength": 1, "maxLength": 64},
                   "password": PASSWORD},
    "required": ["username", "password"], "additionalProperties": False,
}

TOKENS: dict[str, Any] = {
    "$schema": _DIALECT, "title": "Tokens", "type": "object",
    "properties": {
        "access_token": {"type": "string"},
        "refresh_token": {"type": "string"},
        "token_type": {"const": "Bearer"},
        "expires_in": {"type": "integer"},
    },
    "required": ["access_token", "refresh_token", "token_type", "expires_in"],
    "additionalProperties": False,
}

REFRESH: dict[str, Any] = {
    "$schema": _DIALECT, "title": "RefreshRequest", "type": "object",
    "properties": {"refresh_token": {"type": "string", "minLength": 1, "maxLength": 8192}},
    "required": ["refresh_token"], "additionalProperties": False,
}

LOGOUT: dict[str, Any] = {
    "$schema": _DIALECT, "title": "LogoutRequest", "type": "object",
    "properties": {"refresh_token": {"type": "string", "minLength": 1, "maxLength": 8192}},
    "additionalProperties": False,
}

USER: dict[str, Any] = {
    "$schema": _DIALECT, "title": "User", "type": "object",
    "properties": {
        "username": {"type": "string"},
        "roles": {"type": "array", "items": {"type": "string"}},
        "disabled": {"type": "boolean"},
        "created_at": {"type": "number"},
        "updated_at": {"type": "number"},
    },
    "required": ["username", "roles", "disabled"],
    "additionalProperties": False,
}

ME: dict[str, Any] = {
    "$schema": _DIALECT, "title": "Me", "type": "object",
    "properties": {
        "username": {"type": "string"},
        "roles": {"type": "array", "items": {"type": "string"}},
        "capabilities": {"type": "array", "items": {"type": "string"}},
        "expires_at": {"type": "number"},
    },
    "required": ["username", "roles", "capabilities"],
    "additionalProperties": False,
}

USER_LIST: dict[str, Any] = {
    "$schema": _DIALECT, "title": "UserList", "type": "object",
    "properties": {"users": {"type": "array", "items": USER}},
    "required": ["users"], "additionalProperties": False,
}

CREATE_USER: dict[str, Any] = {
    "$schema": _DIALECT, "title": "NewUser", "type": "object",
    "properties": {"username": USERNAME, "password": PASSWORD, "roles": ROLES},
    "required": ["username", "password", "roles"], "additionalProperties": False,
}

UPDATE_USER: dict[str, Any] = {
    "$schema": _DIALECT, "title": "UserChanges", "type": "object",
    "properties": {"password": PASSWORD, "roles": ROLES, "disabled": {"type": "boolean"}},
    "minProperties": 1, "additionalProperties": False,
}

JWKS: dict[str, Any] = {
    "$schema": _DIALECT, "title": "JWKS", "type": "object",
    "properties": {"keys": {"type": "array", "items": {
        "type": "object",
        "properties": {"kty": {"const": "OKP"}, "crv": {"const": "Ed25519"},
                       "x": {"type": "string"}, "kid": {"type": "string"},
                       "use": {"const": "sig"}, "alg": {"const": "EdDSA"}},
        "required": ["kty", "crv", "x", "kid"],
    }}},
    "required": ["keys"],
}


def with_password_minimum(schema: dict[str, Any], minimum: int) -> dict[str, Any]:
    """*schema* whose ``password`` has ``minLength`` *minimum* (``auth.password_min_length``)."""
    properties = dict(schema["properties"])
    properties["password"] = {**PASSWORD, "minLength": minimum}
    return {**schema, "properties": properties}
