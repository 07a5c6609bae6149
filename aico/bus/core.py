"""What every bus client does the same way, whatever carries its messages.

:class:`BusCore` holds the request/reply and subscription semantics of
:class:`~aico.bus.interfaces.IMessageBus` once: correlation ids and ``reply_to``,
timeouts on the client's clock, streamed replies (``stream`` = ``chunk``/``end``, each
chunk restarting the timeout), cancellation, prefix subscriptions with several handlers,
and handing received messages to them. The real client
(:class:`~aico.bus.client.BusClient`, over ZeroMQ) and the in-memory one
(:class:`~aico.bus.testing.MemoryBus`) add only how messages travel and how they start
and stop; ``tests/test_bus_contract.py`` runs the same behaviour tests on both.
"""

from __future__ import annotations

import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from aico.bus.errors import BusError, BusStopped, BusTimeout
from aico.bus.interfaces import ATTR_CORRELATION_ID, ATTR_REPLY_TO, ATTR_STREAM, MessageHandler
from aico.proto import AicoMessage, ApiRequest, ApiResponse

__all__ = ["BusCore", "DirectResponder"]

#: A request answered in process: the answer, or a Deferred of it.
DirectResponder = Callable[[ApiRequest], "ApiResponse | Deferred[ApiResponse]"]


@dataclass
class _Pending:
    topic: str
    deferred: Deferred[AicoMessage]
    timeout: float
    timer: IDelayedCall | None
    on_chunk: Callable[[AicoMessage], None] | None


class BusCore(ABC):
    """Request/reply and subscriptions; subclasses say how messages travel.

    A subclass provides :attr:`running`, ``_send(topic, message)`` (raising
    :class:`BusError` when the message cannot go out) and ``_call_later``; it may react
    to ``_prefix_added``/``_prefix_removed`` (a ZeroMQ SUB socket subscribes) and calls
    :meth:`_deliver` with every message it receives.
    """

    log = Logger()

    def __init__(self, source: str, default_timeout: float) -> None:
        self.source = source
        self.default_timeout = default_timeout
        self.reply_topic = f"reply/{source}/{uuid.uuid4().hex}"
        self._handlers: dict[str, list[MessageHandler]] = {}
        self._pending: dict[str, _Pending] = {}
        self._direct: dict[str, DirectResponder] = {}

    # -- what a subclass provides ------------------------------------------------------

    @property
    @abstractmethod
    def running(self) -> bool:
        """True while messages can be sent."""

    @abstractmethod
    def _send(self, topic: str, message: AicoMessage) -> None:
        """Put *message* on the wire; raise :class:`BusError` when it cannot go out."""

    @abstractmethod
    def _call_later(self, delay: float, f: Callable[..., Any], *args: Any) -> IDelayedCall:
        """Schedule *f* on the client's clock."""

    def _prefix_added(self, prefix: str) -> None:  # noqa: B027 - optional hook
        """The first handler for *prefix* was added."""

    def _prefix_removed(self, prefix: str) -> None:  # noqa: B027 - optional hook
        """The last handler for *prefix* was removed."""

    # -- sending -----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """The number of requests waiting for their reply."""
        return len(self._pending)

    def publish(self, topic: str, message: AicoMessage) -> None:
        if not self.running:
            raise BusStopped(f"bus client {self.source} is not running")
        self._send(topic, message)

    def request(
        self,
        topic: str,
        message: AicoMessage,
        timeout: float | None = None,
        on_chunk: Callable[[AicoMessage], None] | None = None,
    ) -> Deferred[AicoMessage]:
        if not self.running:
            return fail(BusStopped(f"bus client {self.source} is not running"))
        correlation_id = os.urandom(16).hex()
        out = AicoMessage()
        out.CopyFrom(message)
        if not out.metadata.source:
            out.metadata.source = self.source
        attributes = out.metadata.attributes
        attributes[ATTR_CORRELATION_ID] = correlation_id
        attributes[ATTR_REPLY_TO] = self.reply_topic
        if on_chunk is not None:
            attributes[ATTR_STREAM] = "1"
        elif ATTR_STREAM in attributes:
            del attributes[ATTR_STREAM]
        delay = self.default_timeout if timeout is None else timeout
        deferred: Deferred[AicoMessage] = Deferred(lambda _: self._forget(correlation_id))
        timer = self._call_later(delay, self._expire, correlation_id)
        self._pending[correlation_id] = _Pending(topic, deferred, delay, timer, on_chunk)
        try:
            self._send(topic, out)
        except BusError as e:
            self._forget(correlation_id)
            return fail(e)
        return deferred

    def _forget(self, correlation_id: str) -> None:
        entry = self._pending.pop(correlation_id, None)
        if entry is not None and entry.timer is not None and entry.timer.active():
            entry.timer.cancel()

    def _expire(self, correlation_id: str) -> None:
        entry = self._pending.pop(correlation_id, None)
        if entry is None:
            return
        entry.timer = None
        entry.deferred.errback(BusTimeout(entry.topic, entry.timeout))

    def _take_pending(self) -> list[_Pending]:
        """Forget every pending request (timers cancelled); the caller fails them."""
        pending = list(self._pending.values())
        self._pending.clear()
        for entry in pending:
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
        return pending

    def reply(self, request: AicoMessage, response: AicoMessage, stream: str | None = None) -> None:
        attributes = request.metadata.attributes
        reply_to = attributes.get(ATTR_REPLY_TO, "")
        correlation_id = attributes.get(ATTR_CORRELATION_ID, "")
        if not reply_to or not correlation_id:
            raise BusError("the request carries no reply_to/correlation_id")
        out = AicoMessage()
        out.CopyFrom(response)
        if not out.metadata.source:
            out.metadata.source = self.source
        out.metadata.attributes[ATTR_CORRELATION_ID] = correlation_id
        if stream:
            out.metadata.attributes[ATTR_STREAM] = stream
        elif ATTR_STREAM in out.metadata.attributes:
            del out.metadata.attributes[ATTR_STREAM]
        self.publish(reply_to, out)

    # -- direct calls in process ---------------------------------------------------------

    def serve_directly(self, topic: str, responder: DirectResponder | None) -> None:
        """Offer *responder* for requests on *topic* made in this process (``None``
        withdraws it). A module that runs on the bus client it shares with the gateway
        offers its route topics (:meth:`BackendModule.call_direct`); the gateway's
        forwarder then calls it with the ``ApiRequest`` instead of sending a message
        (docs/performance.md). Requests from other clients still come over the bus."""
        if responder is None:
            self._direct.pop(topic, None)
        else:
            self._direct[topic] = responder

    def direct(self, topic: str) -> DirectResponder | None:
        """The responder offered for *topic* in this process, if any."""
        return self._direct.get(topic)

    # -- subscriptions -----------------------------------------------------------------

    def subscribe(self, prefix: str, handler: MessageHandler) -> None:
        handlers = self._handlers.setdefault(prefix, [])
        handlers.append(handler)
        if len(handlers) == 1:
            self._prefix_added(prefix)

    def unsubscribe(self, prefix: str, handler: MessageHandler) -> None:
        handlers = self._handlers.get(prefix)
        if not handlers or handler not in handlers:
            return
        handlers.remove(handler)
        if not handlers:
            del self._handlers[prefix]
            self._prefix_removed(prefix)

    def _not_subscribed(self, prefixes: Sequence[str]) -> Deferred[None] | None:
        """``wait_subscribed``'s refusals: not running, or a prefix not subscribed here."""
        if not self.running:
            return fail(BusStopped(f"bus client {self.source} is not running"))
        unknown = [p for p in prefixes if p not in self._handlers and p != self.reply_topic]
        if unknown:
            return fail(BusError(f"bus client {self.source} is not subscribed to {unknown!r}"))
        return None

    # -- receiving ---------------------------------------------------------------------

    def _deliver(self, topic: str, message: AicoMessage) -> None:
        """A message arrived: a reply to one of our requests, or for the handlers of
        every subscribed prefix of *topic* (a failing handler is logged)."""
        if topic == self.reply_topic:
            self._reply_received(message)
            return
        for prefix, handlers in list(self._handlers.items()):
            if topic.startswith(prefix):
                for handler in list(handlers):
                    try:
                        handler(topic, message)
                    except Exception:
                        self.log.failure(
                            "bus handler for {prefix!r} failed on {topic}",
                            prefix=prefix,
                            topic=topic,
                        )

    def _reply_received(self, message: AicoMessage) -> None:
        attributes = message.metadata.attributes
        correlation_id = attributes.get(ATTR_CORRELATION_ID, "")
        entry = self._pending.get(correlation_id)
        if entry is None:
            self.log.debug(
                "bus client {source}: reply for an unknown or expired request dropped",
                source=self.source,
            )
            return
        if attributes.get(ATTR_STREAM) == "chunk":
            if entry.on_chunk is None:
                self.log.warn(
                    "bus client {source}: streamed chunk for a request that did not accept "
                    "streaming (from {sender}) dropped",
                    source=self.source,
                    sender=message.metadata.source,
                )
                return
            if entry.timer is not None and entry.timer.active():
                entry.timer.reset(entry.timeout)
            try:
                entry.on_chunk(message)
            except Exception:
                self.log.failure("bus client {source}: chunk handler failed", source=self.source)
            return
        del self._pending[correlation_id]
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        entry.deferred.callback(message)
