"""Log output for operators: ``twistd --logger aico.gateway.logs.json_observer …``.

Every gateway component logs with ``twisted.logger`` (a ``Logger()`` per class, PEP 3101
templates with fields). This observer writes one JSON object per event (the event's
fields included), for log shippers; the default twistd observer writes text.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


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
