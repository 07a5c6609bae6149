"""The recent log lines the admin API shows: a bounded ring buffer log observer.

The gateway adds one :class:`LogBuffer` to the global log publisher while it runs
(:meth:`~aico.gateway.composition.GatewayParts.start`); it keeps the newest
:attr:`LogBuffer.capacity` events as plain records — time, level, namespace and the
formatted text, written one line safe (:func:`~aico.gateway.logs.line_safe`) — the
access log's lines (namespace ``aico.access``) among them. Nothing else of an event is
kept, so no field the message does not show (a header, a body) can reach the API.
Subscribers (the live tail) are told of every new record.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent
from zope.interface import implementer

from aico.gateway.logs import line_safe

__all__ = ["LEVELS", "LogBuffer"]

#: Level names, lowest first (``?level=warn`` shows warn, error and critical).
LEVELS = ("debug", "info", "warn", "error", "critical")

Record = dict[str, Any]
_LEVEL_TYPE = type(LogLevel.info)


def _record(item: tuple[int, float, str, str, str]) -> Record:
    seq, when, level, namespace, text = item
    return {"seq": seq, "time": when, "level": level, "namespace": namespace, "text": text}


@implementer(ILogObserver)
class LogBuffer:
    """The newest *capacity* log events, as records; see the module docstring."""

    def __init__(self, capacity: int = 2000) -> None:
        self.capacity = capacity
        # Records are kept as tuples (seq, time, level, namespace, text) and made dicts
        # only when read: a tuple of strings and numbers leaves the garbage collector's
        # lists, and one access line a request made a dict each (~12 µs a line, measured
        # with 2,000 of them kept).
        self._records: deque[tuple[int, float, str, str, str]] = deque(maxlen=capacity)
        self._seq = 0
        self._subscribers: list[Callable[[Record], None]] = []

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level")
        line = event.get("line")
        if event.get("log_format") == "{line}" and isinstance(line, str):
            text = line  # the access log's lines come formatted (one per request: keep it cheap)
        else:
            try:
                text = formatEvent(event)
            except Exception:
                text = "(unformattable log event)"
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text} ({failure.getErrorMessage()})"
        self._seq += 1
        item = (self._seq, float(event.get("log_time") or 0.0),
                level.name if isinstance(level, _LEVEL_TYPE) else "info",
                line_safe(str(event.get("log_namespace") or "-")), line_safe(text))
        self._records.append(item)
        if self._subscribers:
            record = _record(item)
            for subscriber in list(self._subscribers):
                try:
                    subscriber(dict(record))
                except Exception:  # a broken tail must never break logging
                    self._subscribers.remove(subscriber)

    def recent(self, limit: int = 100, level: str = "debug") -> list[Record]:
        """The newest *limit* records at *level* or above, oldest first."""
        if limit <= 0:
            return []
        floor = LEVELS.index(level)
        out = [r for r in self._records if LEVELS.index(r[2]) >= floor]
        return [_record(r) for r in out[-limit:]]

    def subscribe(self, subscriber: Callable[[Record], None]) -> Callable[[], None]:
        """Tell *subscriber* of every new record; returns the unsubscribe function."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    def __len__(self) -> int:
        return len(self._records)
