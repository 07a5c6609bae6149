"""The connection manager: tracking, expiry and revocation timers, event fan-out."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aico.bus.errors import BusTimeout
from aico.bus.interfaces import IBusControl
from aico.gateway.connections import ConnectionInfo, ConnectionManager, Event, IConnection
from aico.gateway.errors import ApiError
from aico.gateway.routing.messages import Principal
from aico.proto import AicoMessage, ApiEvent, ApiRequest, wrap


@implementer(IConnection)
class FakeConnection:
    def __init__(self, clock: Clock) -> None:
        self.info = ConnectionInfo(transport="fake", peer="here", since=clock.seconds())
        self.events: list[Event] = []
        self.ended: list[str] = []
        self.closed: list[int] = []

    def deliver(self, event: Event) -> None:
        self.events.append(event)

    def auth_ended(self, error: ApiError) -> None:
        self.ended.append(error.code)

    def close(self, code: int, reason: str) -> None:
        self.closed.append(code)


class FakeBus:
    def __init__(self) -> None:
        self.handlers: dict[str, list[Any]] = {}

    def subscribe(self, prefix: str, handler: Any) -> None:
        self.handlers.setdefault(prefix, []).append(handler)

    def unsubscribe(self, prefix: str, handler: Any) -> None:
        self.handlers[prefix].remove(handler)
        if not self.handlers[prefix]:
            del self.handlers[prefix]

    def deliver(self, topic: str, message: AicoMessage) -> None:
        for prefix, handlers in list(self.handlers.items()):
            if topic.startswith(prefix):
                for h in list(handlers):
                    h(topic, message)

    def start(self) -> Deferred[None]:
        return succeed(None)


def principal(jti: str = "j1", expires_at: float = 0.0, device: str = "") -> Principal:
    return Principal(subject="u", token_id=jti, expires_at=expires_at, device_id=device)


class ManagerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = FakeBus()
        self.manager = ConnectionManager(self.clock, self.bus)  # type: ignore[arg-type]

    def conn(self) -> FakeConnection:
        c = FakeConnection(self.clock)
        verifyObject(IConnection, c)
        self.manager.add(c)
        return c

    def test_snapshot_lists_transport_principal_device_since_and_bytes(self) -> None:
        self.clock.advance(5)
        c = self.conn()
        self.manager.authenticated(c, principal(device="dev1"))
        c.info.bytes_in = 10
        [entry] = self.manager.snapshot()
        self.assertEqual((entry["transport"], entry["subject"], entry["device_id"]), ("fake", "u", "dev1"))
        self.assertEqual((entry["since"], entry["bytes_in"]), (5, 10))
        self.manager.remove(c)
        self.assertEqual(self.manager.snapshot(), [])

    def test_expiry_timer_fires_at_expires_at_and_drops_subscriptions(self) -> None:
        c = self.conn()
        self.manager.authenticated(c, principal(expires_at=100))
        self.manager.subscribe(c, "conversation/")
        self.clock.advance(99)
        self.assertEqual(c.ended, [])
        self.clock.advance(1)
        self.assertEqual(c.ended, ["token_expired"])
        self.assertIsNone(c.info.principal)
        self.assertEqual(self.bus.handlers, {})

    def test_reauthentication_rearms_the_timer(self) -> None:
        c = self.conn()
        self.manager.authenticated(c, principal("a", expires_at=10))
        self.manager.authenticated(c, principal("b", expires_at=50))
        self.clock.advance(20)
        self.assertEqual(c.ended, [])
        self.assertEqual(self.manager.revoke_token("a"), 0)
        self.assertEqual(self.manager.revoke_token("b"), 1)
        self.assertEqual(c.ended, ["token_revoked"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_revoke_tells_only_holders_of_the_token(self) -> None:
        a, b, other = self.conn(), self.conn(), self.conn()
        for c in (a, b):
            self.manager.authenticated(c, principal("shared"))
        self.manager.authenticated(other, principal("mine"))
        self.assertEqual(self.manager.revoke_token("shared"), 2)
        self.assertEqual((a.ended, b.ended, other.ended), (["token_revoked"], ["token_revoked"], []))
        self.assertEqual(self.manager.revoke_token("shared"), 0)

    def test_close_device_closes_its_connections(self) -> None:
        a, b = self.conn(), self.conn()
        self.manager.authenticated(a, principal(device="dev1"))
        self.assertEqual(self.manager.close_device("dev1"), 1)
        self.assertEqual((a.closed, b.closed), ([4003], []))

    def test_one_bus_subscription_per_first_segment_and_one_event_per_connection(self) -> None:
        a, b = self.conn(), self.conn()
        self.manager.subscribe(a, "conversation/")
        self.manager.subscribe(a, "conversation/user/")
        self.manager.subscribe(b, "conversation/")
        # Long or many prefixes below one segment cost one bus subscription, not one each.
        self.assertEqual({k: len(v) for k, v in self.bus.handlers.items()}, {"conversation/": 1})
        message = wrap(ApiEvent(topic="conversation/user/x", body=b'{"n":1}'), source="m")
        self.bus.deliver("conversation/user/x", message)
        self.assertEqual((len(a.events), len(b.events)), (1, 1))
        self.assertIs(a.events[0], b.events[0])  # one event object, encodings shared
        self.assertEqual(a.events[0].json_body(), {"n": 1})
        self.manager.unsubscribe(b, "conversation/")
        self.manager.unsubscribe(a, "conversation/")
        self.assertEqual(list(self.bus.handlers), ["conversation/"])  # a's deeper prefix remains
        self.bus.deliver("conversation/other", wrap(ApiEvent(topic="conversation/other", body=b"2"), "m"))
        self.assertEqual(len(a.events), 1)  # not under a's remaining prefix: filtered here
        self.manager.unsubscribe(a, "conversation/user/")
        self.assertEqual(list(self.bus.handlers), [])

    def test_requests_on_event_topics_are_never_relayed(self) -> None:
        a = self.conn()
        self.manager.subscribe(a, "conversation/")
        self.bus.deliver("conversation/user/input/v1",
                         wrap(ApiRequest(method="POST", path="/secret"), source="gateway"))
        self.assertEqual(a.events, [])

    def test_event_frames_are_encoded_once(self) -> None:
        event = Event("t/x", b"1")
        calls: list[int] = []

        def make(e: Event) -> bytes:
            calls.append(1)
            return b"frame"

        self.assertEqual([event.frame("k", make) for _ in range(3)], [b"frame"] * 3)
        self.assertEqual(calls, [1])
        self.assertEqual(Event("t", b"not json").json_body(), "not json")


@implementer(IBusControl)
class ConfirmingBus(FakeBus):
    """A bus whose subscriptions reach the broker only when the test says so."""

    running = True

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[tuple[list[str], Deferred[None]]] = []

    def wait_subscribed(self, prefixes: Any, timeout: float | None = None) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.waits.append((list(prefixes), d))
        return d


class SubscriptionConfirmationTests(SynchronousTestCase):
    """``ready``: a subscription is reported only once the bus confirmed it, so an event
    caused right after ``subscribed`` is never lost to ZeroMQ's slow joiner."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = ConfirmingBus()
        self.manager = ConnectionManager(self.clock, self.bus)  # type: ignore[arg-type]

    def test_a_new_bus_subscription_is_ready_only_after_the_broker_confirmed_it(self) -> None:
        a, b = FakeConnection(self.clock), FakeConnection(self.clock)
        self.manager.add(a)
        self.manager.add(b)
        self.manager.subscribe(a, "user/u/")
        self.assertEqual([w[0] for w in self.bus.waits], [["user/"]])
        first = self.manager.ready("user/u/")
        self.manager.subscribe(b, "user/u/x/")  # same bus subscription: no second wait
        second = self.manager.ready("user/u/x/")
        assert first is not None and second is not None
        self.assertFalse(first.called or second.called)
        self.bus.waits[0][1].callback(None)
        self.assertTrue(first.called and second.called)
        self.assertIsNone(self.manager.ready("user/u/"))  # confirmed: answered at once
        self.assertEqual(len(self.bus.waits), 1)

    def test_an_unconfirmed_subscription_is_still_reported_after_the_wait_failed(self) -> None:
        a = FakeConnection(self.clock)
        self.manager.add(a)
        self.manager.subscribe(a, "user/u/")
        ready = self.manager.ready("user/u/")
        assert ready is not None
        self.bus.waits[0][1].errback(BusTimeout("user/", 5.0))
        self.assertTrue(ready.called)
        self.assertIsNone(self.successResultOf(ready))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_a_bus_without_confirmation_is_ready_at_once(self) -> None:
        manager = ConnectionManager(self.clock, FakeBus())  # type: ignore[arg-type]
        a = FakeConnection(self.clock)
        manager.add(a)
        manager.subscribe(a, "user/u/")
        self.assertIsNone(manager.ready("user/u/"))
