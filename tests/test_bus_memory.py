"""What only the in-memory bus promises: its delivery model, its clock, what it records.

The behaviour it shares with the ZeroMQ client is proven in ``tests/test_bus_contract.py``.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from aico.bus.errors import BusTimeout
from aico.bus.interfaces import MessageHandler
from aico.bus.testing import MemoryBroker, MemoryBus
from aico.proto import AicoMessage, ApiEvent, unpack, wrap


def event(text: str) -> AicoMessage:
    return wrap(ApiEvent(topic="t", body=text.encode()), "test")


def text_of(message: AicoMessage) -> str:
    return unpack(message, ApiEvent).body.decode()


class MemoryBusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.broker = MemoryBroker()
        self.a = self.bus("a")
        self.b = self.bus("b")

    def bus(self, source: str, broker: MemoryBroker | None = None, start: bool = True) -> MemoryBus:
        bus = MemoryBus(self.clock, source, broker=broker or self.broker)
        if start:
            self.successResultOf(bus.start())
        self.addCleanup(bus.stop)
        return bus

    def test_publish_has_delivered_everything_when_it_returns(self) -> None:
        seen: list[str] = []

        def answer(topic: str, message: AicoMessage) -> None:
            seen.append(topic)
            if topic == "q/1":
                self.b.publish("q/2", event("from a handler"))  # queued, not nested

        self.b.subscribe("q/", answer)
        self.a.publish("q/1", event("x"))
        self.assertEqual(seen, ["q/1", "q/2"])
        self.assertFalse(self.broker.delivering)
        self.assertEqual(self.broker.routed, 2)

    def test_messages_go_out_in_publication_order_across_buses(self) -> None:
        order: list[str] = []

        def on_a(topic: str, message: AicoMessage) -> None:
            order.append(f"a:{topic}")
            if topic == "o/1":
                self.a.publish("o/2", event("2"))
                self.b.publish("o/3", event("3"))

        self.a.subscribe("o/", on_a)
        self.b.subscribe("o/", lambda t, m: order.append(f"b:{t}"))
        self.a.publish("o/1", event("1"))
        self.assertEqual(order, ["a:o/1", "b:o/1", "a:o/2", "b:o/2", "a:o/3", "b:o/3"])

    def test_a_request_times_out_exactly_when_the_clock_says(self) -> None:
        d = self.a.request("nobody/home", event("x"), timeout=2.0)
        self.clock.advance(1.999)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.failureResultOf(d, BusTimeout)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_answered_cancelled_and_stopped_requests_leave_no_delayed_call(self) -> None:
        self.b.subscribe("svc/", lambda t, m: self.b.reply(m, event("re")))
        self.assertEqual(text_of(self.successResultOf(self.a.request("svc/x", event("x")))), "re")
        cancelled = self.a.request("nobody/", event("x"))
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        self.a.request("nobody/", event("x")).addErrback(lambda f: None)
        self.successResultOf(self.a.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_buses_on_other_brokers_do_not_hear_each_other(self) -> None:
        elsewhere = self.bus("elsewhere", MemoryBroker())
        alone = MemoryBus(self.clock, "alone")  # a broker of its own
        self.successResultOf(alone.start())
        heard: dict[str, list[str]] = {"b": [], "elsewhere": [], "alone": []}

        def hear(name: str) -> MessageHandler:
            return lambda topic, message: heard[name].append(text_of(message))

        for name, bus in (("b", self.b), ("elsewhere", elsewhere), ("alone", alone)):
            bus.subscribe("x/", hear(name))
        self.a.publish("x/1", event("from a"))
        alone.publish("x/2", event("from alone"))
        self.assertEqual(heard, {"b": ["from a"], "elsewhere": [], "alone": ["from alone"]})
        self.assertEqual(self.broker.buses, [self.a, self.b])

    def test_only_running_buses_receive(self) -> None:
        late = self.bus("late", start=False)
        got: list[str] = []
        late.subscribe("x/", lambda t, m: got.append(t))
        self.a.publish("x/before-start", event("1"))
        self.successResultOf(late.start())
        self.a.publish("x/running", event("2"))
        self.successResultOf(late.stop())
        self.a.publish("x/after-stop", event("3"))
        self.assertEqual(got, ["x/running"])
        self.assertNotIn(late, self.broker.buses)

    def test_a_bus_stopped_by_a_handler_gets_nothing_still_queued(self) -> None:
        got: list[str] = []

        def stop_on_first(topic: str, message: AicoMessage) -> None:
            got.append(topic)
            self.a.publish("s/2", event("queued"))
            self.b.stop()

        self.b.subscribe("s/", stop_on_first)
        self.a.publish("s/1", event("x"))
        self.assertEqual(got, ["s/1"])

    def test_a_failing_handler_does_not_strand_the_queue(self) -> None:
        def boom(topic: str, message: AicoMessage) -> None:
            self.a.publish("f/after", event("queued before the failure"))
            raise RuntimeError("handler bug")

        got: list[str] = []
        self.b.subscribe("f/first", boom)
        self.b.subscribe("f/after", lambda t, m: got.append(t))
        self.a.publish("f/first", event("x"))
        self.assertEqual(got, ["f/after"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_published_records_copies_and_count_counts_per_topic(self) -> None:
        message = event("original")
        self.a.publish("r/1", message)
        message.metadata.source = "changed"
        self.a.publish("r/1", event("again"))
        self.a.publish("r/2", event("other"))
        self.assertEqual([t for t, _ in self.a.published], ["r/1", "r/1", "r/2"])
        self.assertEqual(self.a.published[0][1].metadata.source, "test")
        self.assertEqual((self.a.count("r/1"), self.a.count("r/2"), self.a.count("r/")), (2, 1, 0))
        self.assertEqual(self.b.published, [])
        quiet = MemoryBus(self.clock, "quiet", broker=self.broker, record=False)
        self.successResultOf(quiet.start())
        quiet.publish("r/1", event("x"))
        self.assertEqual((quiet.published, quiet.count("r/1")), ([], 0))

    def test_subscriptions_shows_handlers_by_prefix(self) -> None:
        def h(topic: str, message: AicoMessage) -> None:
            pass

        handler: MessageHandler = h
        self.a.subscribe("p/", handler)
        self.a.subscribe("p/", handler)
        self.assertEqual(self.a.subscriptions, {"p/": [handler, handler]})
        self.a.unsubscribe("p/", handler)
        self.a.unsubscribe("p/", handler)
        self.assertEqual(self.a.subscriptions, {})

    def test_runs_on_a_memory_reactor_clock_too(self) -> None:
        reactor = MemoryReactorClock()
        bus = MemoryBus(reactor, "r", default_timeout=1.0)
        self.successResultOf(bus.start())
        d = bus.request("nobody/", event("x"))
        reactor.advance(1.0)
        self.failureResultOf(d, BusTimeout)
