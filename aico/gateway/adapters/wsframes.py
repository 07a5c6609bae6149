"""Small whole WebSocket messages without Autobahn's general frame machinery.

Nearly every frame a gateway client sends is one small masked text (or binary) message
arriving whole in one read, and nearly every answer is one small frame. Autobahn treats
each through its general parser — frame header object, masker, nine hooks from
``onFrameBegin`` to ``onMessageEnd``, incremental UTF-8 validation — ~26 µs per
received frame and ~7.5 µs per sent one (timeit). :class:`WholeFrames`, mixed into an
Autobahn server protocol, handles exactly that common case itself and leaves everything
else to Autobahn untouched:

* **in**: a read that is exactly one final, unfragmented, masked text or binary frame of
  at most 125 payload bytes, with RSV bits clear, nothing buffered before it, no message
  or frame under way, the socket open and not failed, no compression, no frame logging
  or timing, UTF-8 valid if text, and within :meth:`WholeFrames.frame_limit`. The message
  goes to ``_onMessage`` as Autobahn would give it, with Autobahn's traffic counters
  moved as its own path moves them. Anything else (including an invalid frame) returns
  to Autobahn before anything changed, so Autobahn decides, closes and logs as always.
* **out**: :meth:`WholeFrames.send_whole` writes a message up to 64 KiB as one unmasked
  final frame — the bytes ``sendMessage`` writes — when no compression, fragmentation,
  size limit, frame logging or timing applies; otherwise it calls ``sendMessage``.

``tests/test_wsframes.py`` runs the same byte streams through this and through Autobahn
alone and compares messages, closes, written bytes and counters.
"""

from __future__ import annotations

from typing import Any

from aico.gateway.adapters.wsmask import unmask

__all__ = ["WholeFrames"]

#: A final text (0x81) or binary (0x82) frame header byte with RSV bits clear.
_TEXT, _BINARY = 0x81, 0x82


class WholeFrames:
    """Mixin for an Autobahn ``WebSocketServerProtocol`` subclass (see the module)."""

    # Autobahn's attributes (declared for the type checker).
    state: int
    STATE_OPEN: int
    data: bytes
    current_frame: Any
    inside_message: bool
    failedByMe: bool
    trafficStats: Any
    _perMessageCompress: Any

    def frame_limit(self) -> int:
        """The largest message this socket takes (0: no limit of ours)."""
        return 0

    def dataReceived(self, data: bytes) -> None:
        if not self._whole_message(data):
            self._dataReceived(data)  # type: ignore[attr-defined]

    def _whole_message(self, data: bytes) -> bool:
        n = len(data)
        if n < 6 or n > 131:
            return False
        b0 = data[0]
        length = n - 6
        # Final text/binary frame, RSV clear; masked, the 7-bit length is all the rest.
        if (b0 != _TEXT and b0 != _BINARY) or data[1] != 0x80 | length:
            return False
        p: Any = self
        if (self.state != self.STATE_OPEN or self.data or self.current_frame is not None
                or self.inside_message or self.failedByMe
                or self._perMessageCompress is not None or p.logOctets or p.logFrames
                or p.trackedTimings or 0 < p.maxMessagePayloadSize < length
                or 0 < p.maxFramePayloadSize < length or 0 < self.frame_limit() < length):
            return False
        payload = unmask(data[2:6], data[6:])
        binary = b0 == _BINARY
        if not binary and p.utf8validateIncoming:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return False  # Autobahn fails the connection with 1007, as always
        stats = self.trafficStats
        stats.incomingOctetsWireLevel += n
        stats.incomingOctetsWebSocketLevel += length
        stats.incomingOctetsAppLevel += length
        stats.incomingWebSocketFrames += 1
        stats.incomingWebSocketMessages += 1
        if p.autoPingTimeoutCall and p.autoPingRestartOnAnyTraffic:
            p._cancelAutoPingTimeoutCall()
        p.message_is_binary = binary
        p.message_data_total_length = length
        p._onMessage(payload, binary)
        return True

    def send_whole(self, payload: bytes, binary: bool) -> None:
        """``sendMessage(payload, isBinary=binary)``, written directly when it can be."""
        p: Any = self
        n = len(payload)
        if (n > 0xFFFF or self.state != self.STATE_OPEN
                or self._perMessageCompress is not None or p.trackedTimings or p.logFrames
                or p.autoFragmentSize > 0 or 0 < p.maxMessagePayloadSize < n
                or p.maskServerFrames):
            p.sendMessage(payload, isBinary=binary)
            return
        stats = self.trafficStats
        stats.outgoingWebSocketMessages += 1
        stats.outgoingOctetsAppLevel += n
        stats.outgoingOctetsWebSocketLevel += n
        stats.outgoingWebSocketFrames += 1
        op = _BINARY if binary else _TEXT
        if n <= 125:
            header = bytes((op, n))
        else:
            header = bytes((op, 126, n >> 8, n & 0xFF))
        p.sendData(header + payload)
