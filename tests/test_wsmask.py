"""The small-frame WebSocket unmasker gives Autobahn's bytes (aico.gateway.adapters.wsmask)."""

from __future__ import annotations

import os
import random

from autobahn.websocket import protocol
from autobahn.websocket.xormasker import create_xor_masker as autobahn_masker
from twisted.trial.unittest import SynchronousTestCase

from aico.gateway.adapters import wsmask


class SmallFrameMaskerTests(SynchronousTestCase):
    def test_same_bytes_as_autobahns_masker_for_any_mask_length_and_chunking(self) -> None:
        rng = random.Random(12)
        for _ in range(400):
            mask = os.urandom(4)
            data = os.urandom(rng.randrange(0, wsmask.SMALL_FRAME + 1))
            ours, theirs = wsmask.SmallFrameMasker(mask), autobahn_masker(mask, len(data))
            at = 0
            while at < len(data):  # frames arrive in pieces: the mask position carries on
                step = rng.randrange(1, 97)
                chunk = data[at:at + step]
                self.assertEqual(ours.process(chunk), theirs.process(chunk))
                self.assertEqual(ours.pointer(), theirs.pointer())
                at += step
        self.assertEqual(wsmask.SmallFrameMasker(b"abcd").process(b""), b"")

    def test_install_is_idempotent_and_keeps_the_native_masker_for_large_frames(self) -> None:
        wsmask.install()
        wsmask.install()
        factory = protocol.create_xor_masker
        self.assertIsInstance(factory, wsmask._Factory)
        self.assertNotIsInstance(factory.native, wsmask._Factory)
        self.assertIsInstance(factory(b"abcd", 60), wsmask.SmallFrameMasker)
        self.assertNotIsInstance(factory(b"abcd", 70_000), wsmask.SmallFrameMasker)
        mask, data = os.urandom(4), os.urandom(70_000)
        self.assertEqual(factory(mask, len(data)).process(data),
                         autobahn_masker(mask, len(data)).process(data))
