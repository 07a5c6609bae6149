"""Events a client author can see (issue 9, point 14): the built-in conversation module
publishes each reply as an ``ApiEvent`` on ``user/<subject>/conversation/output/v1``,
which the user who sent the message may subscribe to. In memory here; over real sockets
(real bus, real IPC subscriber) in ``tests/test_contract_real.py``.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from aico.bus.builtin.conversation import output_topic
from aico.gateway.testing.memory import MemoryGateway
from aico.proto import ApiRequest
from aico.proto.aico.gateway.v1.gateway_pb2 import SocketFrame

PASSWORD = "a-long-password-1"


class ConversationEventTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = MemoryGateway(test=self)
        for name in ("alice", "bob"):
            self.gw.add_user(name, PASSWORD, ("user",))
        self.alice = self.gw.token("alice", PASSWORD)
        self.bob = self.gw.token("bob", PASSWORD)

    def subscribed(self, token: str, topic: str) -> Any:
        ws = self.gw.websocket(headers={"Authorization": f"Bearer {token}"})
        ws.recv_all()  # welcome, auth_success
        ws.send({"type": "subscribe", "topic": topic, "id": "s"})
        self.assertEqual(ws.recv(), {"type": "subscribed", "topic": topic, "id": "s"})
        return ws

    def test_the_output_topic_is_the_users_own(self) -> None:
        self.assertEqual(output_topic("alice"), "user/alice/conversation/output/v1")
        self.assertIsNone(output_topic(""))
        self.assertIsNone(output_topic("a/b"))

    def test_a_posted_message_arrives_as_an_event_on_the_senders_topic(self) -> None:
        ws = self.subscribed(self.alice, "user/alice/")
        r = self.gw.post("/api/v1/conversations/messages", {"message": "hello there"},
                         token=self.alice)
        self.assertEqual(r.code, 200)
        [event] = ws.recv_all()
        self.assertEqual(event, {"type": "event", "topic": "user/alice/conversation/output/v1",
                                 "body": r.json()})
        self.assertEqual(event["body"]["reply"], "hello there")

    def test_a_streamed_reply_is_published_once_whole(self) -> None:
        ws = self.subscribed(self.alice, "user/alice/conversation/")
        ws.send({"type": "request", "id": 1, "method": "POST",
                 "path": "/api/v1/conversations/messages", "query": {"stream": "true"},
                 "body": {"message": "one two three", "conversation_id": "c-1"}})
        for _ in range(10):
            self.gw.advance(0.01)  # the module streams a word every 5 ms of its clock
        frames = ws.recv_all()
        events = [f for f in frames if f["type"] == "event"]
        self.assertEqual([f["type"] for f in frames if f["type"] != "event"],
                         ["chunk"] * 4 + ["response"])
        [event] = events
        self.assertEqual(event["topic"], "user/alice/conversation/output/v1")
        self.assertEqual((event["body"]["conversation_id"], event["body"]["reply"]),
                         ("c-1", "one two three"))

    def test_another_users_subscriber_sees_nothing_and_may_not_subscribe(self) -> None:
        ws_bob = self.subscribed(self.bob, "user/bob/")
        ws_bob.send({"type": "subscribe", "topic": "user/alice/", "id": "x"})
        self.assertEqual(ws_bob.recv()["problem"]["code"], "forbidden")
        self.gw.post("/api/v1/conversations/messages", {"message": "private"}, token=self.alice)
        self.assertEqual(ws_bob.recv_all(), [])

    def test_a_proto_subscriber_gets_the_event_too(self) -> None:
        ws = self.gw.websocket(headers={"Authorization": f"Bearer {self.alice}"},
                               protocols=["aico.v1.proto"])
        ws.recv_raw(), ws.recv_raw()
        ws.send(SocketFrame(subscribe={"topic": "user/alice/", "id": "s"}).SerializeToString())
        self.assertEqual(SocketFrame.FromString(ws.recv_raw()[0]).WhichOneof("frame"), "subscribed")
        ws.send(SocketFrame(request=ApiRequest(
            request_id="1", method="POST", path="/api/v1/conversations/messages",
            body=b'{"message":"hi"}')).SerializeToString())
        frames = [SocketFrame.FromString(ws.recv_raw()[0]) for _ in range(2)]
        kinds = sorted(f.WhichOneof("frame") or "" for f in frames)
        self.assertEqual(kinds, ["event", "response"])
        [event] = [f.event for f in frames if f.WhichOneof("frame") == "event"]
        self.assertEqual(event.topic, "user/alice/conversation/output/v1")
        self.assertEqual(json.loads(event.body)["reply"], "hi")
