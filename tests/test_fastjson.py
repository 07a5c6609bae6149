"""aico.fastjson gives what the standard library gives (orjson where it may, json else)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aico import fastjson


def standard(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values (NaN equal to NaN)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def non_finite(value: Any) -> bool:
    """Whether *value* holds a NaN or an infinity anywhere (keys included)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(non_finite(k) or non_finite(v) for k, v in value.items())
    if isinstance(value, list):
        return any(non_finite(v) for v in value)
    return False


# Text the encoder can write (lone surrogates cannot be UTF-8 in either library).
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | text)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(text | st.integers(-5, 5) | st.booleans(), inner, max_size=4),
                      max_leaves=20)
finite = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=20)


class DumpsTests(SynchronousTestCase):
    @settings(max_examples=400, deadline=None)
    @given(values)
    def test_the_text_reads_back_as_the_standard_librarys(self, value: Any) -> None:
        ours = fastjson.dumps(value)
        if non_finite(value):
            self.assertEqual(ours, standard(value))  # non-JSON tokens: the standard path
        else:
            self.assertTrue(same(json.loads(ours), json.loads(standard(value))))

    @settings(max_examples=400, deadline=None)
    @given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | text,
                        lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(text, inner, max_size=4), max_leaves=20))
    def test_without_floats_the_bytes_are_the_standard_librarys(self, value: Any) -> None:
        self.assertEqual(fastjson.dumps(value), standard(value))

    def test_what_orjson_would_write_differently_takes_the_standard_path(self) -> None:
        class Text(str):
            pass

        @dataclasses.dataclass
        class Point:
            x: int

        for value in ({"n": float("nan")}, [float("inf"), None], 2**80, {"s": Text("x")},
                      {1: "int key", False: "bool key", None: "none key", 2.5: "float key"},
                      [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]):
            self.assertEqual(fastjson.dumps(value), standard(value), value)
        deep: Any = 1
        for _ in range(300):  # past orjson's nesting limit
            deep = [deep]
        self.assertEqual(fastjson.dumps(deep), standard(deep))
        for refused in (Point(1), datetime.date(2026, 1, 1), object()):
            with self.assertRaises(TypeError):
                fastjson.dumps(refused)
        with self.assertRaises(UnicodeEncodeError):
            fastjson.dumps("\ud800")


class LoadsTests(SynchronousTestCase):
    @settings(max_examples=400, deadline=None)
    @given(values)
    def test_reads_what_the_standard_library_reads(self, value: Any) -> None:
        for data in (standard(value), json.dumps(value), json.dumps(value).encode()):
            self.assertTrue(same(fastjson.loads(data), json.loads(data)), data)

    @settings(max_examples=200, deadline=None)
    @given(finite)
    def test_values_round_trip(self, value: Any) -> None:
        self.assertTrue(same(fastjson.loads(fastjson.dumps(value)),
                             json.loads(standard(value))))

    def test_what_orjson_refuses_is_read_as_the_standard_library_reads_it(self) -> None:
        for data in (b"NaN", b"[Infinity, -Infinity]", b'"\\ud800"', b"123456789012345678901234567890",
                     "\ufeff[1]".encode(), '{"a": 1}'.encode("utf-16"), b"1e400"):
            self.assertTrue(same(fastjson.loads(data), json.loads(data)), data)
        for bad in (b"{", b"[1,]", "\ufeff[1]", b"\xff"):
            with self.assertRaises(ValueError):
                json.loads(bad)
            with self.assertRaises(ValueError):
                fastjson.loads(bad)
