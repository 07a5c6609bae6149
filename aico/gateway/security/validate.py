"""The validation step: content type, JSON parsing with limits, JSON Schema 2020-12.

Validators are compiled once, when a route enters the table (:func:`prepare`), never
per request. The step refuses, each with a clear 4xx:

* a body with a ``Content-Type`` other than JSON → 415 ``unsupported_media_type``;
* bytes that are not UTF-8 JSON → 400 ``malformed_json``;
* nesting deeper than ``limits.json_depth``, strings longer than ``limits.string_max``,
  control characters in strings or keys → 400 ``validation_failed``;
* anything the route's schema refuses, unknown fields included → 400
  ``validation_failed`` with one ``{pointer, detail}`` per error.

Strings (and keys) are NFC-normalised; the normalised document is what the route sees.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from aico.gateway.config import LimitsSection
from aico.gateway.errors import (
    MalformedJson,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)
from aico.gateway.routing.messages import Request
from aico.gateway.routing.table import RouteEntry

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# C0 and C1 controls except TAB, LF, CR, plus DEL.
_CONTROL = {c for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)} | {0x7F} | set(range(0x80, 0xA0))
_CONTROL_TABLE = {c: None for c in _CONTROL}
_MAX_ERRORS = 20
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Refused(ValueError):
    """JSON that the standard allows to parse but that the gateway does not accept."""


def _no_constants(name: str) -> Any:
    raise _Refused(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"duplicate member {key!r}")
            seen.add(key)
    return out


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Refused(f"{text} is out of range")
    return value


def loads(data: bytes | str) -> Any:
    """Strict JSON: no ``NaN``/``Infinity`` (nor numbers that overflow to it), no duplicate
    members."""
    return json.loads(data, parse_constant=_no_constants, parse_float=_finite,
                      object_pairs_hook=_no_duplicates)


class InvalidSchema(ValueError):
    """A route's JSON Schema is not a valid 2020-12 schema."""


def strict(schema: Any) -> Any:
    """*schema* with ``additionalProperties: false`` on every object schema that lists
    ``properties`` and says nothing about extra ones: unknown fields are rejected."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and "unevaluatedProperties" not in out
            and "patternProperties" not in out
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def compile_schema(schema: Mapping[str, Any]) -> Draft202012Validator:
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise InvalidSchema(f"invalid JSON Schema: {e.message}") from e
    return Draft202012Validator(schema)


def prepare(entries: Iterable[RouteEntry]) -> list[RouteEntry]:
    """Compile each route's request validator once; raise ``InvalidSchema`` for a bad one."""
    out = []
    for entry in entries:
        if entry.request_schema is not None and "validator" not in entry.extra:
            try:
                entry.extra["validator"] = compile_schema(strict(entry.request_schema))
            except InvalidSchema as e:
                raise InvalidSchema(f"{entry.method} {entry.path}: {e}") from e
        out.append(entry)
    return out


def pointer(path: Iterable[Any]) -> str:
    """RFC 6901 JSON pointer of a path of keys and indexes."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


class _Walker:
    """Checks limits and NFC-normalises strings in one pass over a parsed document."""

    def __init__(self, limits: LimitsSection) -> None:
        self.max_depth = limits.json_depth
        self.max_string = limits.string_max
        self.errors: list[dict[str, str]] = []
        self.changed = False

    def text(self, s: str, where: list[Any]) -> str:
        if len(s) > self.max_string:
            self.errors.append({"pointer": pointer(where),
                                "detail": f"string longer than {self.max_string} characters"})
            return s
        if not s.isascii():
            if s.translate(_CONTROL_TABLE) != s:
                self.errors.append({"pointer": pointer(where),
                                    "detail": "control characters are not allowed"})
                return s
            if _SURROGATE.search(s):
                # A lone UTF-16 surrogate ("\ud800") is valid JSON but not valid Unicode:
                # nothing downstream could encode it.
                self.errors.append({"pointer": pointer(where),
                                    "detail": "unpaired surrogates are not allowed"})
                return s
            n = unicodedata.normalize("NFC", s)
            if n != s:
                self.changed = True
            return n
        if not s.isprintable() and s.translate(_CONTROL_TABLE) != s:
            self.errors.append({"pointer": pointer(where),
                                "detail": "control characters are not allowed"})
        return s

    def walk(self, value: Any, depth: int, where: list[Any]) -> Any:
        if len(self.errors) >= _MAX_ERRORS:
            return value
        if isinstance(value, str):
            return self.text(value, where)
        if isinstance(value, dict | list):
            if depth >= self.max_depth:
                self.errors.append({"pointer": pointer(where),
                                    "detail": f"nested deeper than {self.max_depth} levels"})
                return value
            if isinstance(value, list):
                return [self.walk(v, depth + 1, [*where, i]) for i, v in enumerate(value)]
            out = {}
            for k, v in value.items():
                key = self.text(k, [*where, k])
                out[key] = self.walk(v, depth + 1, [*where, k])
            return out
        return value


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def parse_json(request: Request, limits: LimitsSection) -> Any:
    """The request's body as JSON, checked against the limits and NFC-normalised."""
    if not _is_json(request.headers.get("content-type", "application/json")):
        raise UnsupportedMediaType(
            f"expected Content-Type application/json, got {request.headers.get('content-type')!r}"
        )
    try:
        # UTF-8 only (RFC 8259 §8.1): json.loads(bytes) would also guess UTF-16 and UTF-32.
        # A byte order mark is no part of the JSON text either.
        text = request.body.decode("utf-8")
        if text.startswith("\ufeff"):
            raise MalformedJson("the body starts with a byte order mark; send UTF-8 JSON "
                                "without one")
        value = loads(text)
    except UnicodeDecodeError as e:
        raise MalformedJson("the body is not UTF-8") from e
    except _Refused as e:
        raise MalformedJson(f"the body is not valid JSON: {e}") from e
    except json.JSONDecodeError as e:
        raise MalformedJson(f"the body is not valid JSON: {e.msg} at line {e.lineno} "
                            f"column {e.colno}") from e
    except ValueError as e:
        raise MalformedJson("the body is not valid JSON") from e
    except RecursionError as e:
        raise ValidationFailed([{"pointer": "", "detail": f"nested deeper than "
                                 f"{limits.json_depth} levels"}]) from e
    walker = _Walker(limits)
    value = walker.walk(value, 0, [])
    if walker.errors:
        raise ValidationFailed(walker.errors)
    if walker.changed:
        request.body = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    return value


def make_step(limits: Callable[[], LimitsSection]) -> Callable[[Request], None]:
    """The validation step of the security chain."""

    def validate(request: Request) -> None:
        entry = request.route
        assert entry is not None
        # Adapters bound what they buffer (REST while the body arrives); this is the limit
        # for every transport alike.
        if len(request.body) > limits().body_max:
            raise PayloadTooLarge(f"the request body is larger than {limits().body_max} bytes")
        stream = request.query.get("stream")
        if stream is not None and stream not in ("true", "false"):
            raise ValidationFailed([{"pointer": "", "parameter": "stream",
                                     "detail": "the query parameter stream is true or false"}])
        has_body = bool(request.body)
        validator: Draft202012Validator | None = entry.extra.get("validator")
        if validator is None:
            # Whatever the method, a body that travels on is JSON within the limits.
            if has_body and not entry.raw_body:
                request.json = parse_json(request, limits())
            return
        if not has_body:
            if request.method not in _BODY_METHODS:
                return
            if not validator.is_valid({}):
                raise ValidationFailed([{"pointer": "", "detail": "a JSON body is required"}])
            request.json = {}
            return
        document = parse_json(request, limits())
        errors: list[dict[str, str]] = []
        for error in validator.iter_errors(document):
            where = list(error.absolute_path)
            if error.validator == "additionalProperties" and isinstance(error.instance, dict):
                # Point at each unknown field rather than at the object holding it.
                known = error.schema.get("properties", {})
                errors.extend(
                    {"pointer": pointer([*where, key]), "detail": "unknown field"}
                    for key in error.instance
                    if key not in known
                )
            else:
                errors.append({"pointer": pointer(where), "detail": error.message})
            if len(errors) >= _MAX_ERRORS:
                break
        if errors:
            errors.sort(key=lambda e: e["pointer"])
            raise ValidationFailed(errors)
        request.json = document

    return validate
