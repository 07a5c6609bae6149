"""JSON Schemas of the conversations domain.

The contract is the conversation module's own (one source of truth: the gateway may
import the bus package, never the other way round); the gateway enforces it on the way in.
"""

from __future__ import annotations

from typing import Any

from aico.bus.builtin.conversation import REQUEST_SCHEMA, RESPONSE_SCHEMA, TOPIC_USER_INPUT

#: The bus topic that serves user input (docs/bus.md).
INPUT_TOPIC: str = TOPIC_USER_INPUT

MESSAGE_REQUEST: dict[str, Any] = REQUEST_SCHEMA
MESSAGE_RESPONSE: dict[str, Any] = RESPONSE_SCHEMA
