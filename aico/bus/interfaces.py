"""The seams of the message bus, as ``zope.interface`` interfaces."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from aico.proto import AicoMessage

#: Called with (topic, message) for every message that matches a subscription.
MessageHandler = Callable[[str, AicoMessage], None]

# Well-known topics (docs/bus.md § Topics).
TOPIC_REGISTERED = "system/module/registered/v1"
TOPIC_HEARTBEAT = "system/module/heartbeat/v1"
#: Published by the gateway when it starts; modules answer by registering again.
TOPIC_DISCOVER = "system/module/discover/v1"

# Envelope attributes used for request/reply.
ATTR_CORRELATION_ID = "correlation_id"
ATTR_REPLY_TO = "reply_to"
#: On a request: "1" when the caller accepts a streamed reply.
#: On a reply: "chunk" for a part of a streamed reply, "end" for its last part;
#: absent on a plain (single) reply.
ATTR_STREAM = "stream"


class IMessageBus(Interface):
    """A connection to the message bus, driven by the reactor."""

    source = Attribute("The name this client puts in MessageMetadata.source.")

    def start() -> Deferred[None]:
        """Connect; fires once this client's reply topic is known to receive messages."""

    def stop() -> Deferred[None]:
        """Fail pending requests with ``BusStopped`` and close the sockets."""

    def publish(topic: str, message: AicoMessage) -> None:
        """Send *message* on *topic* (fire and forget)."""

    def subscribe(prefix: str, handler: MessageHandler) -> None:
        """Call *handler* for every message whose topic starts with *prefix*."""

    def unsubscribe(prefix: str, handler: MessageHandler) -> None:
        """Undo one ``subscribe(prefix, handler)``."""

    def request(
        topic: str,
        message: AicoMessage,
        timeout: float | None = None,
        on_chunk: Callable[[AicoMessage], None] | None = None,
    ) -> Deferred[AicoMessage]:
        """Publish *message* on *topic* with ``reply_to`` and a fresh ``correlation_id``.

        Fires with the reply; errbacks with ``BusTimeout`` after *timeout* seconds
        (the client's default when ``None``). With *on_chunk*, the request says it
        accepts a streamed reply: each ``stream=chunk`` reply goes to *on_chunk* (and
        restarts the timeout) and the ``stream=end`` reply fires the Deferred.
        Cancelling the Deferred forgets the request.
        """

    def reply(request: AicoMessage, response: AicoMessage, stream: str | None = None) -> None:
        """Publish *response* on the request's ``reply_to`` with its ``correlation_id``."""


class IBusControl(Interface):
    """What a real bus client offers beyond :class:`IMessageBus` (duck-typed by the SDK)."""

    running = Attribute("True between a successful start() and stop().")

    def wait_subscribed(prefixes: Sequence[str], timeout: float | None = None) -> Deferred[None]:
        """Fire once a message published on each prefix (subscribed here) comes back.

        ZeroMQ subscriptions propagate asynchronously (SUB → broker → every PUB); this is
        the barrier to use after subscribing on a running client and before announcing
        that you listen (a module registering its routes, the gateway asking for
        registrations). The probes carry the ``probe`` attribute; bus clients never hand
        such messages to handlers.
        """
