"""Process lifecycle helpers: ports.json, draining in-flight work, SIGHUP."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger

from aico.files import write_atomic

T = TypeVar("T")


def write_ports(path: Path, ports: dict[str, Any]) -> None:
    """Write ``ports.json`` atomically (a reader never sees half a file)."""
    write_atomic(path, (json.dumps(ports, indent=2, sort_keys=True) + "\n").encode("utf-8"), 0o644)


class InFlight:
    """Counts work in progress so that shutdown can wait for it."""

    log = Logger()

    def __init__(self) -> None:
        self.count = 0
        self._waiters: list[Deferred[None]] = []

    def enter(self) -> None:
        self.count += 1

    def leave(self, result: T | None = None) -> T | None:
        """One piece of work ended; passes *result* through (usable as a callback)."""
        if self.count <= 0:
            self.log.error("InFlight.leave() without a matching enter()")
            return result
        self.count -= 1
        if self.count == 0:
            self._release()
        return result

    def _release(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)

    def drained(self, clock: IReactorTime, grace: float) -> Deferred[None]:
        """Fires when nothing is in flight, or after *grace* seconds."""
        if self.count == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)

        def give_up() -> None:
            if d in self._waiters:
                self._waiters.remove(d)
            if not d.called:
                d.callback(None)

        timer = clock.callLater(grace, give_up)

        def done(result: None) -> None:
            if timer.active():
                timer.cancel()

        return d.addCallback(done)


class SignalHook:
    """Run *action* in the reactor thread when *signum* arrives; undone by ``remove``."""

    def __init__(self, reactor: IReactorFromThreads, signum: int, action: Callable[[], Any]):
        self.signum = signum
        self._previous = signal.getsignal(signum)

        def handler(signum: int, frame: FrameType | None) -> None:
            reactor.callFromThread(action)

        signal.signal(signum, handler)

    def remove(self) -> None:
        signal.signal(self.signum, self._previous)
