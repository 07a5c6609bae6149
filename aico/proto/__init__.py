"""The wire contract: generated Protocol Buffers classes and envelope helpers.

The ``.proto`` files under ``proto/`` are the single source of truth; the modules
under ``aico.proto.aico`` are generated from them by ``make proto``.
"""

from __future__ import annotations

import os
import time
from typing import TypeVar

from google.protobuf.message import Message

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
    """Pack *payload* into a new ``AicoMessage`` with fresh metadata."""
    msg = AicoMessage()
    meta = msg.metadata
    meta.message_id = message_id or os.urandom(16).hex()
    now = time.time()
    meta.timestamp.seconds = int(now)
    meta.timestamp.nanos = int((now % 1) * 1e9)
    meta.source = source
    meta.message_type = payload.DESCRIPTOR.full_name
    meta.version = "1"
    if attributes:
        meta.attributes.update(attributes)
    msg.any_payload.Pack(payload)
    return msg


def unpack(msg: AicoMessage, cls: type[M]) -> M:
    """Return the payload of *msg* as a *cls*; raise ``EnvelopeError`` if it is not one."""
    if not msg.HasField("any_payload"):
        raise EnvelopeError("message has no payload")
    out = cls()
    if not msg.any_payload.Unpack(out):
        raise EnvelopeError(
            f"payload is {msg.any_payload.TypeName()!r}, expected {cls.DESCRIPTOR.full_name!r}"
        )
    return out
