"""One pyzmq socket driven by a Twisted reactor, through its edge-triggered ``ZMQ_FD``.

Shared by the bus client (:mod:`aico.bus.client`) and the IPC client
(:mod:`aico.client.transports`); it knows nothing of either. ``ZMQ_FD`` signals an
*edge*: after it fires, every queued message must be read until ``EAGAIN``, and anything
that touches the socket (a send, a ``setsockopt``) may consume the edge, so callers
:meth:`SocketReader.kick` after such calls to drain on the next reactor turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import zmq
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

#: Messages read per reactor turn before yielding to other work. Small enough that a busy
#: socket (the bus under a flood, one IPC peer pipelining thousands of requests) cannot
#: hold the reactor for long: each message read may start a whole request, so 512 made a
#: turn of ~250 ms under load and another client's request waited several such turns
#: (``python -m aico.bench.fairness``, docs/performance.md).
READ_BUDGET = 64


#: pyzmq's own (Cython) send and receive, below ``zmq.Socket``'s Python layer: its
#: ``send_multipart`` and ``recv_multipart`` build flag enums and check every frame in
#: Python (7.0 vs 2.3 µs to send three small frames, 10.2 vs 6.9 µs to receive them,
#: timeit). The same calls with the same flags, the same errors (``zmq.Again`` when a
#: non-blocking send or receive cannot proceed).
_SEND = zmq.backend.Socket.send
_RECV = zmq.backend.Socket.recv
_GET = zmq.backend.Socket.get
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)


def send_frames(sock: zmq.Socket[bytes], frames: Sequence[bytes]) -> None:
    """``sock.send_multipart(frames, zmq.NOBLOCK)`` for frames of bytes."""
    if not isinstance(sock, zmq.backend.Socket):  # a stand-in (tests): its own method
        sock.send_multipart(frames, zmq.NOBLOCK)
        return
    last = len(frames) - 1
    for i in range(last):
        _SEND(sock, frames[i], _MORE)
    _SEND(sock, frames[last], _LAST)


def recv_frames(sock: zmq.Socket[bytes]) -> list[bytes]:
    """``sock.recv_multipart(zmq.NOBLOCK)``."""
    if not isinstance(sock, zmq.backend.Socket):  # a stand-in (tests): its own method
        return sock.recv_multipart(zmq.NOBLOCK)
    parts: list[bytes] = [_RECV(sock, _LAST)]
    while _GET(sock, _RCVMORE):
        parts.append(_RECV(sock, _LAST))
    return parts


@implementer(IReadDescriptor)
class SocketReader:
    """Reads *sock* whenever it has messages and hands each to *receive*."""

    def __init__(self, reactor: Any, sock: zmq.Socket[bytes],
                 receive: Callable[[list[bytes]], None], name: str,
                 budget: int = READ_BUDGET) -> None:
        self._reactor = reactor
        self._sock = sock
        self._receive = receive
        self._name = name
        self._budget = budget
        self._fd = int(sock.getsockopt(zmq.FD))
        self._drain_call: IDelayedCall | None = None
        self.closed = False
        reactor.addReader(self)
        self.kick()

    # IReadDescriptor
    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return self._name

    def doRead(self) -> None:
        self._drain()

    def connectionLost(self, reason: Failure) -> None:
        pass

    def kick(self) -> None:
        """Drain on the next reactor turn (after a call that may have eaten the edge)."""
        if self._drain_call is None and not self.closed:
            self._drain_call = self._reactor.callLater(0, self._drain)

    def _drain(self) -> None:
        if self._drain_call is not None:
            if self._drain_call.active():
                self._drain_call.cancel()
            self._drain_call = None
        sock = self._sock
        for _ in range(self._budget):
            if self.closed:
                return
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                return
            self._receive(frames)
        # More may be waiting: the edge will not fire again, so come back next turn.
        self.kick()

    def close(self) -> None:
        """Stop reading (the socket itself is the caller's to close)."""
        if self.closed:
            return
        self.closed = True
        self._reactor.removeReader(self)
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
