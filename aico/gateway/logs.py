"""Log output for operators: ``twistd --logger aico.gateway.logs.json_observer …``.

Every gateway component logs with ``twisted.logger`` (a ``Logger()`` per class, PEP 3101
templates with fields). This observer writes one JSON object per event (the event's
fields included), for log shippers; the default twistd observer writes text.
"""

from __future__ import annotations

import sys
from string import Formatter
from typing import Any

from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogPublisher,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.python.failure import Failure
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


def _guard(event: LogEvent) -> None:
    fmt = event.get("log_format")
    if isinstance(fmt, str):
        if not fmt.isprintable():
            event["log_format"] = fmt = line_safe(fmt)
        fields: dict[str, Any] = event.get("log_flattened") or {}
        keys = _Keys()
        # What twisted.logger's flattenEvent does, with the format spec applied and the
        # text made safe: every observer (text or JSON) formats from these values.
        for _, name, spec, conversion in _FORMATTER.parse(fmt):
            if name is None:
                continue
            conversion = "r" if conversion == "r" else "s"
            spec = spec or ""
            flat_key = keys.key(name, spec, conversion)
            structured_key = keys.key(name, spec, "")
            if flat_key in fields:
                value = fields[flat_key]
                if isinstance(value, str):
                    fields[flat_key] = line_safe(value)
                continue
            call = name.endswith("()")
            field = _FORMATTER.get_field(name[:-2] if call else name, (), event)[0]
            if call:
                field = field()
            shown = repr(field) if conversion == "r" else field
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


def guard_log_lines(publisher: LogPublisher | None = None) -> LineGuard:
    """Put :data:`LINE_GUARD` first among *publisher*'s observers (the global one by
    default: ``twistd`` adds its own observers to it after ``makeService``, and every
    ``Logger`` publishes to it). Idempotent."""
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
