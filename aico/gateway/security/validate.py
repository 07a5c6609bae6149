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


#: The one strict decoder (``json.loads`` with these hooks would build a new
#: ``JSONDecoder`` on every call: ~1.5 µs of a small body's ~4 µs).
_DECODER = json.JSONDecoder(parse_constant=_no_constants, parse_float=_finite,
                            object_pairs_hook=_no_duplicates)


def loads(data: bytes | str) -> Any:
    """Strict JSON: no ``NaN``/``Infinity`` (nor numbers that overflow to it), no duplicate
    members. Otherwise exactly ``json.loads`` (bytes in any encoding it detects, a str
    starting with a byte order mark refused)."""
    if isinstance(data, str):
        if data.startswith("\ufeff"):
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", data, 0)
    elif isinstance(data, bytes | bytearray):
        data = data.decode(json.detect_encoding(data), "surrogatepass")
    else:
        raise TypeError(f"the JSON object must be str, bytes or bytearray, "
                        f"not {data.__class__.__name__}")
    return _DECODER.decode(data)


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


# ---------------------------------------------------------------------- the fast path
#
# jsonschema costs ~15-70 µs to accept a one-field body (it evolves a validator and
# descends per keyword). Most route schemas use a handful of keywords, so each is also
# compiled, once, into plain Python closures that can only say "valid for certain"
# (True) or "ask jsonschema" (False). A True must imply that jsonschema accepts: every
# keyword check below returns True only where jsonschema's own keyword passes, and a
# keyword or value it cannot decide that way makes the check answer False (jsonschema
# then gives the verdict and today's errors). A schema with any other keyword gets no
# fast path at all (decided at prepare time). The checks see documents made by
# parse_json only: exact JSON types (dict, list, str, int, float, bool, None), which is
# why they test ``type(v) is ...``. tests/test_validate_fast.py feeds both the
# same generated bodies for every schema in the route table.

FastCheck = Callable[[Any], bool]

_DIALECTS = frozenset({"https://json-schema.org/draft/2020-12/schema",
                       "https://json-schema.org/draft/2020-12/schema#"})
#: Keywords that never change a verdict under ``Draft202012Validator(schema)`` (no format
#: checker: ``format`` is an annotation).
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment",
                          "format", "readOnly", "writeOnly", "deprecated"})
_FAST_KEYWORDS = _ANNOTATIONS | frozenset({
    "$schema", "type", "properties", "additionalProperties", "required", "minProperties",
    "maxProperties", "minLength", "maxLength", "pattern", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "items", "minItems", "maxItems",
    "uniqueItems", "enum", "const",
})


class _NoFastPath(Exception):
    """The schema uses something the fast path does not decide: jsonschema only."""


def _always(value: Any) -> bool:
    return True


def _never(value: Any) -> bool:
    return False


def _is_number(value: Any) -> bool:
    return type(value) is int or type(value) is float


def _is_integer(value: Any) -> bool:
    return type(value) is int or (type(value) is float and value.is_integer())


_TYPE_CHECKS: dict[str, FastCheck] = {
    "object": lambda v: type(v) is dict,
    "array": lambda v: type(v) is list,
    "string": lambda v: type(v) is str,
    "boolean": lambda v: type(v) is bool,
    "null": lambda v: v is None,
    "number": _is_number,
    "integer": _is_integer,
}


def _all(checks: list[FastCheck]) -> FastCheck:
    if not checks:
        return _always
    if len(checks) == 1:
        return checks[0]
    frozen = tuple(checks)

    def every(value: Any) -> bool:
        for check in frozen:
            if not check(value):
                return False
        return True

    return every


def _type_check(wanted: Any) -> FastCheck:
    names = [wanted] if isinstance(wanted, str) else wanted
    if not isinstance(names, list) or not names or any(n not in _TYPE_CHECKS for n in names):
        raise _NoFastPath("type")
    checks = tuple(_TYPE_CHECKS[n] for n in names)
    if len(checks) == 1:
        return checks[0]
    return lambda v: any(c(v) for c in checks)


def _bound(limit: Any) -> float | int:
    if not _is_number(limit):
        raise _NoFastPath("a bound that is not a number")
    return limit  # type: ignore[no-any-return]


def _object_check(schema: Mapping[str, Any]) -> FastCheck | None:
    properties = schema.get("properties")
    additional = schema.get("additionalProperties", True)
    required = schema.get("required", [])
    min_p = schema.get("minProperties")
    max_p = schema.get("maxProperties")
    if properties is None and additional is True and not required and min_p is None \
            and max_p is None:
        return None
    if not isinstance(properties or {}, dict) or not isinstance(required, list) \
            or not all(isinstance(r, str) for r in required):
        raise _NoFastPath("properties/required")
    known = {name: _compile_fast(sub) for name, sub in (properties or {}).items()}
    extra: FastCheck | None = None if additional is False else _compile_fast(additional)
    needed = tuple(required)
    lo = -1 if min_p is None else int(_bound(min_p))
    hi = -1 if max_p is None else int(_bound(max_p))

    def check(value: Any) -> bool:
        if type(value) is not dict:
            return True  # object keywords do not apply (``type`` says whether it may be one)
        for name in needed:
            if name not in value:
                return False
        if (lo >= 0 and len(value) < lo) or (hi >= 0 and len(value) > hi):
            return False
        for name, member in value.items():
            sub = known.get(name)
            if sub is None:
                if extra is None or not extra(member):
                    return False
            elif not sub(member):
                return False
        return True

    return check


def _string_check(schema: Mapping[str, Any]) -> FastCheck | None:
    min_len = schema.get("minLength")
    max_len = schema.get("maxLength")
    pattern = schema.get("pattern")
    if min_len is None and max_len is None and pattern is None:
        return None
    lo = 0 if min_len is None else _bound(min_len)
    hi = None if max_len is None else _bound(max_len)
    search = None
    if pattern is not None:
        if not isinstance(pattern, str):
            raise _NoFastPath("pattern")
        search = re.compile(pattern).search  # what jsonschema's re.search compiles

    def check(value: Any) -> bool:
        if type(value) is not str:
            return True
        n = len(value)
        if n < lo or (hi is not None and n > hi):
            return False
        return search is None or search(value) is not None

    return check


def _number_check(schema: Mapping[str, Any]) -> FastCheck | None:
    if not any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum",
                                     "exclusiveMaximum")):
        return None
    inf = float("inf")
    lo = _bound(schema.get("minimum", -inf))
    hi = _bound(schema.get("maximum", inf))
    lo_x = _bound(schema.get("exclusiveMinimum", -inf))
    hi_x = _bound(schema.get("exclusiveMaximum", inf))

    def check(value: Any) -> bool:
        if not _is_number(value):
            return True
        return bool(lo <= value <= hi and lo_x < value < hi_x)

    return check


def _array_check(schema: Mapping[str, Any]) -> FastCheck | None:
    if not any(k in schema for k in ("items", "minItems", "maxItems", "uniqueItems")):
        return None
    items = _compile_fast(schema["items"]) if "items" in schema else None
    lo = _bound(schema.get("minItems", 0))
    hi = _bound(schema["maxItems"]) if "maxItems" in schema else None
    unique = schema.get("uniqueItems", False)
    if not isinstance(unique, bool):
        raise _NoFastPath("uniqueItems")

    def check(value: Any) -> bool:
        if type(value) is not list:
            return True
        n = len(value)
        if n < lo or (hi is not None and n > hi):
            return False
        if unique:
            # Decided here for strings only (jsonschema's equality of 1, 1.0 and True is
            # its own); anything else goes to jsonschema.
            if not all(type(v) is str for v in value) or len(set(value)) != n:
                return False
        return items is None or all(items(v) for v in value)

    return check


def _constant_check(schema: Mapping[str, Any]) -> FastCheck | None:
    checks = []
    if "enum" in schema:
        if not isinstance(schema["enum"], list):
            raise _NoFastPath("enum")
        # Strings are equal only to equal strings in jsonschema; other members and
        # other instances are left to it.
        texts = frozenset(v for v in schema["enum"] if isinstance(v, str))
        checks.append(lambda v: type(v) is str and v in texts)
    if "const" in schema:
        const = schema["const"]
        if isinstance(const, str):
            checks.append(lambda v: type(v) is str and v == const)
        elif const is None:
            checks.append(lambda v: v is None)
        else:
            checks.append(_never)
    return _all(checks) if checks else None


def _compile_fast(schema: Any) -> FastCheck:
    if schema is True:
        return _always
    if schema is False:
        return _never
    if not isinstance(schema, dict):
        raise _NoFastPath("not a schema")
    unknown = schema.keys() - _FAST_KEYWORDS
    if unknown:
        raise _NoFastPath(", ".join(sorted(unknown)))
    checks: list[FastCheck] = []
    if "type" in schema:
        checks.append(_type_check(schema["type"]))
    for part in (_constant_check, _object_check, _string_check, _number_check, _array_check):
        check = part(schema)
        if check is not None:
            checks.append(check)
    return _all(checks)


def compile_fast(schema: Any) -> FastCheck | None:
    """The fast acceptance check of a (strict, valid) 2020-12 *schema*, or ``None`` when it
    uses a keyword the fast path does not decide (then jsonschema alone validates)."""
    if isinstance(schema, dict) and "$schema" in schema and schema["$schema"] not in _DIALECTS:
        return None
    try:
        return _compile_fast(schema)
    except (_NoFastPath, re.error, TypeError, ValueError):
        return None


def prepare(entries: Iterable[RouteEntry]) -> list[RouteEntry]:
    """Compile each route's request validator once; raise ``InvalidSchema`` for a bad one.

    Each also gets its fast acceptance check (``extra["fast_valid"]``, or ``None`` when
    its schema needs jsonschema for every body)."""
    out = []
    for entry in entries:
        if entry.request_schema is not None and "validator" not in entry.extra:
            schema = strict(entry.request_schema)
            try:
                entry.extra["validator"] = compile_schema(schema)
            except InvalidSchema as e:
                raise InvalidSchema(f"{entry.method} {entry.path}: {e}") from e
            entry.extra["fast_valid"] = compile_fast(schema)
        out.append(entry)
    return out


def pointer(path: Iterable[Any]) -> str:
    """RFC 6901 JSON pointer of a path of keys and indexes."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


#: Where a value sits, built only as deep as the walk goes: ``(parent, key)`` pairs
#: (``None`` at the root), turned into a path only for an error.
_Where = tuple[Any, Any] | None


def _path(where: _Where) -> list[Any]:
    out: list[Any] = []
    while where is not None:
        where, key = where
        out.append(key)
    out.reverse()
    return out


class _Walker:
    """Checks limits and NFC-normalises strings in one pass over a parsed document."""

    def __init__(self, limits: LimitsSection) -> None:
        self.max_depth = limits.json_depth
        self.max_string = limits.string_max
        self.errors: list[dict[str, str]] = []
        self.changed = False

    def _error(self, where: _Where, detail: str) -> None:
        self.errors.append({"pointer": pointer(_path(where)), "detail": detail})

    def text(self, s: str, where: _Where) -> str:
        if len(s) > self.max_string:
            self._error(where, f"string longer than {self.max_string} characters")
            return s
        if not s.isascii():
            if s.translate(_CONTROL_TABLE) != s:
                self._error(where, "control characters are not allowed")
                return s
            if _SURROGATE.search(s):
                # A lone UTF-16 surrogate ("\ud800") is valid JSON but not valid Unicode:
                # nothing downstream could encode it.
                self._error(where, "unpaired surrogates are not allowed")
                return s
            n = unicodedata.normalize("NFC", s)
            if n != s:
                self.changed = True
            return n
        if not s.isprintable() and s.translate(_CONTROL_TABLE) != s:
            self._error(where, "control characters are not allowed")
        return s

    def walk(self, value: Any, depth: int, where: _Where) -> Any:
        if len(self.errors) >= _MAX_ERRORS:
            return value
        if isinstance(value, str):
            return self.text(value, where)
        if isinstance(value, dict | list):
            if depth >= self.max_depth:
                self._error(where, f"nested deeper than {self.max_depth} levels")
                return value
            if isinstance(value, list):
                return [self.walk(v, depth + 1, (where, i)) for i, v in enumerate(value)]
            out = {}
            for k, v in value.items():
                here = (where, k)
                out[self.text(k, here)] = self.walk(v, depth + 1, here)
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
    if request.body_value is not None:
        # Read already, with this module's strict decoder, from the text the body is.
        return _checked(request, limits, request.body_value)
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
    return _checked(request, limits, value)


def _checked(request: Request, limits: LimitsSection, value: Any) -> Any:
    """*value* within the limits and NFC-normalised (the body rewritten if that changed it)."""
    walker = _Walker(limits)
    value = walker.walk(value, 0, None)
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
        fast: FastCheck | None = entry.extra.get("fast_valid")
        if fast is not None and fast(document):
            request.json = document
            return
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
