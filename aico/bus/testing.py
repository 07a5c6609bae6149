"""An honest in-memory message bus for fast, deterministic tests.

:class:`MemoryBus` provides :class:`~aico.bus.interfaces.IMessageBus` and
:class:`~aico.bus.interfaces.IBusControl` like :class:`~aico.bus.client.BusClient`, but
its messages go through a :class:`MemoryBroker` in this process instead of ZeroMQ, and
its timeouts run on an injected clock (``twisted.internet.task.Clock``, a
``MemoryReactorClock`` or the reactor). Backend-module authors can use it too::

    clock = Clock()
    broker = MemoryBroker()
    gateway = MemoryBus(clock, "gateway", broker=broker)
    echo = MemoryBus(clock, "echo", broker=broker)
    module = Echo(echo, clock)
    module.start()            # fires at once: start() and wait_subscribed() need no I/O
    gateway.start()
    d = gateway.request("echo/say/v1", message)
    # d has fired if the handler answered without waiting; else advance the clock

What a test can observe is what the ZeroMQ client does: prefix subscriptions (a
message matching several subscribed prefixes reaches the handlers of each; a client
receives what it publishes itself when it is subscribed), ``request()`` stamps
``correlation_id`` and ``reply_to`` on a copy, replies are matched by
``correlation_id`` on the client's own reply topic (never handed to handlers), streamed
replies, ``BusTimeout`` / ``BusStopped`` / ``BusError`` exactly where the client raises
or fails with them, and handler exceptions are logged without stopping the other
handlers. Every receiving bus parses its own copy of the bytes the sender serialised at
``publish()``, so no one can mutate someone else's message, as over the wire.

Differences, all in the direction of "sooner": ``start()`` fires at once (there is no
slow joiner to probe for), a subscription takes effect at once, and
``wait_subscribed()`` answers at once.

Delivery model: **synchronous and queued.** ``publish()`` appends the message to its
broker's queue and, unless the broker is already delivering, drains the queue before
returning; a handler that publishes (or replies) while a message is being delivered only
appends to the queue, and that message is delivered after the current one has reached
every subscriber. So delivery never nests, the order is the publication order (across
every bus of the broker), and a test needs no ``clock.advance(0)`` between publishing and
asserting. Timeouts are the only thing that waits for the clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

from google.protobuf.message import DecodeError
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from aico.bus.core import BusCore
from aico.bus.errors import BusError, BusStopped
from aico.bus.interfaces import (
    IBusControl,
    IMessageBus,
    MessageHandler,
)
from aico.proto import AicoMessage


class MemoryBroker:
    """The in-memory stand-in for the embedded broker, shared by connected buses.

    It keeps one FIFO queue of ``(topic, bytes)`` for every bus attached to it and
    delivers it as described in :mod:`aico.bus.testing`: synchronously, never nested.
    """

    log = Logger()

    def __init__(self) -> None:
        self._buses: list[MemoryBus] = []
        self._queue: deque[tuple[str, bytes]] = deque()
        self._delivering = False
        #: Messages that went through this broker, in total.
        self.routed = 0

    @property
    def buses(self) -> list[MemoryBus]:
        """The running buses attached to this broker, in the order they started."""
        return list(self._buses)

    @property
    def delivering(self) -> bool:
        """True while the broker drains its queue (a handler is running)."""
        return self._delivering

    def attach(self, bus: MemoryBus) -> None:
        """Deliver to *bus* from now on (``MemoryBus.start()`` calls this)."""
        if bus not in self._buses:
            self._buses.append(bus)

    def detach(self, bus: MemoryBus) -> None:
        """Deliver nothing more to *bus* (``MemoryBus.stop()`` calls this)."""
        if bus in self._buses:
            self._buses.remove(bus)

    def route(self, topic: str, body: bytes) -> None:
        """Queue one message; drain the queue unless a delivery is under way."""
        self.routed += 1
        self._queue.append((topic, body))
        if self._delivering:
            return
        self._delivering = True
        try:
            while self._queue:
                topic, body = self._queue.popleft()
                for bus in list(self._buses):
                    try:
                        bus._received(topic, body)
                    except Exception:
                        # _received already guards handlers; this is the last line so
                        # that one broken bus cannot strand the rest of the queue.
                        self.log.failure("memory broker: delivery to {source} failed", source=bus.source)
        finally:
            self._delivering = False


@implementer(IMessageBus, IBusControl)
class MemoryBus(BusCore):
    """A bus client on a :class:`MemoryBroker`, its timeouts on *clock*.

    *source* names it in ``MessageMetadata.source`` and in its reply topic
    ``reply/SOURCE/UUID``. Without *broker* it gets a broker of its own (it then only
    hears itself). *default_timeout* is the request timeout when ``request()`` is given
    none. With *record* (the default) every message it publishes is kept in
    :attr:`published` as the copy that went on the "wire"; :meth:`count` tells how many
    went on one topic.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        source: str = "memory",
        *,
        broker: MemoryBroker | None = None,
        default_timeout: float = 5.0,
        record: bool = True,
    ) -> None:
        super().__init__(source, default_timeout)
        self.clock = clock
        self.broker = broker if broker is not None else MemoryBroker()
        self.record = record
        #: ``(topic, message)`` for every message this bus published, oldest first.
        self.published: list[tuple[str, AicoMessage]] = []
        self._state: Literal["new", "running", "stopped"] = "new"

    # -- what tests look at --------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._state == "running"

    @property
    def subscriptions(self) -> dict[str, list[MessageHandler]]:
        """A copy of the handlers by prefix (a prefix is gone once its last handler is)."""
        return {prefix: list(handlers) for prefix, handlers in self._handlers.items()}

    def count(self, topic: str) -> int:
        """How many recorded messages this bus published on exactly *topic*."""
        return sum(1 for t, _ in self.published if t == topic)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Attach to the broker; fires at once (a second call fails with ``BusError``)."""
        if self._state != "new":
            return fail(BusError(f"bus client {self.source} cannot start twice"))
        self._state = "running"
        self.broker.attach(self)
        return succeed(None)

    def stop(self) -> Deferred[None]:
        """Detach, and fail every pending request with ``BusStopped`` (idempotent)."""
        if self._state == "stopped":
            return succeed(None)
        self._state = "stopped"
        self.broker.detach(self)
        for entry in self._take_pending():
            entry.deferred.errback(BusStopped())
        return succeed(None)

    def wait_subscribed(self, prefixes: Sequence[str], timeout: float | None = None) -> Deferred[None]:
        """Fires at once for prefixes subscribed here (``BusError`` for any other)."""
        refused = self._not_subscribed(prefixes)
        if refused is not None:
            return refused
        return succeed(None)

    # -- sending -----------------------------------------------------------------------

    def _send(self, topic: str, message: AicoMessage) -> None:
        body = message.SerializeToString()
        if self.record:
            copy = AicoMessage()
            copy.ParseFromString(body)
            self.published.append((topic, copy))
        self.broker.route(topic, body)

    def _call_later(self, delay: float, f: Callable[..., Any], *args: Any) -> IDelayedCall:
        return self.clock.callLater(delay, f, *args)

    # -- receiving (called by the broker) ----------------------------------------------

    def _listens_to(self, topic: str) -> bool:
        return topic.startswith(self.reply_topic) or any(topic.startswith(p) for p in self._handlers)

    def _received(self, topic: str, body: bytes) -> None:
        if self._state != "running" or not self._listens_to(topic):
            return
        message = AicoMessage()
        try:
            message.ParseFromString(body)
        except DecodeError:  # cannot happen with bytes from SerializeToString; as the client
            self.log.warn(
                "bus client {source}: dropped an undecodable message on {topic}",
                source=self.source,
                topic=topic,
            )
            return
        self._deliver(topic, message)

__all__ = ["MemoryBroker", "MemoryBus"]
