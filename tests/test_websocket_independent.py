"""Interoperability over a real socket with an independent client, the ``websockets``
package, against a real gateway: the Authorization header on the upgrade, the binary
subprotocol ``aico.v1.proto`` and a close code. Every frame type, error and timeout is
tested in memory (``tests/test_websocket.py``, ``tests/test_ws_*.py``)."""

from __future__ import annotations

import json
from typing import Any

import websockets.sync.client as ws_client
from twisted.internet import threads
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase
from websockets.exceptions import ConnectionClosed

from aico.gateway.testing.harness import RunningGateway, http_client, login, start_gateway
from aico.proto import ApiRequest
from aico.proto.aico.gateway.v1.gateway_pb2 import Auth, Heartbeat, SocketFrame, Topic


class IndependentClientTests(TestCase):
    timeout = 60

    async def setUp(self) -> None:
        self.gw: RunningGateway = await start_gateway(self)
        self.tokens = await login(http_client(self), self.gw.base, "admin", self.gw.admin_password)
        self.url = self.gw.base.replace("http://", "ws://") + "/ws"

    def run_client(self, client: Any, check: Any) -> Any:
        return threads.deferToThread(client).addCallback(check)

    def test_user_cannot_subscribe_to_system_or_another_users_topics(self) -> Any:
        async def go() -> str:
            admin = http_client(self, token=self.tokens["access_token"])
            r = await admin.post(self.gw.base + "/api/v1/users",
                                 json={"username": "ursula", "password": "a-long-password-1", "roles": ["user"]})
            self.assertEqual(r.code, 201)
            await r.content()
            tokens = await login(http_client(self), self.gw.base, "ursula", "a-long-password-1")
            return str(tokens["access_token"])

        def client(token: str) -> list[Any]:
            with ws_client.connect(self.url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
                ws.recv(timeout=5)
                ws.recv(timeout=5)
                out = []
                for topic in ("system/", "user/someone-else/", "user/ursula/", "conversation/"):
                    ws.send(json.dumps({"type": "subscribe", "topic": topic}))
                    out.append(json.loads(ws.recv(timeout=5)))
                return out

        def check(out: list[Any]) -> None:
            self.assertEqual([f["type"] for f in out], ["error", "error", "subscribed", "subscribed"])
            self.assertEqual(out[0]["problem"]["code"], "forbidden")

        d = ensureDeferred(go())
        d.addCallback(lambda token: threads.deferToThread(client, token))
        return d.addCallback(check)

    def test_binary_protobuf_subprotocol(self) -> Any:
        token = self.tokens["access_token"]

        def client() -> list[SocketFrame]:
            out = []
            with ws_client.connect(self.url, subprotocols=["aico.v1.proto"]) as ws:  # type: ignore[list-item]
                assert ws.subprotocol == "aico.v1.proto"

                def ask(frame: SocketFrame) -> SocketFrame:
                    ws.send(frame.SerializeToString())
                    return SocketFrame.FromString(ws.recv(timeout=5))

                out.append(SocketFrame.FromString(ws.recv(timeout=5)))
                out.append(ask(SocketFrame(auth=Auth(token=token))))
                out.append(ask(SocketFrame(heartbeat=Heartbeat(id="p"))))
                out.append(ask(SocketFrame(request=ApiRequest(
                    request_id="r1", method="POST", path="/api/v1/conversations/messages",
                    body=b'{"message": "binary"}'))))
                out.append(ask(SocketFrame(subscribe=Topic(topic="conversation/", id="s"))))
                ws.send(b"\xff\x00 not protobuf")
                out.append(SocketFrame.FromString(ws.recv(timeout=5)))
            return out

        def check(out: list[SocketFrame]) -> None:
            kinds = [f.WhichOneof("frame") for f in out]
            self.assertEqual(kinds, ["welcome", "auth_success", "heartbeat_ack", "response", "subscribed", "error"])
            self.assertEqual(out[1].auth_success.subject, "admin")
            self.assertEqual((out[3].response.status, json.loads(out[3].response.body)["reply"]), (200, "binary"))
            self.assertEqual(json.loads(out[5].error.problem)["status"], 400)

        return self.run_client(client, check)

    def test_a_socket_is_closed_after_five_refused_tokens(self) -> Any:
        def client() -> tuple[list[str], int | None]:
            kinds = []
            with ws_client.connect(self.url) as ws:
                ws.recv(timeout=5)
                try:
                    for _ in range(6):
                        ws.send(json.dumps({"type": "auth", "token": "not.a.token"}))
                        kinds.append(json.loads(ws.recv(timeout=5))["type"])
                except ConnectionClosed as e:
                    return kinds, e.rcvd.code if e.rcvd else None
            return kinds, None

        def check(result: tuple[list[str], int | None]) -> None:
            self.assertEqual(result, (["error"] * 5, 1008))

        return self.run_client(client, check)
