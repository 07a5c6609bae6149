"""The config as the admin API shows and changes it.

* :func:`effective` — the running config as JSON, secrets redacted;
* :func:`merge` — a JSON merge patch (RFC 7396: ``null`` removes a key) on the file's
  TOML tables;
* :func:`dumps` — TOML text for those tables. The config's schema has only tables,
  strings, numbers, booleans and arrays of them, so a small writer is enough (no new
  dependency); :func:`dumps` checks that what it wrote reads back equal.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from collections.abc import Mapping
from typing import Any

from aico.gateway.config import Config

__all__ = ["REDACTED", "dumps", "effective", "merge"]

REDACTED = "(redacted)"
#: Keys whose values are never shown (none of today's keys holds a secret; a key added
#: later with such a name is redacted without anyone having to remember it here).
_SECRET = re.compile(r"(password|secret|token|private|credential|passphrase|api_?key)")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.metadata.get("internal")}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (REDACTED if _SECRET.search(k.lower()) else redact(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def effective(config: Config) -> dict[str, Any]:
    """The running config as JSON (every key, defaults included), secrets redacted."""
    out: dict[str, Any] = redact(_jsonable(config))
    return out


def merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """*base* with *patch* applied as a JSON merge patch (``null`` removes a key)."""
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        elif isinstance(value, Mapping):
            out[key] = merge({}, value)
        else:
            out[key] = value
    return out


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("TOML here holds only finite numbers")
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string except for \u escapes of
        # non-BMP characters, which ensure_ascii=False avoids.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write {type(value).__name__} as TOML")


def _table(prefix: str, table: Mapping[str, Any], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    if prefix and (scalars or not tables):
        lines.append(f"[{prefix}]")
    for k, v in scalars.items():
        lines.append(f"{_key(k)} = {_value(v)}")
    if scalars:
        lines.append("")
    for k, v in tables.items():
        _table(f"{prefix}.{_key(k)}" if prefix else _key(k), v, lines)


def dumps(data: Mapping[str, Any]) -> str:
    """TOML text for *data*; raises ``ValueError`` unless it reads back equal."""
    lines: list[str] = []
    _table("", data, lines)
    text = "\n".join(lines).rstrip("\n") + "\n"
    if tomllib.loads(text) != json.loads(json.dumps(data)):
        raise ValueError("the config could not be written as TOML faithfully")
    return text
