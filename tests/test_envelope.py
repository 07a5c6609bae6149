"""``wrap``: the envelope every message travels in, built by hand for speed (issue 12)."""

from __future__ import annotations

import time

from google.protobuf.any_pb2 import Any as AnyMessage
from twisted.trial.unittest import SynchronousTestCase

from aico.proto import AicoMessage, ApiRequest, ApiResponse, unpack, wrap


class WrapTests(SynchronousTestCase):
    def test_the_payload_is_packed_exactly_as_any_pack_packs_it(self) -> None:
        for payload in (ApiResponse(status=201, body=b'{"a": 1}', headers={"x": "y"}),
                        ApiRequest(method="POST", path="/api/v1/x", body=b"\x00\xff"),
                        ApiResponse()):
            reference = AnyMessage()
            reference.Pack(payload)
            packed = wrap(payload, "test").any_payload
            self.assertEqual(packed.SerializeToString(), reference.SerializeToString())
            self.assertEqual(unpack(wrap(payload, "test"), type(payload)), payload)

    def test_metadata_names_source_type_version_attributes_and_the_current_time(self) -> None:
        before = time.time()
        msg = wrap(ApiResponse(status=200), "gateway", {"correlation_id": "c1"})
        after = time.time()
        meta = msg.metadata
        self.assertEqual((meta.source, meta.message_type, meta.version),
                         ("gateway", "aico.gateway.v1.ApiResponse", "1"))
        self.assertEqual(dict(meta.attributes), {"correlation_id": "c1"})
        self.assertEqual(len(meta.message_id), 32)
        stamp = meta.timestamp.seconds + meta.timestamp.nanos / 1e9
        self.assertTrue(before - 1e-6 <= stamp <= after + 1e-6, (before, stamp, after))
        self.assertTrue(0 <= meta.timestamp.nanos < 1_000_000_000)

    def test_each_envelope_gets_its_own_message_id_unless_one_is_given(self) -> None:
        ids = {wrap(ApiResponse(), "g").metadata.message_id for _ in range(100)}
        self.assertEqual(len(ids), 100)
        self.assertEqual(wrap(ApiResponse(), "g", message_id="m1").metadata.message_id, "m1")
        self.assertIsInstance(AicoMessage.FromString(wrap(ApiResponse(), "g").SerializeToString()),
                              AicoMessage)
