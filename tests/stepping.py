"""A hand-stepped registry and password runner: deterministic interleavings of
concurrent requests on the in-memory gateway."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from aico.gateway.security.passwords import synchronous_runner
from aico.gateway.store import DatabaseLike
from aico.gateway.testing.memory import MemoryGateway

T = TypeVar("T")


class Stepper:
    """A :class:`DatabaseLike` and a password runner that, while :attr:`holding`, queue
    each call until :meth:`step` runs it; otherwise they run it at once.

    :meth:`install` puts it in front of a gateway's registry and password runner.
    """

    def __init__(self, db: DatabaseLike) -> None:
        self.db = _Calls(db.run_query, db.run_operation, db.run_interaction)
        self.holding = False
        self.queue: deque[tuple[Callable[[], Deferred[Any]], Deferred[Any]]] = deque()

    def _call(self, work: Callable[[], Deferred[T]]) -> Deferred[T]:
        if not self.holding:
            return work()
        d: Deferred[T] = Deferred()
        self.queue.append((work, d))
        return d

    def step(self) -> bool:
        """Run the oldest waiting call (its caller goes on at once); False if none."""
        if not self.queue:
            return False
        work, d = self.queue.popleft()
        work().chainDeferred(d)
        return True

    def run_query(self, sql: str, params: Any = ()) -> Deferred[list[tuple[Any, ...]]]:
        return self._call(lambda: self.db.run_query(sql, params))

    def run_operation(self, sql: str, params: Any = ()) -> Deferred[None]:
        return self._call(lambda: self.db.run_operation(sql, params))

    def run_interaction(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._call(lambda: self.db.run_interaction(fn, *args))

    def run(self, f: Callable[..., T], /, *args: Any) -> Deferred[T]:
        """The password service's runner."""
        return self._call(lambda: synchronous_runner(f, *args))

    def install(self, test: SynchronousTestCase, gw: MemoryGateway) -> None:
        for name in ("run_query", "run_operation", "run_interaction"):
            test.patch(gw.database, name, getattr(self, name))
        test.patch(gw.passwords, "runner", self.run)


class _Calls:
    """The registry's own methods, kept before the stepper takes their place."""

    def __init__(self, run_query: Any, run_operation: Any, run_interaction: Any) -> None:
        self.run_query = run_query
        self.run_operation = run_operation
        self.run_interaction = run_interaction
