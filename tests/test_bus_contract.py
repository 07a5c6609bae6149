"""One contract, two buses: the same behaviour tests on ``MemoryBus`` and on ``BusClient``.

:class:`_BusContract` holds the behaviour tests; each is named for what it proves. They
run twice: on :class:`~aico.bus.testing.MemoryBus` objects sharing a
:class:`~aico.bus.testing.MemoryBroker`, purely on a ``Clock``
(:class:`MemoryBusContractTests`), and on real :class:`~aico.bus.client.BusClient` objects
over an :class:`~aico.bus.broker.EmbeddedBroker` with CurveZMQ on 127.0.0.1
(:class:`ZmqBusContractTests`). What differs between the two (real sockets need real
time and a subscription must propagate; the memory bus answers at once and waits on its
clock) lives in the fixture hooks of those two small classes, never in a test:

* ``client(name)``: a new, not yet started, bus client on the shared broker;
* ``advance(seconds)``: let *seconds* pass (the clock, or the reactor);
* ``result_of(d)`` / ``failure_of(d, *errors)``: the outcome of a Deferred that is due
  (the memory variant asserts it has already fired; the real one waits for it);
* ``until(predicate)``: a condition that is due (asserted at once, or polled);
* ``listening(receiver, prefix, sender)``: from now on, messages *sender* publishes on
  *prefix* reach *receiver* (a no-op in memory; over ZeroMQ it waits until the
  subscription has reached the sender's PUB socket). Call it before subscribing the
  test's own handlers: it leaves one silent handler subscribed on the receiver.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, Union

from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from aico.bus.client import BusClient
from aico.bus.errors import BusError, BusStopped, BusTimeout
from aico.bus.interfaces import (
    ATTR_CORRELATION_ID,
    ATTR_REPLY_TO,
    ATTR_STREAM,
    IBusControl,
    IMessageBus,
)
from aico.bus.testing import MemoryBroker, MemoryBus
from aico.proto import AicoMessage, ApiEvent, unpack, wrap
from tests.test_bus_client import BusHarness, reactor, sleep, wait_for

T = TypeVar("T")
AnyBus = Union[BusClient, MemoryBus]  # noqa: UP007
Recorder = Callable[[str, AicoMessage], None]

#: Attribute of the warm-up messages the real fixture sends while waiting for a subscription.
WARM_UP = "contract-warm-up"
#: A request timeout short enough to keep the real variant quick (seconds).
SHORT = 0.3

if TYPE_CHECKING:
    _Case = TestCase
else:
    _Case = ABC  # the behaviour tests are abstract until a fixture class provides the hooks


def event(text: str, source: str = "test") -> AicoMessage:
    return wrap(ApiEvent(topic="t", body=text.encode()), source)


def text_of(message: AicoMessage) -> str:
    return unpack(message, ApiEvent).body.decode()


class Seen:
    """A handler that records ``(topic, text)`` of every message it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.messages: list[AicoMessage] = []

    def __call__(self, topic: str, message: AicoMessage) -> None:
        self.calls.append((topic, text_of(message)))
        self.messages.append(message)

    @property
    def topics(self) -> list[str]:
        return [topic for topic, _ in self.calls]

    @property
    def texts(self) -> list[str]:
        return [text for _, text in self.calls]

    def __len__(self) -> int:
        return len(self.calls)


class _BusContract(_Case):
    """Behaviour every ``IMessageBus`` + ``IBusControl`` implementation must show."""

    timeout = 20

    # -- fixture hooks (the only place where the two variants differ) -------------------

    @abstractmethod
    def client(self, name: str, default_timeout: float = 5.0) -> AnyBus:
        """A new, not yet started, bus client called *name*."""

    @abstractmethod
    async def advance(self, seconds: float) -> None:
        """Let *seconds* pass (the clock, or real time)."""

    @abstractmethod
    async def result_of(self, d: Deferred[T]) -> T:
        """The result *d* fires with."""

    @abstractmethod
    async def failure_of(self, d: Deferred[Any], *errors: type[BaseException]) -> BaseException:
        """The error *d* fails with (one of *errors*)."""

    @abstractmethod
    async def until(self, predicate: Callable[[], bool]) -> None:
        """Return once *predicate* holds."""

    @abstractmethod
    async def listening(self, receiver: AnyBus, prefix: str, sender: AnyBus) -> None:
        """Return once what *sender* publishes on *prefix* reaches *receiver*."""

    # -- helpers ------------------------------------------------------------------------

    async def started(self, *names: str, default_timeout: float = 5.0) -> list[AnyBus]:
        buses = [self.client(name, default_timeout) for name in names]
        await self.result_of(gatherResults([bus.start() for bus in buses]))
        return buses

    # -- lifecycle ----------------------------------------------------------------------

    def test_provides_IMessageBus_and_IBusControl(self) -> None:
        bus = self.client("verify")
        self.assertTrue(verifyObject(IMessageBus, bus))
        self.assertTrue(verifyObject(IBusControl, bus))
        self.assertEqual(bus.source, "verify")

    async def test_start_makes_it_running_until_stop_and_a_second_start_fails(self) -> None:
        bus = self.client("life")
        self.assertFalse(bus.running)
        await self.result_of(bus.start())
        self.assertTrue(bus.running)
        error = await self.failure_of(bus.start(), BusError)
        self.assertIn("cannot start twice", str(error))
        self.assertTrue(bus.running)
        await self.result_of(bus.stop())
        self.assertFalse(bus.running)
        await self.result_of(bus.stop())  # idempotent
        await self.failure_of(bus.start(), BusError)

    async def test_publish_before_start_and_after_stop_raises_BusStopped(self) -> None:
        bus = self.client("idle")
        with self.assertRaises(BusStopped):
            bus.publish("t/x", event("early"))
        await self.failure_of(bus.request("t/x", event("early")), BusStopped)
        await self.result_of(bus.start())
        await self.result_of(bus.stop())
        with self.assertRaises(BusStopped):
            bus.publish("t/x", event("late"))

    # -- publish / subscribe ------------------------------------------------------------

    async def test_subscription_matches_topics_by_prefix(self) -> None:
        sender, receiver = await self.started("sender", "receiver")
        await self.listening(receiver, "news/", sender)
        seen = Seen()
        receiver.subscribe("news/", seen)
        for topic in ("other/x", "news/sport", "newsy", "news", "news/weather"):
            sender.publish(topic, event(topic))
        await self.until(lambda: len(seen) == 2)
        self.assertEqual(seen.calls, [("news/sport", "news/sport"), ("news/weather", "news/weather")])

    async def test_every_handler_of_every_matching_prefix_gets_topic_and_message(self) -> None:
        sender, receiver = await self.started("sender", "receiver")
        await self.listening(receiver, "news/", sender)
        first, second, narrow = Seen(), Seen(), Seen()
        receiver.subscribe("news/", first)
        receiver.subscribe("news/", second)
        receiver.subscribe("news/sport", narrow)
        sender.publish("news/sport/final", event("goal"))
        sender.publish("news/weather", event("rain"))
        await self.until(lambda: len(first) == 2 and len(second) == 2)
        expected = [("news/sport/final", "goal"), ("news/weather", "rain")]
        self.assertEqual(first.calls, expected)
        self.assertEqual(second.calls, expected)
        self.assertEqual(narrow.calls, [("news/sport/final", "goal")])

    async def test_unsubscribe_undoes_one_subscribe(self) -> None:
        sender, receiver = await self.started("sender", "receiver")
        await self.listening(receiver, "news/", sender)
        twice, witness = Seen(), Seen()
        receiver.subscribe("news/", twice)
        receiver.subscribe("news/", twice)
        receiver.subscribe("news/", witness)
        sender.publish("news/1", event("one"))
        await self.until(lambda: len(witness) == 1)
        self.assertEqual(twice.texts, ["one", "one"])  # subscribed twice: called twice
        receiver.unsubscribe("news/", twice)
        sender.publish("news/2", event("two"))
        await self.until(lambda: len(witness) == 2)
        self.assertEqual(twice.texts, ["one", "one", "two"])
        receiver.unsubscribe("news/", twice)
        receiver.unsubscribe("news/", twice)  # no longer subscribed: a no-op
        receiver.unsubscribe("never/", witness)  # never subscribed: a no-op
        sender.publish("news/3", event("three"))
        await self.until(lambda: len(witness) == 3)
        self.assertEqual(twice.texts, ["one", "one", "two"])

    async def test_a_client_hears_what_it_publishes_on_a_topic_it_subscribed(self) -> None:
        (bus,) = await self.started("loop")
        await self.listening(bus, "self/", bus)
        seen = Seen()
        bus.subscribe("self/", seen)
        bus.publish("self/note", event("to me"))
        await self.until(lambda: len(seen) == 1)
        self.assertEqual(seen.calls, [("self/note", "to me")])

    async def test_receivers_get_their_own_copy_of_each_message(self) -> None:
        sender, tamperer, reader = await self.started("sender", "tamperer", "reader")
        await self.listening(tamperer, "doc/", sender)
        await self.listening(reader, "doc/", sender)

        def tamper(topic: str, message: AicoMessage) -> None:
            message.metadata.source = "tampered"

        sources: list[str] = []
        tamperer.subscribe("doc/", tamper)
        reader.subscribe("doc/", lambda t, m: sources.append(m.metadata.source))
        original = event("text", source="author")
        sender.publish("doc/1", original)
        original.metadata.source = "changed after publish"
        sender.publish("doc/2", event("fence", source="author"))
        await self.until(lambda: len(sources) == 2)
        self.assertEqual(sources, ["author", "author"])
        self.assertEqual(original.metadata.source, "changed after publish")

    async def test_a_handler_that_publishes_is_not_re_entered_and_order_is_kept(self) -> None:
        sender, receiver = await self.started("sender", "receiver")
        await self.listening(receiver, "chain/", sender)
        await self.listening(receiver, "chain/", receiver)
        timeline: list[str] = []

        def relay(topic: str, message: AicoMessage) -> None:
            timeline.append(f"enter {topic} from {message.metadata.source}")
            if topic == "chain/1":
                follow_up = event("follow-up", source="relay")
                receiver.publish("chain/2", follow_up)
                follow_up.metadata.source = "changed after publish"  # too late to matter
            timeline.append(f"exit {topic}")

        receiver.subscribe("chain/", relay)
        receiver.subscribe("chain/", lambda t, m: timeline.append(f"second {t}"))
        sender.publish("chain/1", event("start", source="sender"))
        await self.until(lambda: len(timeline) == 6)
        self.assertEqual(
            timeline,
            ["enter chain/1 from sender", "exit chain/1", "second chain/1",
             "enter chain/2 from relay", "exit chain/2", "second chain/2"],
        )

    async def test_a_failing_handler_is_logged_and_the_others_still_run(self) -> None:
        sender, receiver = await self.started("sender", "receiver")
        await self.listening(receiver, "t/", sender)

        def boom(topic: str, message: AicoMessage) -> None:
            raise RuntimeError("handler bug")

        seen = Seen()
        receiver.subscribe("t/", boom)
        receiver.subscribe("t/", seen)
        sender.publish("t/x", event("x"))
        await self.until(lambda: len(seen) == 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(receiver.running)

    async def test_wait_subscribed_confirms_subscribed_prefixes_and_fails_for_others(self) -> None:
        (bus,) = await self.started("listener")
        seen = Seen()
        bus.subscribe("late/topic", seen)
        await self.result_of(bus.wait_subscribed(["late/topic", bus.reply_topic], timeout=5))
        await self.result_of(bus.wait_subscribed([]))
        self.assertEqual(seen.calls, [])  # whatever it takes to confirm never reaches handlers
        error = await self.failure_of(bus.wait_subscribed(["late/topic", "not/subscribed"]), BusError)
        self.assertIn("not/subscribed", str(error))
        await self.result_of(bus.stop())
        await self.failure_of(bus.wait_subscribed(["late/topic"]), BusStopped)

    # -- request / reply ----------------------------------------------------------------

    async def test_request_reply_round_trip_between_two_clients(self) -> None:
        caller, responder = await self.started("caller", "responder")
        await self.listening(responder, "svc/", caller)
        requests: list[AicoMessage] = []

        def answer(topic: str, message: AicoMessage) -> None:
            requests.append(message)
            response = event("re:" + text_of(message), source="")
            response.metadata.attributes[ATTR_STREAM] = "chunk"  # stale: reply() clears it
            responder.reply(message, response)

        responder.subscribe("svc/echo", answer)
        original = event("hi", source="")
        d = caller.request("svc/echo", original, timeout=5)
        reply = await self.result_of(d)
        self.assertEqual(text_of(reply), "re:hi")
        (request,) = requests
        attributes = request.metadata.attributes
        self.assertEqual(attributes[ATTR_REPLY_TO], caller.reply_topic)
        self.assertTrue(caller.reply_topic.startswith("reply/caller/"))
        self.assertTrue(attributes[ATTR_CORRELATION_ID])
        self.assertNotIn(ATTR_STREAM, attributes)  # no on_chunk: no stream=1
        self.assertEqual(request.metadata.source, "caller")  # an empty source is filled in
        self.assertEqual(reply.metadata.attributes[ATTR_CORRELATION_ID], attributes[ATTR_CORRELATION_ID])
        self.assertNotIn(ATTR_STREAM, reply.metadata.attributes)
        self.assertEqual(reply.metadata.source, "responder")
        # The request went out as a copy: the caller's message is untouched.
        self.assertNotIn(ATTR_CORRELATION_ID, original.metadata.attributes)
        self.assertNotIn(ATTR_REPLY_TO, original.metadata.attributes)
        self.assertEqual(original.metadata.source, "")
        self.assertEqual(caller.pending, 0)

    async def test_concurrent_requests_each_get_their_own_reply(self) -> None:
        first, second, responder = await self.started("first", "second", "responder")
        await self.listening(responder, "svc/", first)
        await self.listening(responder, "svc/", second)
        held: list[AicoMessage] = []
        responder.subscribe("svc/who", lambda t, m: held.append(m))
        calls = [
            (caller, caller.request("svc/who", event(f"{caller.source}:{n}"), timeout=5))
            for n in range(10)
            for caller in (first, second)
        ]
        self.assertEqual((first.pending, second.pending), (10, 10))
        await self.until(lambda: len(held) == 20)
        for message in reversed(held):  # answered in the opposite order
            responder.reply(message, event("re:" + text_of(message)))
        replies = await self.result_of(gatherResults([d for _, d in calls]))
        self.assertEqual(
            [text_of(r) for r in replies],
            [f"re:{caller.source}:{n}" for n in range(10) for caller in (first, second)],
        )
        self.assertEqual((first.pending, second.pending), (0, 0))

    async def test_request_without_reply_fails_with_BusTimeout_after_its_timeout(self) -> None:
        (caller,) = await self.started("caller")
        d = caller.request("nobody/home", event("x"), timeout=SHORT)
        self.assertEqual(caller.pending, 1)
        await self.advance(SHORT)
        error = await self.failure_of(d, BusTimeout)
        assert isinstance(error, BusTimeout)
        self.assertEqual((error.topic, error.timeout), ("nobody/home", SHORT))
        self.assertEqual(caller.pending, 0)

    async def test_request_without_timeout_uses_the_clients_default_timeout(self) -> None:
        (caller,) = await self.started("caller", default_timeout=SHORT)
        d = caller.request("nobody/home", event("x"))
        await self.advance(SHORT)
        error = await self.failure_of(d, BusTimeout)
        assert isinstance(error, BusTimeout)
        self.assertEqual(error.timeout, SHORT)

    async def test_streamed_reply_delivers_chunks_then_end_and_each_chunk_restarts_the_timeout(
        self,
    ) -> None:
        caller, responder = await self.started("caller", "responder")
        await self.listening(responder, "svc/", caller)
        held: list[AicoMessage] = []
        responder.subscribe("svc/stream", lambda t, m: held.append(m))
        chunks: list[AicoMessage] = []
        timeout, gap = 0.45, 0.15  # four gaps outlast the timeout; one gap is well inside
        d = caller.request("svc/stream", event("go"), timeout=timeout, on_chunk=chunks.append)
        await self.until(lambda: len(held) == 1)
        self.assertEqual(held[0].metadata.attributes[ATTR_STREAM], "1")
        for i in range(4):
            await self.advance(gap)
            responder.reply(held[0], event(f"c{i}"), stream="chunk")
        await self.until(lambda: len(chunks) == 4)
        self.assertFalse(d.called)  # neither timed out nor finished by a chunk
        responder.reply(held[0], event("done"), stream="end")
        final = await self.result_of(d)
        self.assertEqual([text_of(c) for c in chunks], ["c0", "c1", "c2", "c3"])
        self.assertEqual({c.metadata.attributes[ATTR_STREAM] for c in chunks}, {"chunk"})
        self.assertEqual(text_of(final), "done")
        self.assertEqual(final.metadata.attributes[ATTR_STREAM], "end")
        self.assertEqual(caller.pending, 0)

    async def test_a_chunk_for_a_request_that_accepts_no_stream_is_dropped(self) -> None:
        caller, responder = await self.started("caller", "responder")
        await self.listening(responder, "svc/", caller)

        def answer(topic: str, message: AicoMessage) -> None:
            responder.reply(message, event("stray"), stream="chunk")
            responder.reply(message, event("plain"))

        responder.subscribe("svc/plain", answer)
        reply = await self.result_of(caller.request("svc/plain", event("x"), timeout=5))
        self.assertEqual(text_of(reply), "plain")

    async def test_cancelling_a_request_forgets_it_and_drops_its_late_reply(self) -> None:
        caller, responder = await self.started("caller", "responder")
        await self.listening(responder, "svc/", caller)
        held: list[AicoMessage] = []
        responder.subscribe("svc/hold", lambda t, m: held.append(m))
        d = caller.request("svc/hold", event("first"), timeout=5)
        await self.until(lambda: len(held) == 1)
        d.cancel()
        await self.failure_of(d, CancelledError)
        self.assertEqual(caller.pending, 0)
        responder.reply(held[0], event("late"))
        # A second round trip on the same path: its reply comes after the late one.
        again = caller.request("svc/hold", event("second"), timeout=5)
        await self.until(lambda: len(held) == 2)
        responder.reply(held[1], event("on time"))
        self.assertEqual(text_of(await self.result_of(again)), "on time")
        self.assertEqual(caller.pending, 0)

    async def test_stop_fails_pending_requests_with_BusStopped(self) -> None:
        caller, responder = await self.started("caller", "responder")
        await self.listening(responder, "svc/", caller)
        held: list[AicoMessage] = []
        responder.subscribe("svc/hold", lambda t, m: held.append(m))
        pending = [caller.request("svc/hold", event(str(n)), timeout=5) for n in range(3)]
        await self.until(lambda: len(held) == 3)
        await self.result_of(caller.stop())
        for d in pending:
            await self.failure_of(d, BusStopped)
        self.assertEqual(caller.pending, 0)
        self.assertFalse(caller.running)
        await self.failure_of(caller.request("svc/hold", event("after")), BusStopped)
        with self.assertRaises(BusStopped):
            caller.reply(held[0], event("from a stopped client"))

    async def test_reply_without_reply_to_or_correlation_id_raises_BusError(self) -> None:
        (bus,) = await self.started("responder")
        only_reply_to = event("a")
        only_reply_to.metadata.attributes[ATTR_REPLY_TO] = "reply/x/y"
        only_correlation = event("b")
        only_correlation.metadata.attributes[ATTR_CORRELATION_ID] = "c-1"
        for request in (event("none"), only_reply_to, only_correlation):
            with self.assertRaises(BusError):
                bus.reply(request, event("answer"))


class MemoryBusContractTests(_BusContract, TestCase):
    """The contract on ``MemoryBus`` objects sharing one ``MemoryBroker``, on a ``Clock``."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.broker = MemoryBroker()

    def client(self, name: str, default_timeout: float = 5.0) -> AnyBus:
        bus = MemoryBus(self.clock, name, broker=self.broker, default_timeout=default_timeout)
        self.addCleanup(bus.stop)
        return bus

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    async def result_of(self, d: Deferred[T]) -> T:
        return self.successResultOf(d)

    async def failure_of(self, d: Deferred[Any], *errors: type[BaseException]) -> BaseException:
        error: BaseException = self.failureResultOf(d, *errors).value
        return error

    async def until(self, predicate: Callable[[], bool]) -> None:
        self.assertTrue(predicate(), "not true at once on the memory bus")

    async def listening(self, receiver: AnyBus, prefix: str, sender: AnyBus) -> None:
        pass  # a subscription takes effect at once


class ZmqBusContractTests(_BusContract, TestCase):
    """The contract on real ``BusClient`` objects over an ``EmbeddedBroker`` with Curve."""

    def setUp(self) -> None:
        self.harness = BusHarness(self)

    def client(self, name: str, default_timeout: float = 5.0) -> AnyBus:
        return self.harness.client(name, default_timeout=default_timeout)

    async def advance(self, seconds: float) -> None:
        await sleep(seconds)

    async def result_of(self, d: Deferred[T]) -> T:
        return await d.addTimeout(10, reactor)

    async def failure_of(self, d: Deferred[Any], *errors: type[BaseException]) -> BaseException:
        error: BaseException = await self.assertFailure(d.addTimeout(10, reactor), *errors)
        return error

    async def until(self, predicate: Callable[[], bool]) -> None:
        await wait_for(predicate, timeout=10)

    async def listening(self, receiver: AnyBus, prefix: str, sender: AnyBus) -> None:
        # PUB/SUB drops messages until the receiver's subscription has reached the sender's
        # PUB socket. Publish numbered warm-ups until the *last one sent* has arrived: one
        # publisher's messages arrive in order, so every earlier warm-up has then arrived
        # or was dropped, and none can reach the handlers the test subscribes next. The
        # silent handler stays subscribed (it holds the socket subscription).
        arrived: set[str] = set()

        def keep(topic: str, message: AicoMessage) -> None:
            mark = message.metadata.attributes.get(WARM_UP)
            if mark:
                arrived.add(mark)

        receiver.subscribe(prefix, keep)
        for n in range(200):
            mark = f"{sender.source}-{n}"
            warm_up = AicoMessage()
            warm_up.metadata.source = sender.source
            warm_up.metadata.attributes[WARM_UP] = mark
            sender.publish(prefix, warm_up)
            for _ in range(5):
                await sleep(0.01)
                if mark in arrived:
                    return
        raise AssertionError(f"{prefix!r} from {sender.source} never reached {receiver.source}")
