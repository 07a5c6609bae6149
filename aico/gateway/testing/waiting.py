"""Waiting in tests that run on real sockets: one :func:`sleep`, one :func:`eventually`.

Tests on the in-memory layer never wait: they move the clock
(:meth:`~aico.gateway.testing.memory.MemoryGateway.advance`). Tests on real sockets wait
for something to *happen* with :func:`eventually` (it polls a condition until it holds or
the timeout passes), never for a fixed time to pass in the hope that it has.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

__all__ = ["eventually", "sleep"]


def _reactor(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        return global_reactor
    return reactor


def sleep(seconds: float, reactor: Any = None) -> Deferred[None]:
    """A Deferred that fires after *seconds* on *reactor* (default: the global one)."""
    return deferLater(_reactor(reactor), seconds, lambda: None)


async def eventually(check: Callable[[], Any | Awaitable[Any]], timeout: float = 5.0,
                     interval: float = 0.01, reactor: Any = None) -> Any:
    """Poll *check* (a function, or a coroutine function) until it returns something
    truthy; that value. AssertionError after *timeout* seconds."""
    clock = _reactor(reactor)
    deadline = clock.seconds() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if clock.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await sleep(interval, clock)
