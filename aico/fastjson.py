"""Compact JSON on the hot path: ``orjson`` where it gives what the standard library gives.

Each request encodes several small JSON documents (the module's answer, its output event,
the WebSocket frame) and decodes a few (the module's view of the body, the answer inside
a WebSocket frame). ``orjson`` does each in well under a microsecond where the standard
library takes 6 to 9 µs (docs/performance.md); these two functions use it and fall back to
the standard library for everything ``orjson`` would treat differently, so the result is
always the standard library's:

* :func:`dumps` is ``json.dumps(value, separators=(",", ":"), ensure_ascii=False)`` as
  UTF-8. Subclasses of the JSON types, dataclasses, dates, integers past 64 bits,
  ``NaN``/``Infinity`` (which the standard library writes as non-JSON tokens and
  ``orjson`` as ``null``) and anything not serialisable take the standard library's path
  (and its ``TypeError``/``ValueError``). Floats are written as the shortest text that
  reads back as the same float — the same number, not always the same digits
  (``1e16`` rather than ``1e+16``).
* :func:`loads` is ``json.loads``: what ``orjson`` refuses (``NaN``, lone surrogates,
  a byte order mark, non-UTF-8 bytes) or reads differently (integers past 64 bits, which
  it makes floats: any text with 19 digits in a row) is read by the standard library,
  which accepts or refuses it as it always did.

Client input is *not* read here: the security chain's strict decoder
(:func:`aico.gateway.security.validate.loads`) refuses duplicate members, which neither
library does.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

__all__ = ["dumps", "loads"]

_OPTIONS = (orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS
            | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS)
_LONG_DIGITS = re.compile(r"[0-9]{19}")
_LONG_DIGITS_B = re.compile(rb"[0-9]{19}")


class _Different(Exception):
    """``orjson`` would write this value differently from the standard library."""


def _refuse(value: Any) -> Any:
    raise _Different


def _standard(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def dumps(value: Any) -> bytes:
    """``json.dumps(value, separators=(",", ":"), ensure_ascii=False)`` in UTF-8."""
    try:
        out = orjson.dumps(value, default=_refuse, option=_OPTIONS)
    except (orjson.JSONEncodeError, _Different):
        return _standard(value)
    if b"null" in out and _has_non_finite(value):
        return _standard(value)  # orjson writes NaN and Infinity as null
    return out


def _has_non_finite(value: Any) -> bool:
    if type(value) is float:
        return not math.isfinite(value)
    if type(value) is dict:
        return any(_has_non_finite(k) or _has_non_finite(v) for k, v in value.items())
    if type(value) in (list, tuple):
        return any(_has_non_finite(v) for v in value)
    return False


def loads(data: bytes | str) -> Any:
    """``json.loads(data)``."""
    # orjson reads an integer past 64 bits as a float: any run of 19 digits (a long
    # string of digits too) goes to the standard library.
    if isinstance(data, str):
        if _LONG_DIGITS.search(data):
            return json.loads(data)
    elif _LONG_DIGITS_B.search(data):
        return json.loads(data)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
