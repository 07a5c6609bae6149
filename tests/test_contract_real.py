"""The client contract over real sockets (issue 9, points 12 to 14): a real gateway
(``start_gateway``: real bus and broker, the built-in modules), a plain pyzmq DEALER with
CurveZMQ on the IPC TCP fallback, REST with treq. The in-memory tests are
``tests/test_client_contract.py`` and ``tests/test_conversation_events.py``.
"""

from __future__ import annotations

import json

import zmq.auth
from twisted.trial.unittest import TestCase

from aico.gateway.testing.harness import RunningGateway, http_client, login, start_gateway
from aico.proto import AicoMessage, ApiEvent, ApiRequest, ApiResponse, unpack, wrap
from tests.test_ipc import Dealer


class ContractRealTests(TestCase):
    timeout = 60

    async def setUp(self) -> None:
        self.gw: RunningGateway = await start_gateway(self)
        self.http = http_client(self)
        self.token = (await login(self.http, self.gw.base, "admin",
                                  self.gw.admin_password))["access_token"]
        server_key, _ = zmq.auth.load_certificate(self.gw.state_dir / "curve" / "gateway.key")
        self.dealer = Dealer(self, self.gw.ports["ipc"]["fallback"], server_key)

    async def test_a_reply_reaches_an_ipc_subscriber_as_an_event_on_the_users_topic(self) -> None:
        d = self.dealer
        d.send_request("SUBSCRIBE", "user/admin/conversation/", token=self.token)
        _, response = await d.recv()
        self.assertEqual(response.status, 200, response.body)
        bus = self.gw.parts.bus
        assert bus is not None
        # The gateway holds one bus prefix per first topic segment (here ``user/``).
        await bus.wait_subscribed(sorted(self.gw.parts.connections.bus_prefixes), timeout=5.0)
        r = await self.http.post(self.gw.base + "/api/v1/conversations/messages",
                                 json={"message": "seen from outside"},
                                 headers={"Authorization": f"Bearer {self.token}"})
        reply = json.loads(await r.content())
        self.assertEqual(r.code, 200, reply)
        message = await d.recv_message()
        self.assertEqual(message.any_payload.type_url,
                         "type.googleapis.com/aico.gateway.v1.ApiEvent")
        event = unpack(message, ApiEvent)
        self.assertEqual(event.topic, "user/admin/conversation/output/v1")
        self.assertEqual(json.loads(event.body), reply)

    async def test_a_bare_type_url_is_served_and_a_wrong_one_answered_with_its_correlation_id(
            self) -> None:
        d = self.dealer
        for cid, type_url in (("bare", "aico.gateway.v1.ApiRequest"),
                              ("wrong", "aico.gateway.v1.Request")):
            message = wrap(ApiRequest(method="GET", path="/api/v1/users/me",
                                      headers={"authorization": f"Bearer {self.token}"}),
                           source="test", attributes={"correlation_id": cid})
            message.any_payload.type_url = type_url
            d.sock.send(message.SerializeToString())
        got: dict[str, ApiResponse] = {}
        for _ in range(2):
            message: AicoMessage = await d.recv_message()
            got[message.metadata.attributes["correlation_id"]] = unpack(message, ApiResponse)
        self.assertEqual(got["bare"].status, 200)
        self.assertEqual(got["wrong"].status, 400)
        detail = json.loads(got["wrong"].body)["detail"]
        self.assertIn("'type.googleapis.com/aico.gateway.v1.ApiRequest'", detail)
        self.assertTrue(all(n == n.lower() for n in got["bare"].headers), got["bare"].headers)
