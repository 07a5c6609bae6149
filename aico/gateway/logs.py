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
