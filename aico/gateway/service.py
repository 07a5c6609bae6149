"""The gateway process's service tree: its root, the listener group, how it fails and ends.

Nothing here builds gateway parts (that is :mod:`aico.gateway.composition`, the
composition root); these classes only order their lifecycle:

* :class:`GatewayService` is the root, a :class:`~aico.services.SequentialMultiService`:
  ``privilegedStartService`` binds (the embedded broker, every listener) before the
  reactor runs — a bind failure stops the process with a message naming the address and
  exit status 3 — then ``startService`` starts the children in order, each once the one
  before it is up. It handles ``SIGHUP`` (reload) and ``SIGTERM`` (orderly stop, exit 0).
  Any failure after binding is fatal (:class:`ProcessExit`): one line naming what
  failed, the traceback at debug level, exit status 1.
* :class:`ListenerGroup` holds one :class:`ListenerService` per listener and stops them
  together: every listener stops accepting, in-flight requests get
  ``gateway.shutdown_grace`` seconds, then the connections still open are closed.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from aico.gateway.lifecycle import InFlight, SignalHook
from aico.gateway.listeners import IListener, ListenerError
from aico.services import SequentialMultiService

__all__ = [
    "EXIT_BIND",
    "EXIT_FAILED",
    "GatewayService",
    "ListenerGroup",
    "ListenerService",
    "ProcessExit",
    "StartupError",
]

#: Exit status when a listener (or the embedded broker) cannot bind.
EXIT_BIND = 3
#: Exit status when anything fails after binding.
EXIT_FAILED = 1


class StartupError(SystemExit):
    """Ends twistd with a non-zero status before the reactor runs; ``message`` says why."""

    def __init__(self, message: str, status: int = EXIT_BIND) -> None:
        self.message = message
        super().__init__(status)


class ProcessExit:
    """How a fatal error ends the process: the reactor stops (so every service's
    ``stopService`` runs and twistd cleans up), then the process exits with *status*.

    twistd itself always exits 0 once the reactor has stopped, and an exception raised
    inside the reactor never reaches it, so the status is set by an ``atexit`` hook that
    runs after twistd's own clean-up (as Synapse does with ``os._exit``).
    """

    def __init__(self, reactor: IReactorCore) -> None:
        self.reactor = reactor
        self.status: int | None = None

    def __call__(self, status: int) -> None:
        if self.status is None:
            self.status = status
            atexit.register(self._exit, status)
        if getattr(self.reactor, "running", False):
            self.reactor.stop()

    @staticmethod
    def _exit(status: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


class ListenerService(Service):
    """One listener as a child service; :class:`ListenerGroup` drives its steps."""

    def __init__(self, listener: IListener) -> None:
        self.setName(listener.name)  # type: ignore[no-untyped-call]
        self.listener = listener
        self.bound = False
        self._binding: Deferred[None] | None = None

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        result = self.listener.listen()
        if isinstance(result, Deferred):
            self._binding = result
        self.bound = True

    def startService(self) -> Deferred[None]:
        Service.startService(self)
        return self._binding if self._binding is not None else succeed(None)

    def address(self) -> dict[str, Any]:
        return self.listener.address()


class ListenerGroup(MultiService):
    """Every listener; they bind together, start together and stop together."""

    log = Logger()

    def __init__(self, listeners: Iterable[IListener], inflight: InFlight, clock: IReactorTime,
                 grace: Callable[[], float]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.setName("listeners")  # type: ignore[no-untyped-call]
        self.inflight = inflight
        self.clock = clock
        self.grace = grace
        for listener in listeners:
            ListenerService(listener).setServiceParent(self)  # type: ignore[no-untyped-call]

    @property
    def listeners(self) -> list[ListenerService]:
        return [child for child in self if isinstance(child, ListenerService)]

    def privilegedStartService(self) -> None:
        try:
            for child in self.listeners:
                child.privilegedStartService()
        except ListenerError:
            self.abort()
            raise

    def startService(self) -> Deferred[None]:
        Service.startService(self)
        waits = [child.startService() for child in self.listeners]
        return DeferredList(waits, fireOnOneErrback=True, consumeErrors=True).addCallback(
            lambda _: None)

    def abort(self) -> None:
        """Unbind whatever bound (start-up failed)."""
        for child in self.listeners:
            if child.bound:
                child.listener.stop_accepting()
                child.bound = False

    def addresses(self) -> dict[str, dict[str, Any]]:
        """``ports.json`` entries of every listener that bound something."""
        out: dict[str, dict[str, Any]] = {}
        for child in self.listeners:
            address = child.address()
            if address:
                out[str(child.name)] = address
        return out

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        bound = [child for child in self.listeners if child.bound]
        await self._each(bound, lambda c: c.listener.stop_accepting(), "stop accepting")
        if self.inflight.count:
            self.log.info("waiting up to {grace} s for {count} request(s) in flight",
                          grace=self.grace(), count=self.inflight.count)
        await self.inflight.drained(self.clock, self.grace())
        await self._each(bound, lambda c: c.listener.close_connections(), "close connections")
        for child in bound:
            child.bound = False
            Service.stopService(child)

    async def _each(self, children: list[ListenerService], step: Callable[[ListenerService], Any],
                    what: str) -> None:
        results = await DeferredList([maybeDeferred(step, c) for c in children], consumeErrors=True)
        for child, (ok, result) in zip(children, results, strict=True):
            if not ok:
                self.log.failure("listener {name}: could not {what}", result, name=child.name,
                                 what=what)


Fatal = Callable[[int], None]


class GatewayService(SequentialMultiService):
    """The root of the tree: everything one ``twistd aico-gateway`` process runs.

    *reload* is called on ``SIGHUP``; *on_fatal* (normally a :class:`ProcessExit`) is
    called with the exit status when a child fails to start; :meth:`when_ready` fires
    once every child has started.
    """

    log = Logger()

    #: Freeze the startup heap once ready (``composition.settle_heap``): the twistd process
    #: does (``tap.makeService``); gateways inside a test process do not (each test would
    #: freeze its own garbage for the rest of the run).
    settle_heap = False

    def __init__(self, reactor: Any, *, reload: Callable[[], object] | None = None,
                 on_fatal: Fatal | None = None, signals: bool = True) -> None:
        super().__init__()
        self.setName("gateway")  # type: ignore[no-untyped-call]
        self.reactor = reactor
        self.on_fatal = on_fatal
        self._signals = signals
        self._hooks: list[SignalHook] = []
        self._stopping_now = False
        #: The line logged when start-up failed (for tests and the operator).
        self.failure_line: str | None = None
        self._outcome: Failure | bool | None = None
        self._waiters: list[Deferred[None]] = []
        #: The composition's parts (set by the composition root; tests and tools read it).
        self.parts: Any = None
        #: What SIGHUP calls.
        self.reload = reload

    def when_ready(self) -> Deferred[None]:
        """Fires once every child has started (fails with the start-up failure)."""
        if self._outcome is not None:
            if isinstance(self._outcome, Failure):
                return fail(self._outcome)
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def child(self, *path: str) -> IService:
        """The service at *path* below the root (``child("listeners", "http")``)."""
        node: Any = self
        for name in path:
            node = node.getServiceNamed(name)
        return node  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ start

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        done: list[IService] = []
        try:
            for child in self:
                child.privilegedStartService()
                done.append(child)
        except Exception as e:
            for child in reversed(done):
                abort = getattr(child, "abort", None)
                if abort is not None:
                    abort()
            message = str(e) if isinstance(e, ListenerError) else f"cannot start: {e}"
            self.log.critical("{message}", message=message)
            raise StartupError(message) from e

    def startService(self) -> Deferred[None]:
        d = super().startService()
        if self._signals:
            self._hooks.append(SignalHook(self.reactor, signal.SIGHUP, self._sighup))
            # docs/architecture.md: SIGTERM is an orderly stop with exit status 0. twistd's own handler
            # re-raises the signal after shutdown (death by signal), so ours replaces it
            # once the reactor runs.
            self.reactor.callWhenRunning(self._take_sigterm)
        d.addCallbacks(self._started, self._start_failed)
        return succeed(None)

    def _settle(self, outcome: Failure | bool) -> None:
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(None)

    def _started(self, _: object) -> None:
        self._settle(True)

    def _take_sigterm(self) -> None:
        if not self._stopping_now:
            self._hooks.append(SignalHook(self.reactor, signal.SIGTERM, self._terminate))

    def _terminate(self) -> None:
        self.log.info("SIGTERM: finishing in-flight requests, then stopping")
        if getattr(self.reactor, "running", False):
            self.reactor.stop()

    def _sighup(self) -> None:
        if self.reload is not None:
            d = maybeDeferred(self.reload)
            d.addErrback(lambda f: self.log.failure("reload failed", f))

    def _start_failed(self, failure: Failure) -> None:
        if self.stopping:
            # Stopped while starting (SIGTERM during start-up): not a failure.
            self.log.info("stopped before start-up finished")
            self._settle(failure)
            return
        names = []
        node: Any = self.failed_child
        while node is not None:  # down to the innermost child that failed
            names.append(getattr(node, "name", None) or type(node).__name__)
            node = getattr(node, "failed_child", None)
        name = "/".join(names) or "gateway"
        self.failure_line = f"aico-gateway could not start: {name}: {_describe(failure)}"
        self.log.critical("{line}", line=self.failure_line)
        self.log.failure("start-up failure of {name}", failure, level=LogLevel.debug, name=name)
        self._settle(failure)
        if self.on_fatal is not None:
            self.on_fatal(EXIT_FAILED)

    # ------------------------------------------------------------------ stop

    def stopService(self) -> Deferred[None]:
        self._stopping_now = True
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        return super().stopService()


def _describe(failure: Failure) -> str:
    error = failure.value
    text = str(error).strip()
    kind = type(error).__name__
    return f"{kind}: {text}" if text else kind
