"""The service tree's machinery, on a Clock: ordering, periodic jobs, listeners, failures."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aico.gateway.lifecycle import InFlight
from aico.gateway.listeners import IListener, ListenerError, TcpListener, tcp_endpoint
from aico.gateway.service import EXIT_FAILED, GatewayService, ListenerGroup, StartupError
from aico.services import CallbackService, PeriodicJob, SequentialMultiService


class Step(Service):
    """A child that records its start and stop in a shared journal; its start (and stop)
    fires when the test says so."""

    def __init__(self, name: str, journal: list[str], *, hold: bool = False,
                 fail_start: bool = False) -> None:
        self.setName(name)
        self.journal = journal
        self.hold = hold
        self.fail_start = fail_start
        self.started_d: Deferred[None] | None = None

    def startService(self) -> Deferred[None]:
        Service.startService(self)
        self.journal.append(f"start {self.name}")
        if self.fail_start:
            return fail(RuntimeError(f"{self.name} is broken"))
        if self.hold:
            self.started_d = Deferred()
            return self.started_d
        return succeed(None)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self.journal.append(f"stop {self.name}")
        return succeed(None)


class SequentialTests(SynchronousTestCase):
    def tree(self, *children: Step) -> SequentialMultiService:
        root = SequentialMultiService()
        for child in children:
            child.setServiceParent(root)
        return root

    def test_children_start_one_after_another_and_stop_in_reverse(self) -> None:
        journal: list[str] = []
        a, b, c = Step("a", journal), Step("b", journal, hold=True), Step("c", journal)
        root = self.tree(a, b, c)
        started = root.startService()
        self.assertEqual(journal, ["start a", "start b"])  # c waits for b
        self.assertNoResult(started)
        assert b.started_d is not None
        b.started_d.callback(None)
        self.assertEqual(journal, ["start a", "start b", "start c"])
        self.successResultOf(started)
        self.successResultOf(root.stopService())
        self.assertEqual(journal[3:], ["stop c", "stop b", "stop a"])

    def test_a_failed_start_names_the_child_and_starts_nothing_after_it(self) -> None:
        journal: list[str] = []
        root = self.tree(Step("a", journal), Step("b", journal, fail_start=True), Step("c", journal))
        failure = self.failureResultOf(root.startService(), RuntimeError)
        self.assertIn("b is broken", str(failure.value))
        self.assertEqual(journal, ["start a", "start b"])
        self.assertEqual(getattr(root.failed_child, "name", None), "b")
        self.successResultOf(root.stopService())
        self.assertEqual(journal[2:], ["stop a"])  # only what started is stopped

    def test_a_stop_during_start_cancels_it_and_stops_the_child_being_started(self) -> None:
        journal: list[str] = []
        a, b, c = Step("a", journal), Step("b", journal, hold=True), Step("c", journal)
        root = self.tree(a, b, c)
        started = root.startService()
        stopped = root.stopService()
        self.successResultOf(stopped)
        self.failureResultOf(started)
        self.assertEqual(journal, ["start a", "start b", "stop b", "stop a"])

    def test_nested_sequential_services_start_in_depth_order(self) -> None:
        journal: list[str] = []
        inner = self.tree(Step("x", journal, hold=True), Step("y", journal))
        inner.setName("inner")
        outer = SequentialMultiService()
        inner.setServiceParent(outer)
        Step("after", journal).setServiceParent(outer)
        outer.startService()
        self.assertEqual(journal, ["start x"])  # "after" waits for the whole inner tree
        x = inner.getServiceNamed("x")
        x.started_d.callback(None)
        self.assertEqual(journal, ["start x", "start y", "start after"])

    def test_a_child_that_fails_to_stop_does_not_keep_the_others_running(self) -> None:
        journal: list[str] = []
        root = self.tree(Step("a", journal), CallbackService("b", None, lambda: 1 / 0),
                         Step("c", journal))
        self.successResultOf(root.startService())
        self.successResultOf(root.stopService())
        self.assertEqual(journal[-2:], ["stop c", "stop a"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class PeriodicJobTests(SynchronousTestCase):
    def test_an_error_is_logged_and_the_job_keeps_running(self) -> None:
        clock = Clock()
        calls: list[float] = []

        def job() -> None:
            calls.append(clock.seconds())
            if len(calls) == 2:
                raise RuntimeError("the disk is full")

        periodic = PeriodicJob("prune", 60.0, job, clock)
        periodic.startService()
        for _ in range(4):
            clock.advance(60)
        self.assertEqual(calls, [60.0, 120.0, 180.0, 240.0])
        self.assertEqual((periodic.runs, periodic.errors), (4, 1))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.successResultOf(periodic.stopService())
        clock.advance(600)
        self.assertEqual(len(calls), 4)

    def test_a_failed_deferred_is_logged_and_the_next_tick_runs(self) -> None:
        clock = Clock()
        results: list[Deferred[None]] = []

        def job() -> Deferred[None]:
            d: Deferred[None] = Deferred()
            results.append(d)
            return d

        periodic = PeriodicJob("flush", 10.0, job, clock)
        periodic.startService()
        clock.advance(10)
        clock.advance(10)
        self.assertEqual(len(results), 1)  # a slow job never overlaps itself
        results[0].errback(OSError("database is locked"))
        clock.advance(10)
        self.assertEqual(len(results), 2)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        results[1].callback(None)
        self.successResultOf(periodic.stopService())


@implementer(IListener)
class FakeListener:
    """A listener that records what the group asks of it."""

    def __init__(self, name: str, journal: list[str], refuse: bool = False) -> None:
        self.name = name
        self.journal = journal
        self.refuse = refuse

    def listen(self) -> None:
        if self.refuse:
            raise ListenerError(f"cannot listen on 127.0.0.1:1 for the {self.name!r} listener")
        self.journal.append(f"listen {self.name}")

    def address(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": len(self.name)}

    def stop_accepting(self) -> None:
        self.journal.append(f"stop accepting {self.name}")

    def close_connections(self) -> None:
        self.journal.append(f"close {self.name}")


class ListenerGroupTests(SynchronousTestCase):
    def test_the_listener_interface_is_provided(self) -> None:
        reactor = MemoryReactorClock()
        verifyObject(IListener, TcpListener("http", tcp_endpoint(reactor, "127.0.0.1", 0), None))
        verifyObject(IListener, FakeListener("x", []))

    def test_every_listener_stops_accepting_then_in_flight_requests_drain_then_connections_close(
            self) -> None:
        clock = Clock()
        journal: list[str] = []
        inflight = InFlight()
        group = ListenerGroup([FakeListener("http", journal), FakeListener("ipc", journal)],
                              inflight, clock, lambda: 10.0)
        group.privilegedStartService()
        self.successResultOf(group.startService())
        self.assertEqual(group.addresses(), {"http": {"host": "127.0.0.1", "port": 4},
                                             "ipc": {"host": "127.0.0.1", "port": 3}})
        inflight.enter()
        stopped = group.stopService()
        self.assertEqual(journal[2:], ["stop accepting http", "stop accepting ipc"])
        clock.advance(5)
        self.assertNoResult(stopped)  # a request is still in flight
        inflight.leave()
        self.successResultOf(stopped)
        self.assertEqual(journal[4:], ["close http", "close ipc"])

    def test_the_grace_period_bounds_the_drain(self) -> None:
        clock = Clock()
        journal: list[str] = []
        inflight = InFlight()
        group = ListenerGroup([FakeListener("http", journal)], inflight, clock, lambda: 3.0)
        group.privilegedStartService()
        group.startService()
        inflight.enter()
        stopped = group.stopService()
        clock.advance(2.9)
        self.assertNoResult(stopped)
        clock.advance(0.2)
        self.successResultOf(stopped)
        self.assertEqual(journal[-1], "close http")

    def test_a_listener_that_cannot_bind_unbinds_the_others(self) -> None:
        journal: list[str] = []
        group = ListenerGroup([FakeListener("http", journal), FakeListener("ipc", journal, True)],
                              InFlight(), Clock(), lambda: 1.0)
        self.assertRaises(ListenerError, group.privilegedStartService)
        self.assertEqual(journal, ["listen http", "stop accepting http"])

    def test_a_tcp_port_in_use_names_the_listener_and_the_address(self) -> None:
        class Busy(MemoryReactorClock):
            def listenTCP(self, port: int, factory: Any, backlog: int = 50,
                          interface: str = "") -> Any:
                raise CannotListenError(interface, port, OSError(98, "Address already in use"))

        listener = TcpListener("http", tcp_endpoint(Busy(), "127.0.0.1", 8771), None)
        error = self.assertRaises(ListenerError, listener.listen)
        self.assertEqual(str(error), "cannot listen on 127.0.0.1:8771 for the 'http' listener: "
                                     "Address already in use")


class RootTests(SynchronousTestCase):
    def root(self, *children: Service) -> tuple[GatewayService, list[int]]:
        fatal: list[int] = []
        root = GatewayService(MemoryReactorClock(), on_fatal=fatal.append, signals=False)
        for child in children:
            child.setServiceParent(root)
        return root, fatal

    def test_a_failure_after_binding_is_one_line_naming_the_part_and_exit_status_1(self) -> None:
        journal: list[str] = []
        root, fatal = self.root(Step("bus", journal), Step("modules", journal, fail_start=True))
        root.privilegedStartService()
        root.startService()
        self.assertEqual(fatal, [EXIT_FAILED])
        self.assertEqual(root.failure_line,
                         "aico-gateway could not start: modules: RuntimeError: modules is broken")
        self.failureResultOf(root.when_ready(), RuntimeError)
        self.flushLoggedErrors(RuntimeError)

    def test_the_failing_part_is_named_down_to_the_innermost_child(self) -> None:
        journal: list[str] = []
        modules = SequentialMultiService()
        modules.setName("modules")
        Step("conversation", journal, fail_start=True).setServiceParent(modules)
        root, fatal = self.root(modules)
        root.startService()
        self.assertEqual(fatal, [EXIT_FAILED])
        self.assertIn("modules/conversation:", root.failure_line or "")
        self.flushLoggedErrors(RuntimeError)

    def test_a_bind_failure_stops_before_the_reactor_with_status_3_and_undoes_the_others(
            self) -> None:
        aborted: list[str] = []

        class Broker(Service):
            name = "broker"

            def privilegedStartService(self) -> None:
                aborted.append("bound")

            def abort(self) -> None:
                aborted.append("aborted")

        group = ListenerGroup([FakeListener("http", [], refuse=True)], InFlight(), Clock(),
                              lambda: 1.0)
        root, fatal = self.root(Broker(), group)
        error = self.assertRaises(StartupError, root.privilegedStartService)
        self.assertEqual(error.code, 3)
        self.assertIn("127.0.0.1:1", error.message)
        self.assertEqual(aborted, ["bound", "aborted"])
        self.assertEqual(fatal, [])

    def test_a_stop_while_starting_is_not_a_failure(self) -> None:
        journal: list[str] = []
        root, fatal = self.root(Step("bus", journal, hold=True))
        root.startService()
        self.successResultOf(root.stopService())
        self.assertEqual(fatal, [])
        self.assertIsNone(root.failure_line)

    def test_ready_fires_once_everything_started(self) -> None:
        journal: list[str] = []
        step = Step("bus", journal, hold=True)
        root, _ = self.root(step)
        root.startService()
        ready = root.when_ready()
        self.assertNoResult(ready)
        assert step.started_d is not None
        step.started_d.callback(None)
        self.successResultOf(ready)
        self.successResultOf(root.when_ready())  # later callers too
