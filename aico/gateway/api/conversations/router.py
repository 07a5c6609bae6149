"""``POST /api/v1/conversations/messages`` → ``conversation/user/input/v1``.

The gateway owns this route's contract (schema, capability); the conversation module
serves its topic. ``?stream=true`` answers ``application/x-ndjson``, each chunk written
to the client as the module publishes it.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from aico.gateway.api.conversations.dependencies import ConversationsDeps
from aico.gateway.api.conversations.exceptions import ConversationModuleUnavailable
from aico.gateway.api.conversations.schemas import INPUT_TOPIC, MESSAGE_REQUEST, MESSAGE_RESPONSE
from aico.gateway.routing.messages import Request, Response
from aico.gateway.routing.table import RouteEntry


def routes(deps: ConversationsDeps) -> list[RouteEntry]:
    forwarder = deps.forwarder

    def send_message(request: Request) -> Deferred[Response] | Response:
        if not forwarder.is_served(INPUT_TOPIC):
            raise ConversationModuleUnavailable()
        return forwarder.forward(request, INPUT_TOPIC)

    return [
        RouteEntry(
            method="POST",
            path="/api/v1/conversations/messages",
            handler=send_message,
            capability="conversations:write",
            request_schema=MESSAGE_REQUEST,
            response_schema=MESSAGE_RESPONSE,
            topics=(INPUT_TOPIC,),
            streaming=True,
            summary="Send a message to the conversation module (streamed with ?stream=true)",
        )
    ]
