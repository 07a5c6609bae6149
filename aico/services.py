"""Service building blocks shared by the gateway and the bus (no gateway knowledge here).

Twisted's :class:`~twisted.application.service.MultiService` starts its children one
after another but does not wait for a child that starts asynchronously, and stops them
all at once. A gateway's parts depend on each other (the bus needs the broker, the
modules need the bus, the listeners drain before the bus closes), so
:class:`SequentialMultiService` starts each child only once the one before it has
started (a child's ``startService`` may return a Deferred) and stops them one at a time
in reverse order, as buildbot's ``AsyncMultiService`` does.

:class:`PeriodicJob` is a ``TimerService`` whose call can never end the loop: an
exception or a failed Deferred is logged and the next tick runs as usual (Twisted's own
``TimerService`` stops for good on the first error).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

__all__ = ["CallbackService", "PeriodicJob", "SequentialMultiService", "ThreadPoolService"]


class SequentialMultiService(MultiService):
    """Starts children in order, each after the previous one's start has fired; stops
    them in reverse order, each after the next one's stop has fired.

    ``startService`` returns a Deferred that fires once every child has started, or
    fails with the first child's failure (:attr:`failed_child` names it; the children
    after it are not started), so a sequential service nests in another one.
    ``stopService`` stops only the children that were started, after a start still in
    progress has settled.
    """

    log = Logger()

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._started_children: list[IService] = []
        self._starting: Deferred[None] | None = None
        self._stopping: Deferred[None] | None = None
        self._stop_requested = False
        #: The child whose start failed, if one did.
        self.failed_child: IService | None = None

    def startService(self) -> Deferred[None]:
        Service.startService(self)
        self._starting = Deferred.fromCoroutine(self._start_children())
        return _mirror(self._starting)

    async def _start_children(self) -> None:
        for child in list(self):
            if self._stop_requested:
                return  # a stop arrived while starting: start nothing more
            self.failed_child = child
            await maybeDeferred(child.startService)
            self._started_children.append(child)
        self.failed_child = None

    @property
    def stopping(self) -> bool:
        """Whether ``stopService`` was called."""
        return self._stop_requested

    def stopService(self) -> Deferred[None]:
        if self._stopping is None:
            self._stop_requested = True
            Service.stopService(self)
            self._stopping = Deferred.fromCoroutine(self._stop_children())
        return _mirror(self._stopping, errors=False)

    async def _stop_children(self) -> None:
        stopping = list(self._started_children)
        if self._starting is not None and not self._starting.called:
            # Stopped while starting (SIGTERM while the bus still probes, say): the start
            # in progress is cancelled, and the child it was starting is stopped too.
            starting = self.failed_child
            self._starting.cancel()
            await _mirror(self._starting, errors=False)
            if starting is not None and starting not in stopping:
                stopping.append(starting)
        for child in reversed(stopping):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("stopping {child} failed", child=getattr(child, "name", child))
        self._started_children.clear()


def _mirror(d: Deferred[None], errors: bool = True) -> Deferred[None]:
    """A new Deferred with *d*'s outcome (its failure too when *errors*); *d* keeps its
    own result, so any number of callers can wait on it."""
    out: Deferred[None] = Deferred()

    def settle(result: object) -> object:
        if isinstance(result, Failure) and errors:
            out.errback(result)
        else:
            out.callback(None)
        return None if isinstance(result, Failure) else result

    d.addBoth(settle)
    return out


class CallbackService(Service):
    """A named child service made of a start and a stop callable (either may return a
    Deferred): for parts that have a lifecycle but are not services themselves."""

    def __init__(self, name: str, start: Callable[[], Any] | None = None,
                 stop: Callable[[], Any] | None = None) -> None:
        self.setName(name)  # type: ignore[no-untyped-call]
        self._start = start
        self._stop = stop

    def startService(self) -> Deferred[None]:
        Service.startService(self)
        if self._start is None:
            return succeed(None)
        return maybeDeferred(self._start).addCallback(lambda _: None)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._stop is None:
            return succeed(None)
        return maybeDeferred(self._stop).addCallback(lambda _: None)


class PeriodicJob(TimerService):
    """Calls *job* every *interval* seconds on *clock*; an error is logged, never fatal.

    *job* may return a Deferred; the next call waits for it (a slow job never overlaps
    itself). With ``now=False`` the first call comes after one interval.
    """

    log = Logger()

    def __init__(self, name: str, interval: float, job: Callable[[], Any],
                 clock: IReactorTime, *, now: bool = False) -> None:
        super().__init__(interval, self._run)  # type: ignore[no-untyped-call]
        self.setName(name)  # type: ignore[no-untyped-call]
        self.clock = clock
        self._clock = clock
        self.job = job
        self.runs = 0
        self.errors = 0
        self._now = now

    def startService(self) -> None:
        Service.startService(self)
        self._loop = LoopingCall(self.call[0], *self.call[1], **self.call[2])
        self._loop.clock = self._clock
        self._loopFinished = self._loop.start(self.step, now=self._now)
        self._loopFinished.addErrback(self._failed)

    def _run(self) -> Deferred[None]:
        self.runs += 1
        d = maybeDeferred(self.job)
        d.addCallbacks(lambda _: None, self._job_failed)
        return d

    def _job_failed(self, failure: Failure) -> None:
        self.errors += 1
        self.log.failure("periodic job {job} failed; it runs again in {interval} s", failure,
                         job=self.name, interval=self.step)


class ThreadPoolService(Service):
    """A thread pool of our own (CPU work such as Argon2 stays off the reactor's shared
    pool, next to DNS lookups and file I/O), started and stopped with the service tree."""

    def __init__(self, name: str, pool: ThreadPool) -> None:
        self.setName(name)  # type: ignore[no-untyped-call]
        self.pool = pool

    def startService(self) -> None:
        Service.startService(self)
        self.pool.start()

    def stopService(self) -> None:
        Service.stopService(self)
        # Joins the threads (at most one job each), as the reactor does with its own pool.
        self.pool.stop()
