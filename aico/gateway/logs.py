"""Log output for operators: ``twistd --logger aico.gateway.logs.json_observer …``.

Every gateway component logs with ``twisted.logger`` (a ``Logger()`` per class, PEP 3101
templates with fields). This observer writes one JSON object per event (the event's
fields included), for log shippers; the default twistd observer writes text.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from string import Formatter
from typing import Any

from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogPublisher,
    _file,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.logger._format import timeFormatRFC3339
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread
from zope.interface import implementer


def json_observer() -> ILogObserver:
    """A twistd ``--logger`` factory: JSON lines on standard output."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")


_ESCAPES = {"\r": "\\r", "\n": "\\n", "\t": "\\t", "\\": "\\\\"}


def escape(text: str) -> str:
    """*text* safe for one log line: CR, LF, other control characters and the Unicode
    line and paragraph separators are written as escapes, so a value sent by a client
    (a username, a path, a header) can never start a forged line of its own."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif not ch.isprintable():
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def line_safe(text: str) -> str:
    """*text* with every character that could break or forge a log line (CR, LF, other
    control characters, U+2028/2029, bidi overrides…) written as an escape. Unlike
    :func:`escape` it leaves backslashes alone, so text escaped already passes
    unchanged (the guard may see a value twice)."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out)


_FORMATTER = Formatter()


class _Keys:
    """twisted.logger's keys of flattened fields (``name!conversion:spec``, then ``/2``,
    ``/3``… for repeats), as its ``flatFormat`` looks them up."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def key(self, name: str, spec: str, conversion: str) -> str:
        result = f"{name}!{conversion}:{spec}"
        count = self.seen[result] = self.seen.get(result, 0) + 1
        return result if count == 1 else f"{result}/{count}"


class _GuardedFailure(Failure):
    """A copy of a failure whose traceback text is *text* (every line made safe)."""

    def __init__(self, original: Failure, text: str) -> None:  # no Failure.__init__
        self.__dict__.update(original.__dict__)
        self._guarded_text = text

    def getTraceback(self, elideFrameworkCode: int = 0, detail: str = "default") -> str:
        return self._guarded_text


#: One field of a format string, as the guard uses it: the name to look up (without a
#: trailing ``()``), whether it is a plain key of the event, the format spec, the
#: conversion, twisted.logger's flattened and structured keys, whether it is called.
_Field = tuple[str, bool, str, str, str, str, bool]


@lru_cache(maxsize=1024)
def _fields_of(fmt: str) -> tuple[_Field, ...]:
    """The fields of *fmt*, parsed once per format string (call sites log a handful of
    literal formats; the parse and key building cost most of the guard's time)."""
    keys = _Keys()
    out = []
    for _, name, spec, conversion in _FORMATTER.parse(fmt):
        if name is None:
            continue
        conversion = "r" if conversion == "r" else "s"
        spec = spec or ""
        flat_key = keys.key(name, spec, conversion)
        structured_key = keys.key(name, spec, "")
        call = name.endswith("()")
        lookup = name[:-2] if call else name
        plain = lookup.isidentifier()
        out.append((lookup, plain, spec, conversion, flat_key, structured_key, call))
    return tuple(out)


def _guard(event: LogEvent) -> None:
    fmt = event.get("log_format")
    if isinstance(fmt, str):
        if not fmt.isprintable():
            event["log_format"] = fmt = line_safe(fmt)
        fields: dict[str, Any] = event.get("log_flattened") or {}
        # What twisted.logger's flattenEvent does, with the format spec applied and the
        # text made safe: every observer (text or JSON) formats from these values.
        for name, plain, spec, conversion, flat_key, structured_key, call in _fields_of(fmt):
            if flat_key in fields:
                value = fields[flat_key]
                if isinstance(value, str):
                    fields[flat_key] = line_safe(value)
                continue
            field = event[name] if plain else _FORMATTER.get_field(name, (), event)[0]
            if call:
                field = field()
            shown = repr(field) if conversion == "r" else field
            if type(shown) is str and not spec:
                text = shown  # format(text, "") is the text itself
            else:
                try:
                    text = format(shown, spec)
                except (ValueError, TypeError):
                    text = str(shown)
            fields[flat_key] = line_safe(text)
            fields[structured_key] = field
        if fields:
            event["log_flattened"] = fields
    for key in ("log_system", "log_namespace"):
        value = event.get(key)
        if isinstance(value, str) and not value.isprintable():
            event[key] = line_safe(value)
    failure = event.get("log_failure")
    if isinstance(failure, Failure) and not isinstance(failure, _GuardedFailure):
        text = failure.getTraceback()
        # Line breaks of the traceback itself stay (the text observer indents them);
        # anything inside a line is made safe.
        safe = "\n".join(line_safe(line) for line in text.split("\n"))
        if safe != text:
            event["log_failure"] = _GuardedFailure(failure, safe)


@implementer(ILogObserver)
class LineGuard:
    """A log observer that runs first and makes every event safe for a line-based log:
    whatever a client sent (a username, a path, a header) and whatever a call site
    forgot to escape, no formatted field, system or traceback line of the event can
    contain a line break or another control character. Every later observer (twistd's
    text log, the JSON logger, syslog) formats from the safe values."""

    def __call__(self, event: LogEvent) -> None:
        try:
            _guard(event)
        except Exception:  # noqa: S110 - a field that cannot be formatted: the observers say so
            pass


#: The gateway's one guard (installed by :func:`guard_log_lines`).
LINE_GUARD = LineGuard()


class CachedFormatTime:
    """twisted.logger's ``formatTime`` with the last second's text kept.

    twistd's text log (``textFileLogObserver``) formats every line's time with a time-zone
    conversion (~9 µs a line); its format has no unit below the second, so one text per
    second serves every line of that second. The second is the one ``datetime`` rounds
    *when* to (to the microsecond, half to even), and the key holds the process's time
    zone too (``time.tzset`` changes it): the text is always what ``formatTime`` gives.
    """

    def __init__(self, original: Callable[..., str]) -> None:
        self.original = original
        self._key: tuple[Any, ...] | None = None
        self._text = ""

    def __call__(self, when: float | None, timeFormat: str | None = timeFormatRFC3339,
                 default: str = "-") -> str:
        if timeFormat is None or when is None or "%f" in timeFormat:
            return self.original(when, timeFormat, default)
        frac, second = math.modf(when)
        micros = round(frac * 1e6)
        if micros >= 1_000_000:
            second += 1
        elif micros < 0:
            second -= 1
        key = (second, timeFormat, time.timezone, time.altzone, time.daylight)
        if key != self._key:
            self._text = self.original(when, timeFormat, default)
            self._key = key
        return self._text


def cache_log_time() -> CachedFormatTime:
    """Make twisted.logger's text file observers (twistd's log file among them) format
    each second's time once (:class:`CachedFormatTime`). Idempotent."""
    current = getattr(_file, "formatTime")  # noqa: B009 - a name _file imports, not exports
    if isinstance(current, CachedFormatTime):
        return current
    cached = CachedFormatTime(current)
    setattr(_file, "formatTime", cached)  # noqa: B010
    return cached


def guard_log_lines(publisher: LogPublisher | None = None) -> LineGuard:
    """Put :data:`LINE_GUARD` first among *publisher*'s observers (the global one by
    default: ``twistd`` adds its own observers to it after ``makeService``, and every
    ``Logger`` publishes to it). Idempotent. Also caches the text log's time per second
    (:func:`cache_log_time`)."""
    cache_log_time()
    target = globalLogPublisher if publisher is None else publisher
    target.addObserver(LINE_GUARD)
    # twisted.logger has no public way to order observers: the guard must run before
    # any that formats, also those added before it (e.g. an embedding program's).
    observers = getattr(target, "_observers", None)
    if isinstance(observers, list) and observers and observers[0] is not LINE_GUARD:
        observers.remove(LINE_GUARD)
        observers.insert(0, LINE_GUARD)
    return LINE_GUARD


def unguard_log_lines(publisher: LogPublisher | None = None) -> None:
    """Remove the guard (tests)."""
    (globalLogPublisher if publisher is None else publisher).removeObserver(LINE_GUARD)


#: The namespace of access-log events (``aico.gateway.access.ACCESS_NAMESPACE``).
_ACCESS = "aico.access"
#: ``textFileLogObserver``'s formatter, the one twistd's text log uses.
_TEXT_FORMATTER = "textFileLogObserver.<locals>.formatEvent"


class AccessText(str):
    """An access line as :class:`AccessLineFormat` makes it: a :class:`TurnBufferedFile`
    may hold it until the end of the reactor turn."""

    __slots__ = ()


class AccessLineFormat:
    """twistd's text-log formatter with the access log's lines written directly.

    An access event (namespace ``aico.access``, format ``{line}``, seen by the line guard,
    no ``log_system``, no failure) becomes ``"{time} [aico.access#{level}] {line}\\n"`` — what
    ``formatEventAsClassicLogText`` makes of it, without the generic work (flattening the
    format, the system field, the replacements): 1.6 instead of 15 µs a line — as an
    :class:`AccessText`. Every other event goes to the original formatter;
    ``tests/test_access_cost.py`` compares the two on access events of every shape.
    """

    def __init__(self, original: Callable[[LogEvent], str | None], time_format: str | None) -> None:
        self.original = original
        self.time_format = time_format

    def __call__(self, event: LogEvent) -> str | None:
        line = event.get("line")
        level = event.get("log_level")
        if (type(line) is str and line and event.get("log_namespace") == _ACCESS
                and event.get("log_format") == "{line}" and level is not None
                and "log_flattened" in event  # the line guard ran: the text is line_safe
                and "log_system" not in event and "log_failure" not in event):
            text = line_safe(line)
            when = getattr(_file, "formatTime")(event.get("log_time"), self.time_format)  # noqa: B009
            return AccessText(f"{when} [{_ACCESS}#{level.name}] {text}\n")
        return self.original(event)


class TurnBufferedFile:
    """The text log's file, with access lines written once per reactor turn.

    twistd's text observer writes and flushes every line: one ``write`` system call, a
    lock and a rotation check per request, made before the request's answer goes out (the
    dispatcher tells its observers first), so every later answer of a reactor turn waited
    for the writes ahead of it — the WebSocket p99 fell from ~50 to ~33 ms without them
    (docs/performance.md, third round). Here an access line (an :class:`AccessText`)
    written on the reactor thread waits in a list; at the end of the reactor turn
    (``callLater(0)``) the turn's lines go out in one write. Any other line — a warning,
    an error, a line from another thread — first writes the waiting ones, then itself,
    and is flushed at once as before: the order of lines is kept and nothing but access
    lines is ever held back. When the reactor stops, the waiting lines are written (a
    shutdown trigger); a process killed outright loses at most one turn's access lines.
    Everything else (``close``, rotation) is the wrapped file's.
    """

    def __init__(self, out: Any, reactor: Any,
                 in_reactor_thread: Callable[[], bool] = isInIOThread) -> None:
        self.out = out
        self.reactor = reactor
        self.in_reactor_thread = in_reactor_thread
        self._pending: list[str] = []
        # Reentrant: a line logged while the waiting ones are written (by the file
        # itself, say) must not deadlock the thread writing them.
        self._lock = threading.RLock()
        self._call: Any = None
        #: The reactor's shutdown trigger that writes what waits (set by
        #: :func:`fast_access_lines`).
        self.trigger: Any = None

    def write(self, text: Any) -> None:
        if type(text) is AccessText and self.in_reactor_thread():
            with self._lock:
                self._pending.append(text)
            if self._call is None:
                self._call = self.reactor.callLater(0, self.write_pending)
            return
        with self._lock:
            self._write_pending()
            self.out.write(text)

    def flush(self) -> None:
        if not self._pending:  # after an access line: flushed with the turn's others
            self.out.flush()

    def write_pending(self) -> None:
        """Write the access lines waiting now (the end of a turn, or shutdown)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        with self._lock:
            wrote = self._write_pending()
        if wrote:
            self.out.flush()

    def _write_pending(self) -> bool:
        if not self._pending:
            return False
        data = "".join(self._pending)
        self._pending.clear()
        self.out.write(data)
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.out, name)


def fast_access_lines(publisher: LogPublisher | None = None, reactor: Any = None) -> int:
    """Give every text file observer of *publisher* (the global one: twistd's text log)
    an :class:`AccessLineFormat` and a :class:`TurnBufferedFile` on *reactor* (the global
    one); the number of observers changed. Idempotent. Called once the gateway runs under
    twistd (its observers exist only after ``makeService``)."""
    target = globalLogPublisher if publisher is None else publisher
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    changed = 0
    for observer in list(getattr(target, "_observers", [])):
        fmt = getattr(observer, "formatEvent", None)
        if getattr(fmt, "__qualname__", "") != _TEXT_FORMATTER or fmt is None:
            continue
        names = fmt.__code__.co_freevars
        cells = fmt.__closure__ or ()
        if "timeFormat" not in names:
            continue
        time_format = cells[names.index("timeFormat")].cell_contents
        observer.formatEvent = AccessLineFormat(fmt, time_format)
        if getattr(observer, "_encoding", "") is None and hasattr(observer, "_outFile"):
            # A text file (an encoding set means bytes are written: left as it is).
            buffered = TurnBufferedFile(observer._outFile, reactor)
            observer._outFile = buffered
            buffered.trigger = reactor.addSystemEventTrigger("after", "shutdown",
                                                             buffered.write_pending)
        changed += 1
    return changed
