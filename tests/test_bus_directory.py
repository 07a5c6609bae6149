"""ModuleDirectory on an in-memory bus and a Clock: registration, heartbeats, drops."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aico.bus.directory import ModuleDirectory, ModuleInfo
from aico.bus.interfaces import (
    TOPIC_DISCOVER,
    TOPIC_HEARTBEAT,
    TOPIC_REGISTERED,
    IBusControl,
    IMessageBus,
)
from aico.bus.testing import MemoryBus
from aico.proto import AicoMessage, ApiEvent, ModuleHeartbeat, ModuleRegistration, Route, wrap


def registration(name: str = "echo", interval_ms: int = 1000) -> AicoMessage:
    return wrap(
        ModuleRegistration(
            name=name,
            version="1.2.3",
            routes=[Route(method="POST", path="/api/v1/echo", topic="echo/v1")],
            heartbeat_interval_ms=interval_ms,
            health_topic="echo/health/v1",
        ),
        name,
    )


def heartbeat(name: str = "echo") -> AicoMessage:
    return wrap(ModuleHeartbeat(name=name), name)


class ModuleDirectoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = MemoryBus(self.clock, "gateway")
        self.successResultOf(self.bus.start())
        self.addCleanup(self.bus.stop)
        self.directory = ModuleDirectory(self.bus, self.clock)
        self.events: list[tuple[str, ModuleInfo]] = []
        self.directory.add_observer(lambda e, info: self.events.append((e, info)))
        self.directory.start()
        self.addCleanup(self.directory.stop)

    def test_memory_bus_is_an_honest_IMessageBus(self) -> None:
        self.assertTrue(verifyObject(IMessageBus, self.bus))
        self.assertTrue(verifyObject(IBusControl, self.bus))

    def test_start_publishes_discover(self) -> None:
        self.assertEqual(self.bus.count(TOPIC_DISCOVER), 1)

    def test_registration_adds_an_alive_module_and_notifies_registered(self) -> None:
        self.clock.advance(7)
        self.bus.publish(TOPIC_REGISTERED, registration())
        info = self.directory.modules["echo"]
        self.assertTrue(info.alive)
        self.assertEqual((info.version, info.registered_at, info.last_seen), ("1.2.3", 7, 7))
        self.assertEqual(info.routes[0].path, "/api/v1/echo")
        self.assertEqual(info.health_topic, "echo/health/v1")
        self.assertEqual([e for e, _ in self.events], ["registered"])
        self.assertEqual([m.name for m in self.directory.alive()], ["echo"])

    def test_heartbeats_keep_a_module_alive(self) -> None:
        self.bus.publish(TOPIC_REGISTERED, registration(interval_ms=1000))
        for _ in range(10):
            self.clock.advance(2.5)  # less than three intervals between heartbeats
            self.bus.publish(TOPIC_HEARTBEAT, heartbeat())
        info = self.directory.modules["echo"]
        self.assertTrue(info.alive)
        self.assertEqual(info.last_seen, 25)
        self.assertEqual(info.registered_at, 0)
        self.assertEqual([e for e, _ in self.events], ["registered"])

    def test_module_is_dropped_after_three_missed_heartbeat_intervals(self) -> None:
        self.bus.publish(TOPIC_REGISTERED, registration(interval_ms=1000))
        self.bus.publish(TOPIC_HEARTBEAT, heartbeat())
        self.clock.advance(2.9)
        self.assertTrue(self.directory.modules["echo"].alive)
        self.clock.advance(0.2)
        self.assertFalse(self.directory.modules["echo"].alive)
        self.assertEqual(self.directory.alive(), [])
        self.assertEqual([e for e, _ in self.events], ["registered", "dropped"])
        self.assertFalse(self.events[-1][1].alive)

    def test_dropped_module_comes_back_when_it_registers_again(self) -> None:
        self.bus.publish(TOPIC_REGISTERED, registration(interval_ms=1000))
        self.clock.advance(3.5)
        self.assertFalse(self.directory.modules["echo"].alive)
        self.bus.publish(TOPIC_REGISTERED, registration(interval_ms=1000))
        self.assertTrue(self.directory.modules["echo"].alive)
        self.assertEqual([e for e, _ in self.events], ["registered", "dropped", "registered"])
        # And it is watched again.
        self.clock.advance(3.5)
        self.assertEqual(self.events[-1][0], "dropped")

    def test_heartbeat_alone_does_not_revive_a_dropped_module_but_prompts_discovery(self) -> None:
        self.bus.publish(TOPIC_REGISTERED, registration(interval_ms=1000))
        self.clock.advance(5)
        self.bus.publish(TOPIC_HEARTBEAT, heartbeat())
        self.assertFalse(self.directory.modules["echo"].alive)
        self.assertEqual(self.bus.count(TOPIC_DISCOVER), 2)

    def test_heartbeat_from_unknown_module_prompts_discovery_at_most_once_a_second(self) -> None:
        self.clock.advance(5)
        self.bus.publish(TOPIC_HEARTBEAT, heartbeat("stranger"))
        self.bus.publish(TOPIC_HEARTBEAT, heartbeat("stranger"))
        self.assertEqual(self.bus.count(TOPIC_DISCOVER), 2)
        self.assertNotIn("stranger", self.directory.modules)

    def test_module_without_heartbeat_interval_is_never_dropped(self) -> None:
        self.bus.publish(TOPIC_REGISTERED, registration(interval_ms=0))
        self.clock.advance(1000)
        self.assertTrue(self.directory.modules["echo"].alive)

    def test_malformed_registration_and_heartbeat_are_ignored(self) -> None:
        self.bus.publish(TOPIC_REGISTERED, wrap(ApiEvent(topic="x"), "x"))
        self.bus.publish(TOPIC_REGISTERED, wrap(ModuleRegistration(), "x"))  # no name
        self.bus.publish(TOPIC_HEARTBEAT, wrap(ApiEvent(topic="x"), "x"))
        self.bus.publish(TOPIC_REGISTERED, AicoMessage())
        self.assertEqual(dict(self.directory.modules), {})
        self.assertEqual(self.events, [])

    def test_failing_observer_does_not_stop_the_others(self) -> None:
        def boom(event: str, info: ModuleInfo) -> None:
            raise RuntimeError("observer bug")

        self.directory.add_observer(boom)
        seen: list[str] = []
        self.directory.add_observer(lambda e, i: seen.append(e))
        self.bus.publish(TOPIC_REGISTERED, registration())
        self.assertEqual(seen, ["registered"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stop_unsubscribes_and_cancels_deadlines(self) -> None:
        self.bus.publish(TOPIC_REGISTERED, registration())
        self.directory.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.bus.subscriptions, {})

    def test_modules_mapping_is_read_only(self) -> None:
        self.bus.publish(TOPIC_REGISTERED, registration())
        with self.assertRaises(TypeError):
            self.directory.modules["x"] = self.directory.modules["echo"]  # type: ignore[index]
