"""The validation step's fast path agrees with jsonschema: same verdict, same answers.

Every request schema of the route table (the gateway's own routes, the admin site's, the
in-process modules') and a few schemas that use each keyword the fast path decides are
fed the same generated bodies through both: the fast acceptance check and
``Draft202012Validator``, and the whole step with and without its fast path.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from twisted.trial.unittest import SynchronousTestCase

from aico.gateway.config import LimitsSection
from aico.gateway.errors import ApiError
from aico.gateway.routing.messages import Request
from aico.gateway.routing.table import RouteEntry
from aico.gateway.security import validate
from aico.gateway.testing.memory import MemoryGateway

LIMITS = LimitsSection()

#: Schemas beyond the route table's: every keyword the fast path decides, with values it
#: must leave to jsonschema (non-string enum and const members, uniqueItems over numbers
#: and booleans, integers written as floats).
EXTRA_SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {
        "n": {"type": "number", "minimum": -2, "maximum": 2.5},
        "i": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
        "e": {"enum": ["a", 1, 1.0, True, None, [1], {"k": "v"}]},
        "c": {"const": 1}, "c0": {"const": False}, "cn": {"const": None},
        "cs": {"const": "x"},
        "u": {"type": "array", "uniqueItems": True, "minItems": 1, "maxItems": 3},
        "t": {"type": ["string", "null"], "maxLength": 3, "pattern": "^[a-z]*$"},
        "b": {"type": "boolean"},
        "o": {"type": "object", "minProperties": 1, "maxProperties": 2,
              "additionalProperties": {"type": "integer"}},
    }, "required": ["n"]},
    {"type": "array", "items": {"type": "string", "minLength": 2}},
    {"properties": {"x": False, "y": True}, "additionalProperties": True},
    {"type": "object", "additionalProperties": False, "properties": {}},
]

#: Schemas the fast path must leave to jsonschema entirely.
NO_FAST_PATH: list[dict[str, Any]] = [
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "$defs": {"a": {}}},
    {"type": "object", "unevaluatedProperties": False},
    {"type": "object", "patternProperties": {"^x": {"type": "string"}}},
    {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    {"type": "number", "multipleOf": 0.1},
    {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object"},
    {"type": "array", "prefixItems": [{"type": "string"}]},
]


def route_table_schemas() -> Iterator[tuple[str, dict[str, Any]]]:
    """(``METHOD path``, strict schema) of every route with a request schema."""
    gw = MemoryGateway()
    try:
        tables = [gw.parts.dispatcher.table, gw.parts.admin.dispatcher.table]
        for table in tables:
            for entry in table.entries:
                if entry.request_schema is not None:
                    yield f"{entry.method} {entry.path}", validate.strict(entry.request_schema)
    finally:
        gw.stop()


ROUTE_SCHEMAS = list(route_table_schemas())
ALL_SCHEMAS = [s for _, s in ROUTE_SCHEMAS] + [validate.strict(s) for s in EXTRA_SCHEMAS]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 12), st.integers(),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.0, 1.0, 2.5, 10.0, -2.0]),
    st.text(max_size=6), st.sampled_from(["", "a", "ab", "x", "Bearer", "user", "admin", "A_",
                                          ".", "..", "a.b", "abcd", "1"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=4),
    max_leaves=10,
)


def near(schema: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values that often satisfy *schema* and often just miss it."""
    if not isinstance(schema, dict) or depth > 3:
        return json_values
    options: list[st.SearchStrategy[Any]] = [json_values]
    if "enum" in schema:
        options.append(st.sampled_from(schema["enum"]))
    if "const" in schema:
        options.append(st.just(schema["const"]))
    if "properties" in schema:
        props = schema["properties"]
        names = sorted(props)
        extra = st.tuples(st.sampled_from(["zz", "extra", "x"]), json_values)
        member = st.sampled_from(names).flatmap(
            lambda n: st.tuples(st.just(n), near(props[n], depth + 1))) if names else extra
        options += [
            st.lists(member, max_size=len(names) + 1).map(dict),
            st.lists(member | extra, max_size=len(names) + 2).map(dict),
            st.fixed_dictionaries({n: near(props[n], depth + 1) for n in names}),
        ]
    if "minLength" in schema or "maxLength" in schema or "pattern" in schema:
        hi = schema.get("maxLength", 8)
        options.append(st.text(alphabet="abcAZ09._-é\u00e9", min_size=0,
                               max_size=min(hi + 2, 80)))
        options.append(st.builds(lambda n, c: c * n, st.sampled_from([max(0, hi - 1), hi, hi + 1]),
                                 st.sampled_from(["a", "é", ".", "-"])))
    if "items" in schema or "uniqueItems" in schema or "minItems" in schema:
        options.append(st.lists(near(schema.get("items", True), depth + 1), max_size=5))
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        bounds = [schema[k] for k in ("minimum", "maximum", "exclusiveMinimum",
                                      "exclusiveMaximum") if k in schema]
        options.append(st.sampled_from(bounds).flatmap(
            lambda b: st.sampled_from([b, b - 1, b + 1, b - 0.5, b + 0.5, float(b), int(b)])))
    return st.one_of(options)


#: Each schema's route, prepared once (with its fast path) and once more without one.
PREPARED: dict[int, tuple[RouteEntry, RouteEntry]] = {}
for _schema in ALL_SCHEMAS:
    (_fast,) = validate.prepare([RouteEntry("POST", "/x", lambda r: None, capability="x",
                                            request_schema=_schema)])
    PREPARED[id(_schema)] = (_fast, RouteEntry("POST", "/x", lambda r: None, capability="x",
                                               request_schema=_schema,
                                               extra={**_fast.extra, "fast_valid": None}))
VALIDATORS = {id(s): Draft202012Validator(s) for s in ALL_SCHEMAS}

schema_and_body = st.sampled_from(ALL_SCHEMAS).flatmap(
    lambda s: st.tuples(st.just(s), near(s)))


def run_step(entry: RouteEntry, body: bytes) -> tuple[str, Any]:
    request = Request("POST", entry.path, "r" * 32, "http", route=entry, body=body,
                      headers={"content-type": "application/json"})
    try:
        validate.make_step(lambda: LIMITS)(request)
    except ApiError as e:
        return "refused", (type(e), e.status, e.detail, copy.deepcopy(e.extra))
    return "accepted", (request.json, request.body)


class FastPathAgreesWithJsonschemaTests(SynchronousTestCase):
    def test_the_route_table_has_request_schemas_and_each_gets_a_fast_path(self) -> None:
        names = {name for name, _ in ROUTE_SCHEMAS}
        self.assertIn("POST /api/v1/conversations/messages", names)
        self.assertIn("POST /api/v1/users/authenticate", names)
        for name, schema in ROUTE_SCHEMAS:
            self.assertIsNotNone(validate.compile_fast(schema), name)

    def test_schemas_with_other_keywords_are_left_to_jsonschema_at_prepare_time(self) -> None:
        for schema in NO_FAST_PATH:
            self.assertIsNone(validate.compile_fast(validate.strict(schema)), schema)
            (entry,) = validate.prepare([RouteEntry("POST", "/x", lambda r: None,
                                                    capability="x", request_schema=schema)])
            self.assertIsNone(entry.extra["fast_valid"])

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
    @given(schema_and_body)
    def test_the_fast_check_accepts_only_what_jsonschema_accepts(self, case: Any) -> None:
        schema, body = case
        fast = validate.compile_fast(schema)
        assert fast is not None
        valid = VALIDATORS[id(schema)].is_valid(body)
        if fast(body):
            self.assertTrue(valid, (schema, body))
        if any(schema is s for _, s in ROUTE_SCHEMAS):
            # the route table's schemas are decided by the fast path alone, both ways
            self.assertEqual(fast(body), valid, (schema, body))

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(schema_and_body)
    def test_the_step_answers_the_same_with_and_without_its_fast_path(self, case: Any) -> None:
        schema, body = case
        with_fast, without = PREPARED[id(schema)]
        data = json.dumps(body, ensure_ascii=False).encode()
        self.assertEqual(run_step(with_fast, data), run_step(without, data))

    def test_refusals_keep_their_pointers_and_details(self) -> None:
        schema = validate.strict(dict(ROUTE_SCHEMAS)["POST /api/v1/conversations/messages"])
        (entry,) = validate.prepare([RouteEntry("POST", "/x", lambda r: None,
                                                capability="x", request_schema=schema)])
        verdict, (_, status, _, extra) = run_step(entry, b'{"message": "", "x": 1, "y": 2}')
        self.assertEqual((verdict, status), ("refused", 400))
        self.assertEqual(extra["errors"], [
            {"pointer": "/message", "detail": "'' should be non-empty"},
            {"pointer": "/x", "detail": "unknown field"},
            {"pointer": "/y", "detail": "unknown field"},
        ])
        verdict, (document, _) = run_step(entry, b'{"message": "hi"}')
        self.assertEqual((verdict, document), ("accepted", {"message": "hi"}))


class StrictDecoderTests(SynchronousTestCase):
    """validate.loads (one decoder built once) refuses what it refused before."""

    def test_it_refuses_duplicates_constants_and_overflowing_numbers(self) -> None:
        for text in ('{"a": 1, "a": 2}', "NaN", "[Infinity]", "-Infinity", "1e400"):
            with self.assertRaises(ValueError, msg=text):
                validate.loads(text)

    def test_it_takes_bytes_and_text_as_json_loads_does(self) -> None:
        self.assertEqual(validate.loads(b'{"a": [1, 2.5, "\\u00e9"]}'), {"a": [1, 2.5, "é"]})
        self.assertEqual(validate.loads('{"a":"x"}'.encode("utf-16")), {"a": "x"})
        with self.assertRaises(json.JSONDecodeError):
            validate.loads('\ufeff{"a": 1}')
        with self.assertRaises(TypeError):
            validate.loads(1)  # type: ignore[arg-type]

    @settings(max_examples=500, deadline=None)
    @given(json_values.filter(lambda v: not isinstance(v, float) or abs(v) < 1e300))
    def test_it_reads_what_the_standard_library_reads(self, value: Any) -> None:
        text = json.dumps(value)
        try:
            expected: Any = json.loads(text, parse_constant=validate._no_constants,
                                       parse_float=validate._finite,
                                       object_pairs_hook=validate._no_duplicates)
        except ValueError as e:
            expected = type(e)
        try:
            got: Any = validate.loads(text)
        except ValueError as e:
            got = type(e)
        self.assertEqual(got, expected)
