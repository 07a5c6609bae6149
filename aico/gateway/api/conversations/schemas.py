"""JSON Schemas of the conversations domain (the contract the gateway enforces)."""

from __future__ import annotations

from typing import Any

#: The bus topic that serves user input (SPEC §7).
INPUT_TOPIC = "conversation/user/input/v1"

MESSAGE_REQUEST: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "ConversationMessage",
    "type": "object",
    "properties": {
        "message": {"type": "string", "minLength": 1, "maxLength": 16000},
        "conversation_id": {"type": "string", "minLength": 1, "maxLength": 128},
    },
    "required": ["message"],
    "additionalProperties": False,
}

MESSAGE_RESPONSE: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "ConversationReply",
    "type": "object",
    "properties": {
        "conversation_id": {"type": "string"},
        "message_id": {"type": "string"},
        "reply": {"type": "string"},
    },
    "required": ["conversation_id", "message_id", "reply"],
}
