"""The built-in ``conversation`` module: an echo responder, streaming too.

Each reply is also published as an ``ApiEvent`` on the caller's own topic
``user/<subject>/conversation/output/v1`` (:func:`output_topic`), which that user may
subscribe to (``docs/protocols.md`` §1.5), so a client can try subscriptions end to end
with the built-in modules alone.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet.task import deferLater

from aico import fastjson
from aico.bus.errors import BusError
from aico.bus.module import BackendModule, ProblemError, RequestContext, Response, route
from aico.proto import ApiEvent, ApiRequest, wrap

TOPIC_USER_INPUT = "conversation/user/input/v1"
HEALTH_TOPIC = "conversation/health/v1"
#: Where each reply is published as an event, for the user who sent the message.
OUTPUT_TOPIC = "user/{subject}/conversation/output/v1"
#: Seconds between two streamed words (on the module's clock).
STREAM_DELAY = 0.005

REQUEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "ConversationMessageRequest",
    "type": "object",
    "properties": {
        "message": {"type": "string", "minLength": 1, "maxLength": 16000},
        "conversation_id": {"type": "string", "minLength": 1, "maxLength": 128},
    },
    "required": ["message"],
    "additionalProperties": False,
}

RESPONSE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "ConversationMessageResponse",
    "type": "object",
    "properties": {
        "conversation_id": {"type": "string"},
        "message_id": {"type": "string"},
        "reply": {"type": "string"},
    },
    "required": ["conversation_id", "message_id", "reply"],
    "additionalProperties": False,
}


def output_topic(subject: str) -> str | None:
    """The event topic of *subject*'s replies (``None`` for no usable subject)."""
    if not subject or "/" in subject:
        return None
    return OUTPUT_TOPIC.format(subject=subject)


def _wants_stream(request: ApiRequest) -> bool:
    return request.query.get("stream", "").lower() in ("true", "1", "yes")


class ConversationModule(BackendModule):
    """Echoes the user's message; with ``?stream=true`` it streams it word by word."""

    name = "conversation"
    version = "0.1.0"
    heartbeat_interval = 5.0
    health_topic = HEALTH_TOPIC
    stream_delay = STREAM_DELAY

    @route(
        "POST",
        "/api/v1/conversations/messages",
        topic=TOPIC_USER_INPUT,
        capability="conversations:write",
        request_schema=REQUEST_SCHEMA,
        response_schema=RESPONSE_SCHEMA,
    )
    async def user_input(self, request: ApiRequest, ctx: RequestContext) -> Response | None:
        body = ctx.json()
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, str) or not message:
            raise ProblemError(
                400,
                "validation_failed",
                "The request body does not match the schema.",
                extra={"errors": [{"pointer": "/message", "detail": "a non-empty string"}]},
            )
        # 32 random hex digits, like uuid4().hex without its 4 µs of UUID object.
        conversation_id = body.get("conversation_id") or os.urandom(16).hex()
        message_id = os.urandom(16).hex()
        reply = {"conversation_id": conversation_id, "message_id": message_id, "reply": message}
        if not (ctx.streaming and _wants_stream(request)):
            self.publish_reply(request, reply)
            return Response(200, reply)
        for i, word in enumerate(re.findall(r"\s*\S+\s*", message) or [message]):
            if i:
                await deferLater(self.clock, self.stream_delay)
            ctx.send_chunk({"delta": word}, headers={"content-type": "application/x-ndjson"})
        ctx.send_chunk({"done": True, "conversation_id": conversation_id, "message_id": message_id})
        self.publish_reply(request, reply)
        return None

    def publish_reply(self, request: ApiRequest, reply: dict[str, Any]) -> None:
        """Publish *reply* as an ``ApiEvent`` on the caller's output topic."""
        topic = output_topic(request.principal.subject)
        if topic is None:
            return
        body = fastjson.dumps(reply)
        try:
            self.bus.publish(topic, wrap(ApiEvent(topic=topic, body=body), source=self.name))
        except BusError as e:
            self.log.warn("conversation output event not published on {topic}: {error}",
                          topic=topic, error=str(e))
