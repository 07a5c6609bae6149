"""The response aggregator: one request fanned out to several backends with a deadline.

Every part ends up in the result, marked ``ok``, ``error`` or ``timeout``: late or
failed parts are reported as partial, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

PartStatus = Literal["ok", "error", "timeout"]


@dataclass(frozen=True)
class Part:
    name: str
    status: PartStatus
    latency_ms: float
    value: Any = None
    error: str = ""


def fan_out(
    clock: IReactorTime,
    calls: Mapping[str, Callable[[], Deferred[Any]]],
    deadline: float,
) -> Deferred[dict[str, Part]]:
    """Start every call at once; fire with one :class:`Part` per name by *deadline*."""
    result: Deferred[dict[str, Part]] = Deferred()
    parts: dict[str, Part] = {}
    pending: dict[str, Deferred[Any]] = {}
    started = clock.seconds()

    def elapsed() -> float:
        return round((clock.seconds() - started) * 1000, 3)

    def finish() -> None:
        if timer.active():
            timer.cancel()
        if not result.called:
            result.callback({name: parts[name] for name in calls})

    def settle(name: str, part: Part) -> None:
        if name in parts:
            return
        parts[name] = part
        pending.pop(name, None)
        if not pending and len(parts) == len(calls):
            finish()

    def on_deadline() -> None:
        for name, d in list(pending.items()):
            settle(name, Part(name, "timeout", elapsed(), error=f"no answer within {deadline}s"))
            d.cancel()
        finish()

    timer = clock.callLater(deadline, on_deadline)
    if not calls:
        finish()
        return result
    for name, call in calls.items():
        d = maybeDeferred(call)
        pending[name] = d

        def ok(value: Any, name: str = name) -> None:
            settle(name, Part(name, "ok", elapsed(), value=value))

        def failed(f: Failure, name: str = name) -> None:
            if f.check(CancelledError) and name in parts:
                return
            message = f.getErrorMessage() or getattr(f.type, "__name__", "error")
            settle(name, Part(name, "error", elapsed(), error=message))

        d.addCallbacks(ok, failed)
    return result
