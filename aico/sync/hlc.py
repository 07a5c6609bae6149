"""Hybrid logical clocks (Kulkarni et al., 2014) as sortable text.

A timestamp is ``WWWWWWWWWWWWW:CCCCCC:NODE``: the wall time in milliseconds since the
epoch (13 digits, zero-padded), a counter (6 digits) and the node's name (this
gateway's device ID). Both numbers are fixed width, so comparing two timestamps as text
compares them as ``(wall, counter, node)`` tuples: text order is clock order, and two
nodes never produce the same text.

:class:`HybridClock` gives a node its timestamps: :meth:`~HybridClock.tick` for a local
event, :meth:`~HybridClock.observe` when a timestamp arrives from a peer. Every
timestamp a clock returns is greater than every one it returned or observed before, and
stays within a bounded distance of the physical clock: a remote timestamp more than
:data:`MAX_DRIFT` seconds ahead of ours is refused (:class:`ClockDriftError`) instead of
dragging this clock into the future.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

#: A remote timestamp further ahead of the local physical clock than this (seconds) is
#: refused.
MAX_DRIFT = 60.0
WALL_DIGITS = 13
COUNTER_DIGITS = 6
MAX_COUNTER = 10**COUNTER_DIGITS - 1
#: What a node name may hold (a device ID, ``[A-Z2-7-]``, or a test's name).
NODE_PATTERN = r"[A-Za-z0-9._-]{1,128}"
_TEXT = re.compile(rf"^(\d{{{WALL_DIGITS}}}):(\d{{{COUNTER_DIGITS}}}):({NODE_PATTERN})$")


_BOUND = re.compile(rf"^\d{{{WALL_DIGITS}}}:\d{{{COUNTER_DIGITS}}}:(?:{NODE_PATTERN})?$")


def check_bound(text: str) -> str:
    """*text* if it is a timestamp or a bound (a timestamp without its node, which sorts
    below every node's timestamp of that instant, as acknowledgements carry); else
    :class:`ClockError`."""
    if not isinstance(text, str) or not _BOUND.match(text):
        raise ClockError(f"not a hybrid-logical-clock timestamp or bound: {str(text)[:80]!r}")
    return text


class ClockError(ValueError):
    """A timestamp that cannot be read, or a clock that cannot advance."""


class ClockDriftError(ClockError):
    """A remote timestamp too far ahead of this node's physical clock."""


class Timestamp(NamedTuple):
    """One HLC timestamp; tuples compare like the clock (and like :meth:`text`)."""

    wall: int
    counter: int
    node: str

    def text(self) -> str:
        return f"{self.wall:0{WALL_DIGITS}d}:{self.counter:0{COUNTER_DIGITS}d}:{self.node}"

    @classmethod
    def parse(cls, text: str) -> Timestamp:
        m = _TEXT.match(text) if isinstance(text, str) else None
        if m is None:
            raise ClockError(f"not a hybrid-logical-clock timestamp: {str(text)[:80]!r} "
                             "(expected WWWWWWWWWWWWW:CCCCCC:NODE)")
        return cls(int(m.group(1)), int(m.group(2)), m.group(3))


def node_of(text: str) -> str:
    """The node part of a timestamp's text (no validation: the text came from a state
    that was checked when it arrived)."""
    return text.split(":", 2)[2]


def valid_node(node: str) -> bool:
    return re.fullmatch(NODE_PATTERN, node) is not None


class HybridClock:
    """The hybrid logical clock of node *node_id*; *now* gives physical time in seconds
    (a reactor's ``seconds``)."""

    def __init__(self, node_id: str, now: Callable[[], float]) -> None:
        if not valid_node(node_id):
            raise ClockError(f"not a usable node name: {node_id!r}")
        self.node_id = node_id
        self._now = now
        self._wall = 0
        self._counter = 0

    @property
    def last(self) -> Timestamp:
        """The greatest timestamp issued or observed so far."""
        return Timestamp(self._wall, self._counter, self.node_id)

    def _physical(self) -> int:
        return int(self._now() * 1000)

    def _set(self, wall: int, counter: int) -> str:
        if counter > MAX_COUNTER:
            # A million events within one millisecond of a clock that does not move:
            # refuse rather than produce a timestamp that would sort wrongly.
            raise ClockError("the hybrid logical clock's counter overflowed")
        self._wall, self._counter = wall, counter
        return Timestamp(wall, counter, self.node_id).text()

    def tick(self) -> str:
        """The timestamp of a local event (a write)."""
        pt = self._physical()
        if pt > self._wall:
            return self._set(pt, 0)
        return self._set(self._wall, self._counter + 1)

    def observe(self, remote: str, *, check_drift: bool = True) -> str:
        """Take in *remote* (a peer's timestamp) and return the timestamp of its receipt.

        Raises :class:`ClockError` for text that is not a timestamp, and
        :class:`ClockDriftError` when *remote* is more than :data:`MAX_DRIFT` seconds
        ahead of the physical clock (unless *check_drift* is false, as when reading back
        this node's own stored states at start); the clock is unchanged then.
        """
        r = Timestamp.parse(remote)
        pt = self._physical()
        if check_drift and r.wall - pt > MAX_DRIFT * 1000:
            raise ClockDriftError(
                f"a timestamp from {r.node} is {(r.wall - pt) / 1000:.1f} s ahead of this "
                f"gateway's clock (at most {MAX_DRIFT:.0f} s are accepted): check the clocks")
        wall = max(self._wall, r.wall, pt)
        if wall == self._wall == r.wall:
            counter = max(self._counter, r.counter) + 1
        elif wall == self._wall:
            counter = self._counter + 1
        elif wall == r.wall:
            counter = r.counter + 1
        else:
            counter = 0
        return self._set(wall, counter)
