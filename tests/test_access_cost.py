"""The cheaper access line writes what it wrote before.

* the access log publishes the very event ``Logger.info`` published (same keys, same
  values, same order), so the text log, the JSON logger and the admin log buffer see the
  same line;
* the line guard, parsing each format string once, flattens events exactly as
  twisted.logger's own ``flattenEvent`` does for safe text;
* the text log's time, cached per second, is ``formatTime``'s text for every instant,
  at second boundaries and across a change of time zone.
"""

from __future__ import annotations

import copy
import io
import os
import random
import time
from string import Formatter
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
    formatEvent,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.logger import _file as twisted_file
from twisted.logger._format import formatTime
from twisted.trial.unittest import SynchronousTestCase

from aico.gateway import logs
from aico.gateway.access import ACCESS_NAMESPACE, AccessLog
from aico.gateway.routing.messages import Principal, Request
from aico.gateway.testing.memory import MemoryGateway


def legacy_record(access: AccessLog, request: Request, status: int, body_bytes: int) -> None:
    """What AccessLog.record did before it built its event itself (Logger.info)."""
    p = request.principal
    principal = logs.escape((p.subject if p is not None else "") or request.device_id or "-")
    duration_ms = (max(0.0, access.clock.seconds() - request.started) * 1000.0
                   if request.started else 0.0)
    method, path = logs.escape(request.method), logs.escape(request.path)
    line = (f'{request.request_id} {request.transport} {principal} "{method} {path}" '
            f"{status} {duration_ms:.1f}ms {body_bytes}B")
    access.log.info("{line}", line=line, request_id=request.request_id,
                    transport=request.transport, principal=principal, method=method,
                    path=path, status=status, duration_ms=duration_ms, bytes=body_bytes,
                    peer=request.peer_host)


class AccessEventTests(SynchronousTestCase):
    def test_the_event_is_the_one_logger_info_published(self) -> None:
        clock = MemoryReactorClock()
        clock.advance(1.7e9)
        events: list[LogEvent] = []
        access = AccessLog(clock)
        access.log.observer = events.append  # type: ignore[assignment,method-assign]
        for principal, device, path in [(Principal(subject="ada"), "", "/api/v1/users/me"),
                                        (None, "dev-1", "/x\r\nforged"), (None, "", "/")]:
            request = Request("GET", path, "r" * 32, "http", started=clock.seconds() - 0.004,
                              peer_host="127.0.0.1", device_id=device)
            request.principal = principal
            access.record(request, 200, 118)
            legacy_record(access, request, 200, 118)
            new, old = events[-2], events[-1]
            self.assertEqual(list(new), list(old))
            new.pop("log_time")
            old.pop("log_time")
            self.assertEqual(new, old)
        self.assertEqual(events[0]["log_namespace"], ACCESS_NAMESPACE)
        self.assertEqual(access.count, 3)

    def test_a_gateway_writes_one_line_per_request_to_the_text_log_and_the_log_buffer(
            self) -> None:
        text = io.StringIO()
        observer = textFileLogObserver(text)
        logs.guard_log_lines()
        self.addCleanup(logs.unguard_log_lines)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        gw = MemoryGateway(test=self)
        globalLogPublisher.addObserver(gw.parts.log_buffer)
        self.addCleanup(globalLogPublisher.removeObserver, gw.parts.log_buffer)
        token = gw.token()
        for i in range(3):
            r = gw.get("/api/v1/users/me", token=token, headers={"X-Request-ID": f"c-{i}"})
            self.assertEqual(r.code, 200)
        written = [line for line in text.getvalue().splitlines() if "[aico.access#info]" in line]
        for i in range(3):
            (line,) = [w for w in written if f" c-{i} " in w]
            self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[aico\.access#info\] "
                                   rf'c-{i} http admin "GET /api/v1/users/me" 200 ')
        buffered = [r["text"] for r in gw.parts.log_buffer.recent(100)
                    if r["namespace"] == ACCESS_NAMESPACE]
        self.assertEqual(sum(t.startswith("c-") for t in buffered), 3)


def legacy_flatten(event: dict[str, Any]) -> None:
    """The guard's flattening before it parsed each format once (a copy of the old code)."""
    fmt = event["log_format"]
    fields: dict[str, Any] = event.get("log_flattened") or {}
    keys = logs._Keys()
    for _, name, spec, conversion in Formatter().parse(fmt):
        if name is None:
            continue
        conversion = "r" if conversion == "r" else "s"
        spec = spec or ""
        flat_key = keys.key(name, spec, conversion)
        structured_key = keys.key(name, spec, "")
        if flat_key in fields:
            value = fields[flat_key]
            if isinstance(value, str):
                fields[flat_key] = logs.line_safe(value)
            continue
        call = name.endswith("()")
        field = Formatter().get_field(name[:-2] if call else name, (), event)[0]
        if call:
            field = field()
        shown = repr(field) if conversion == "r" else field
        try:
            text = format(shown, spec)
        except (ValueError, TypeError):
            text = str(shown)
        fields[flat_key] = logs.line_safe(text)
        fields[structured_key] = field
    if fields:
        event["log_flattened"] = fields


class GuardParsesEachFormatOnceTests(SynchronousTestCase):
    FORMATS = [
        ("{line}", {"line": "a b"}),
        ("{a} {a} {a!r} {a:>5} {a:>5}", {"a": "x"}),
        ("{n:04d} {f:.2f} {n!r} {n}", {"n": 7, "f": 2.5}),
        ("{obj.real} {seq[1]} {m[k]}", {"obj": 3, "seq": ["p", "q"], "m": {"k": "v"}}),
        ("{call()} {call()!r}", {"call": lambda: "called"}),
        ("plain text, no fields", {}),
        ("{{escaped}} {x}", {"x": 1}),
    ]

    def test_flattening_is_what_the_guard_made_before_and_formats_as_twisted_does(
            self) -> None:
        unsafe = [("{a} {a!r} {b:>6}", {"a": "x\r\nforged", "b": "\u2028"}),
                  ("{line}", {"line": "\x1b[2J", "log_flattened": {"line!s:": "pre\n"}})]
        for fmt, fields in self.FORMATS + unsafe:
            for _ in range(2):  # the second time from the parse cache
                ours: dict[str, Any] = {"log_format": fmt, **copy.deepcopy(fields)}
                before: dict[str, Any] = {"log_format": fmt, **copy.deepcopy(fields)}
                theirs: dict[str, Any] = {"log_format": fmt, **copy.deepcopy(fields)}
                logs._guard(ours)
                legacy_flatten(before)
                self.assertEqual(ours.get("log_flattened"), before.get("log_flattened"), fmt)
                if (fmt, fields) in self.FORMATS:
                    self.assertEqual(formatEvent(ours), formatEvent(theirs), fmt)

    def test_unsafe_values_are_still_escaped_with_the_cache_warm(self) -> None:
        for _ in range(3):
            event: dict[str, Any] = {"log_format": "{line} {x!r}", "line": "a\r\nforged",
                                     "x": "\u2028"}
            logs._guard(event)
            self.assertEqual(formatEvent(event), "a\\r\\nforged '\\u2028'")

    def test_a_field_that_is_missing_is_left_to_the_observers(self) -> None:
        publisher = LogPublisher()
        seen: list[LogEvent] = []
        publisher.addObserver(logs.LINE_GUARD)
        publisher.addObserver(seen.append)
        Logger(observer=publisher).info("{missing} {here}", here="x")
        self.assertIn("Unable to format event", formatEvent(seen[0]))


class CachedTimeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.original = formatTime
        self.cached = logs.CachedFormatTime(formatTime)

    def test_it_is_format_time_at_every_instant_and_second_boundary(self) -> None:
        rng = random.Random(12)
        base = 1_790_000_000
        instants: list[float | None] = [None, 0.0, 1.5, float(base)]
        for s in range(base, base + 5):
            instants += [s + f for f in (0.0, 0.4999995, 0.5, 0.9999994, 0.9999995, 0.9999996,
                                         0.99999999, 1e-7)]
        instants += [rng.uniform(0, 4e9) for _ in range(2000)]
        instants += sorted(base + rng.uniform(0, 3) for _ in range(500))  # mostly cache hits
        for when in instants:
            for fmt in (logs.timeFormatRFC3339, "%H:%M:%S.%f", None, "%Y"):
                self.assertEqual(self.cached(when, fmt), self.original(when, fmt), (when, fmt))

    def test_a_change_of_time_zone_shows_at_once(self) -> None:
        old = os.environ.get("TZ")

        def restore() -> None:
            if old is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = old
            time.tzset()

        self.addCleanup(restore)
        when = 1_790_000_000.25
        for tz in ("UTC", "America/New_York", "Asia/Kolkata", "UTC"):
            os.environ["TZ"] = tz
            time.tzset()
            self.assertEqual(self.cached(when), self.original(when), tz)

    def test_the_guard_installs_it_for_text_file_observers_once(self) -> None:
        logs.guard_log_lines()
        self.addCleanup(logs.unguard_log_lines)
        installed = twisted_file.formatTime  # type: ignore[attr-defined]
        self.assertIsInstance(installed, logs.CachedFormatTime)
        self.assertIs(logs.cache_log_time(), installed)
        out = io.StringIO()
        textFileLogObserver(out)({"log_format": "x", "log_time": 1_790_000_000.5,
                                  "log_namespace": "n", "log_level": None})
        self.assertTrue(out.getvalue().startswith(formatTime(1_790_000_000.5)), out.getvalue())


class AccessLineFormatTests(SynchronousTestCase):
    """twistd's text log formats access lines directly: the same text as before."""

    def observer(self) -> tuple[Any, io.StringIO]:
        out = io.StringIO()
        return textFileLogObserver(out), out

    def guarded(self, **fields: Any) -> LogEvent:
        event: LogEvent = {"log_namespace": ACCESS_NAMESPACE, "log_format": "{line}",
                           "log_level": LogLevel.info, "log_time": time.time(), **fields}
        logs.LINE_GUARD(event)
        return event

    def test_every_shape_of_access_event_is_formatted_as_twisted_formats_it(self) -> None:
        observer, _ = self.observer()
        original = observer.formatEvent
        publisher = LogPublisher(observer)
        self.assertEqual(logs.fast_access_lines(publisher, MemoryReactorClock()), 1)
        fast = observer.formatEvent
        self.assertIsInstance(fast, logs.AccessLineFormat)
        self.assertEqual(logs.fast_access_lines(publisher, MemoryReactorClock()), 0)  # once
        rng = random.Random(7)
        lines = ['r-1 http admin "GET /api/v1/users/me" 200 1.2ms 88B', "", "x", "tab\there",
                 "new\nline", "bidi \u202e override", "é ünï", "\x00\x1b[31m"]
        events: list[LogEvent] = []
        for line in lines:
            for when in (None, 0.0, 1_700_000_000.999_999_5, rng.uniform(0, 2e9)):
                for level in (LogLevel.info, LogLevel.warn):
                    events.append(self.guarded(line=line, log_time=when, log_level=level))
        events += [
            self.guarded(line="with system", log_system="sys"),
            self.guarded(line="not text", log_format="{line!r}"),
            self.guarded(line="other ns", log_namespace="aico.other"),
            {"log_namespace": ACCESS_NAMESPACE, "log_format": "{line}", "line": "unguarded\n",
             "log_level": LogLevel.info, "log_time": 5.0},
            {"log_format": "plain {x}", "x": 1, "log_time": 1.0},
            self.guarded(line=12345),
        ]
        for event in events:
            self.assertEqual(fast(copy.copy(event)), original(copy.copy(event)), event)

    def test_the_fast_path_is_taken_for_gateway_access_lines(self) -> None:
        observer, out = self.observer()
        publisher = LogPublisher(logs.LINE_GUARD, observer)
        clock = MemoryReactorClock()
        logs.fast_access_lines(publisher, clock)
        observer._outFile.in_reactor_thread = lambda: True
        calls: list[LogEvent] = []
        fast = observer.formatEvent
        fast.original = lambda e: calls.append(e) or "slow\n"  # type: ignore[union-attr]
        request = Request(method="GET", path="/api/v1/x", request_id="r-9", transport="ipc",
                          principal=Principal(subject="ann"))
        access = AccessLog(MemoryReactorClock())
        access.log = Logger(namespace=ACCESS_NAMESPACE, source=access, observer=publisher)
        access.record(request, 200, 12)
        self.assertEqual(calls, [])
        self.assertEqual(out.getvalue(), "")  # until the end of the reactor turn
        clock.advance(0)
        self.assertRegex(out.getvalue(), r'^\S+ \[aico\.access#info\] r-9 ipc ann "GET /api/v1/x" '
                                         r"200 0\.0ms 12B\n$")


class _File:
    """A text file that records each write and flush."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, str]] = []

    def write(self, text: str) -> None:
        self.ops.append(("write", text))

    def flush(self) -> None:
        self.ops.append(("flush", ""))

    def rotate(self) -> str:
        return "rotated"


class TurnBufferedFileTests(SynchronousTestCase):
    """Access lines go to the text log once per reactor turn; nothing else waits."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.file = _File()
        self.in_reactor = True
        self.buffered = logs.TurnBufferedFile(self.file, self.clock, lambda: self.in_reactor)

    def log(self, text: str) -> None:
        """What FileLogObserver does with each line."""
        self.buffered.write(text)
        self.buffered.flush()

    def test_a_turns_access_lines_are_one_write_at_its_end(self) -> None:
        self.log(logs.AccessText("a1\n"))
        self.log(logs.AccessText("a2\n"))
        self.assertEqual(self.file.ops, [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # one call per turn
        self.clock.advance(0)
        self.assertEqual(self.file.ops, [("write", "a1\na2\n"), ("flush", "")])
        self.log(logs.AccessText("a3\n"))
        self.clock.advance(0)
        self.assertEqual(self.file.ops[-2:], [("write", "a3\n"), ("flush", "")])

    def test_any_other_line_writes_the_waiting_ones_first_and_is_flushed_at_once(self) -> None:
        self.log(logs.AccessText("a1\n"))
        self.log("warning\n")
        self.assertEqual(self.file.ops, [("write", "a1\n"), ("write", "warning\n"),
                                         ("flush", "")])
        self.clock.advance(0)  # nothing left for the end of the turn
        self.assertEqual(len(self.file.ops), 3)

    def test_an_access_line_from_another_thread_is_written_at_once(self) -> None:
        self.in_reactor = False
        self.log(logs.AccessText("a1\n"))
        self.assertEqual(self.file.ops, [("write", "a1\n"), ("flush", "")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waiting_lines_are_written_when_the_reactor_stops(self) -> None:
        observer = textFileLogObserver(io.StringIO())
        publisher = LogPublisher(logs.LINE_GUARD, observer)
        logs.fast_access_lines(publisher, self.clock)
        buffered = observer._outFile
        self.assertIsInstance(buffered, logs.TurnBufferedFile)
        buffered.in_reactor_thread = lambda: True
        access = AccessLog(self.clock)
        access.log = Logger(namespace=ACCESS_NAMESPACE, source=access, observer=publisher)
        access.record(Request("GET", "/api/v1/x", "r-1", "http"), 200, 1)
        self.assertEqual(buffered.out.getvalue(), "")
        for trigger, args, kwargs in self.clock.triggers["after"]["shutdown"]:
            trigger(*args, **kwargs)
        self.assertIn(" r-1 http - \"GET /api/v1/x\" 200", buffered.out.getvalue())
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the turn's call went with it

    def test_a_line_logged_while_the_waiting_ones_are_written_does_not_deadlock(self) -> None:
        buffered = self.buffered

        class Noisy(_File):
            def write(inner, text: str) -> None:
                super().write(text)
                if text.startswith("a1"):
                    buffered.write("logged by the file\n")

        self.file = buffered.out = Noisy()
        self.log(logs.AccessText("a1\n"))
        self.clock.advance(0)
        self.assertEqual([text for op, text in self.file.ops if op == "write"],
                         ["a1\n", "logged by the file\n"])

    def test_the_wrapped_files_own_methods_stay_reachable(self) -> None:
        self.assertEqual(self.buffered.rotate(), "rotated")

    def test_lines_written_from_threads_and_the_reactor_are_all_kept(self) -> None:
        """Another thread's lines write the waiting ones under the same lock as the
        reactor thread adds to them: no line lost or duplicated."""
        import threading

        lines = _CountingFile()
        main = threading.get_ident()
        buffered = logs.TurnBufferedFile(lines, self.clock, lambda: threading.get_ident() == main)

        def other() -> None:
            for i in range(2000):
                buffered.write(f"t{i}\n")

        worker = threading.Thread(target=other)
        worker.start()
        for i in range(2000):
            buffered.write(logs.AccessText(f"a{i}\n"))
            if i % 100 == 0:
                self.clock.advance(0)
        worker.join()
        buffered.write_pending()
        written = "".join(lines.parts).splitlines()
        self.assertEqual(sorted(written), sorted([f"a{i}" for i in range(2000)]
                                                 + [f"t{i}" for i in range(2000)]))
        self.assertEqual([x for x in written if x.startswith("a")], [f"a{i}" for i in range(2000)])


class _CountingFile:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)

    def flush(self) -> None:
        pass
