"""aico.zmqreactor.send_frames / recv_frames are send_multipart / recv_multipart."""

from __future__ import annotations

import zmq
from twisted.trial.unittest import SynchronousTestCase

from aico.zmqreactor import recv_frames, send_frames


class FramesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ctx = zmq.Context()
        self.addCleanup(self.ctx.term)
        self.a = self.ctx.socket(zmq.PAIR)
        self.b = self.ctx.socket(zmq.PAIR)
        for s in (self.a, self.b):
            s.setsockopt(zmq.LINGER, 0)
            self.addCleanup(s.close)
        self.a.bind("inproc://frames")
        self.b.connect("inproc://frames")

    def test_multipart_messages_cross_whole_and_in_order_both_ways(self) -> None:
        messages = [[b"one"], [b"id", b"", b"payload" * 100], [b"", b""], [b"x"] * 7]
        for m in messages:
            send_frames(self.a, m)
        for m in messages:
            self.b.poll(1000)
            self.assertEqual(recv_frames(self.b), m)
        # And what our sender writes is what pyzmq's own reader reads, and back.
        send_frames(self.a, [b"p", b"q"])
        self.b.poll(1000)
        self.assertEqual(self.b.recv_multipart(), [b"p", b"q"])
        self.b.send_multipart([b"r", b"s", b"t"])
        self.a.poll(1000)
        self.assertEqual(recv_frames(self.a), [b"r", b"s", b"t"])

    def test_nothing_to_read_is_again_as_with_pyzmq(self) -> None:
        with self.assertRaises(zmq.Again):
            recv_frames(self.b)

    def test_a_full_queue_is_again_as_with_pyzmq(self) -> None:
        lonely = self.ctx.socket(zmq.PUSH)
        lonely.setsockopt(zmq.LINGER, 0)
        self.addCleanup(lonely.close)
        lonely.setsockopt(zmq.SNDHWM, 1)
        lonely.bind("inproc://nobody")  # no peer: a PUSH cannot queue anything
        with self.assertRaises(zmq.Again):
            send_frames(lonely, [b"a", b"b"])
