"""The wire contract: generated Protocol Buffers classes and envelope helpers.

The ``.proto`` files under ``proto/`` are the single source of truth; the modules
under ``aico.proto.aico`` are generated from them by ``make proto``.
"""

from __future__ import annotations

import os
import time
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from aico.proto.aico.core.envelope_pb2 import AicoMessage, MessageMetadata
from aico.proto.aico.gateway.v1.gateway_pb2 import (
    ApiEvent,
    ApiRequest,
    ApiResponse,
    ModuleHeartbeat,
    ModuleRegistration,
    Principal,
    Route,
)

__all__ = [
    "TYPE_URL_PREFIX",
    "AicoMessage",
    "ApiEvent",
    "ApiRequest",
    "ApiResponse",
    "EnvelopeError",
    "MessageMetadata",
    "ModuleHeartbeat",
    "ModuleRegistration",
    "Principal",
    "Route",
    "type_name",
    "unpack",
    "wrap",
]

M = TypeVar("M", bound=Message)


class EnvelopeError(ValueError):
    """An ``AicoMessage`` that does not hold the expected payload."""


def wrap(
    payload: Message,
    source: str,
    attributes: dict[str, str] | None = None,
    message_id: str | None = None,
) -> AicoMessage:
    """Pack *payload* into a new ``AicoMessage`` with fresh metadata.

    The ``Any`` is filled by hand (``type_url`` + serialised payload): the same bytes as
    ``Any.Pack`` at half the cost of the whole call (4.8 vs 9.9 µs, timeit; it runs three
    times per bus round trip)."""
    msg = AicoMessage()
    meta = msg.metadata
    meta.message_id = message_id or os.urandom(16).hex()
    timestamp = meta.timestamp
    timestamp.seconds, timestamp.nanos = divmod(time.time_ns(), 1_000_000_000)
    meta.source = source
    name = payload.DESCRIPTOR.full_name
    meta.message_type = name
    meta.version = "1"
    if attributes:
        attrs = meta.attributes  # item by item: MutableMapping.update is 2x slower here
        for key, value in attributes.items():
            attrs[key] = value
    packed = msg.any_payload
    packed.type_url = TYPE_URL_PREFIX + name
    packed.value = payload.SerializeToString()
    return msg


#: The ``type_url`` prefix this gateway writes (Google's convention for ``Any``).
TYPE_URL_PREFIX = "type.googleapis.com/"


def type_name(type_url: str) -> str:
    """The message name a ``type_url`` names: the part after its last ``/`` (all of a
    bare ``aico.gateway.v1.ApiRequest``)."""
    return type_url.rpartition("/")[2]


def unpack(msg: AicoMessage, cls: type[M]) -> M:
    """Return the payload of *msg* as a *cls*; raise ``EnvelopeError`` if it is not one.

    ``any_payload.type_url`` matches when the part after its last ``/`` is *cls*'s full
    name: ``type.googleapis.com/aico.gateway.v1.ApiRequest`` (what :func:`wrap` writes),
    any other ``prefix/aico.gateway.v1.ApiRequest``, and the bare full name alike. The
    error says what was found and what was expected, for the client that sent it.
    """
    expected = cls.DESCRIPTOR.full_name
    form = f"{TYPE_URL_PREFIX}{expected}"
    if not msg.HasField("any_payload"):
        raise EnvelopeError(f"the AicoMessage has no any_payload; expected one with type_url {form!r}")
    type_url = msg.any_payload.type_url
    if type_name(type_url) != expected:
        found = repr(type_url[:128]) if type_url else "empty"
        raise EnvelopeError(
            f"any_payload.type_url is {found}, expected {form!r} (or the bare {expected!r}; "
            "the part after the last '/' names the payload)")
    out = cls()
    try:
        out.ParseFromString(msg.any_payload.value)
    except DecodeError as e:
        raise EnvelopeError(f"any_payload.value is not a valid {expected}") from e
    return out
