"""WholeFrames reads and writes exactly what Autobahn alone reads and writes.

Two Autobahn server protocols side by side, one with the mixin: the same byte streams
in (whole small frames, split frames, several frames in one read, control frames,
fragments, invalid frames, invalid UTF-8, oversized frames), the same messages out;
compared are the messages delivered, the bytes written, whether the socket was closed,
and Autobahn's traffic counters.
"""

from __future__ import annotations

import os
import random
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from aico.gateway.adapters.wsframes import WholeFrames

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1:1\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY
           + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")


class Plain(WebSocketServerProtocol):
    limit = 0

    def __init__(self) -> None:
        super().__init__()
        self.got: list[tuple[bytes, bool]] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.got.append((payload, isBinary))


class Fast(WholeFrames, Plain):
    #: Reads that went to Autobahn's own parser.
    slow = 0

    def frame_limit(self) -> int:
        return self.limit

    def _dataReceived(self, data: bytes) -> None:
        self.slow += 1
        super()._dataReceived(data)


def frame(payload: bytes, opcode: int = 1, fin: bool = True, masked: bool = True,
          rsv: int = 0, mask: bytes | None = None) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    if n <= 125:
        head += bytes([(0x80 if masked else 0) | n])
    elif n <= 0xFFFF:
        head += bytes([(0x80 if masked else 0) | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([(0x80 if masked else 0) | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    mask = mask or os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Transport(StringTransport):
    def unregisterProducer(self) -> None:  # Autobahn unregisters when it drops a socket
        self.producer = None


def opened(cls: type[Plain], limit: int = 0) -> tuple[Plain, StringTransport]:
    factory = WebSocketServerFactory("ws://127.0.0.1:1")
    p = cls()
    p.factory = factory
    p.limit = limit
    t = Transport()
    p.makeConnection(t)
    p.dataReceived(UPGRADE)
    assert p.state == p.STATE_OPEN
    t.clear()
    p.slow = 0  # type: ignore[attr-defined]  # the upgrade went to Autobahn
    return p, t


def stats(p: Plain) -> dict[str, Any]:
    return dict(p.trafficStats.__json__())


class WholeFramesTests(SynchronousTestCase):
    def same(self, reads: list[bytes], limit: int = 0) -> tuple[Plain, Plain]:
        plain, pt = opened(Plain, limit)
        fast, ft = opened(Fast, limit)
        for data in reads:
            for p in (plain, fast):
                if p.state != p.STATE_CLOSED:
                    p.dataReceived(data)
        self.assertEqual(fast.got, plain.got)
        self.assertEqual(ft.value(), pt.value())
        self.assertEqual((fast.state, ft.disconnecting), (plain.state, pt.disconnecting))
        self.assertEqual(stats(fast), stats(plain))
        return plain, fast

    def test_whole_small_messages_are_the_messages_autobahn_delivers(self) -> None:
        rng = random.Random(1)
        reads = []
        for _ in range(300):
            n = rng.randrange(0, 126)
            if rng.random() < 0.5:
                text = ""
                while len((text + "€").encode()) <= n:
                    text += rng.choice("aé€𝄞{}\"x ")
                reads.append(frame(text.encode(), 1))
            else:
                reads.append(frame(rng.randbytes(n), 2))
        reads += [frame(b"", 1), frame(b"", 2)]  # empty messages too
        _, fast = self.same(reads)
        self.assertEqual(len(fast.got), 302)
        self.assertEqual(fast.slow, 0)  # each one read by the mixin itself

    def test_every_other_shape_goes_to_autobahn_with_the_same_result(self) -> None:
        text = b'{"type":"request","id":1}'
        cases: list[list[bytes]] = [
            [frame(text)[:5], frame(text)[5:]],                 # split across reads
            [frame(text) + frame(b"second")],                   # two frames in one read
            [frame(b"x" * 126)],                                # 16-bit length
            [frame(b"part", fin=False), frame(b"rest", opcode=0)],  # fragmented
            [frame(b"ping", opcode=9)],                         # control frame
            [frame(text, masked=False)],                        # unmasked: protocol error
            [frame(text, rsv=1)],                               # RSV without extension
            [frame(b"\xff\xfe", 1)],                            # invalid UTF-8 text
            [frame(b"\xed\xa0\x80", 1)],                        # a surrogate in UTF-8
            [frame(text, opcode=3)],                            # reserved opcode
            [frame(text), frame(b"part", fin=False), frame(text)],  # data inside a fragment
        ]
        for reads in cases:
            _, fast = self.same(reads)
            self.assertGreater(fast.slow, 0, reads)

    def test_a_message_over_the_limit_is_left_to_the_protocol(self) -> None:
        _, fast = self.same([frame(b"y" * 50), frame(b"z" * 20)], limit=30)
        self.assertEqual([m for m, _ in fast.got], [b"y" * 50, b"z" * 20])
        self.assertEqual(fast.slow, 1)  # the 50-byte one

    def test_sent_messages_are_the_bytes_send_message_writes(self) -> None:
        rng = random.Random(2)
        plain, pt = opened(Plain)
        fast, ft = opened(Fast)
        for n in [0, 1, 125, 126, 127, 1000, 65535, 65536, 70000] + [rng.randrange(0, 300) for _ in range(50)]:
            payload = rng.randbytes(n)
            binary = rng.random() < 0.5
            plain.sendMessage(payload, isBinary=binary)
            fast.send_whole(payload, binary)
        self.assertEqual(ft.value(), pt.value())
        self.assertEqual(stats(fast), stats(plain))

    def test_a_closed_socket_refuses_to_send_as_autobahn_does(self) -> None:
        fast, _ = opened(Fast)
        fast.dataReceived(frame(b"\x03\xe8", opcode=8))  # close
        with self.assertRaises(Exception) as raised:
            fast.send_whole(b"late", False)
        plain, _ = opened(Plain)
        plain.dataReceived(frame(b"\x03\xe8", opcode=8))
        with self.assertRaises(type(raised.exception)):
            plain.sendMessage(b"late")
