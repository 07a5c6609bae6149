"""ZeroMQ IPC and ``aico.client`` against a real gateway (``start_gateway``): what needs
real sockets, a real broker and a real stop. The WebSocket tests that ran here are in
memory now (``tests/test_ws_gateway.py``); one Autobahn smoke test over a real socket is
``tests/test_ws_real.py``."""

from __future__ import annotations

import json
import uuid
from typing import Any

import zmq
import zmq.auth
from twisted.internet import reactor, threads
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from aico.client.connect import connect
from aico.gateway.testing.harness import RunningGateway, http_client, login, start_gateway
from aico.gateway.testing.waiting import eventually, sleep
from aico.proto import AicoMessage, ApiEvent, ApiRequest, ApiResponse, unpack, wrap


class IpcGatewayTests(TestCase):
    timeout = 60

    async def setUp(self) -> None:
        self.gw: RunningGateway = await start_gateway(self)
        self.http = http_client(self)
        self.tokens = await login(self.http, self.gw.base, "admin", self.gw.admin_password)

    def _dealer(self, endpoint: str, server_key: bytes | None, rcvhwm: int = 1000) -> zmq.Socket[bytes]:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.rcvhwm = rcvhwm  # before connect: it applies to new connections only
        public, secret = zmq.curve_keypair()
        if server_key is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_key
        sock.connect(endpoint)
        self.addCleanup(sock.close)
        return sock

    def test_ipc_dealer_over_ipc_and_tcp_fallback_with_curve(self) -> Any:
        token = self.tokens["access_token"]
        server_key, _ = zmq.auth.load_certificate(self.gw.state_dir / "curve" / "gateway.key")
        ipc = self.gw.ports["ipc"]

        def ask(endpoint: str, key: bytes | None, wait_ms: int = 5000) -> ApiResponse | None:
            sock = self._dealer(endpoint, key)
            request = ApiRequest(method="POST", path="/api/v1/conversations/messages",
                                 headers={"authorization": f"Bearer {token}"},
                                 body=b'{"message": "over ipc"}')
            sock.send(wrap(request, "test", {"correlation_id": uuid.uuid4().hex}).SerializeToString())
            if not sock.poll(wait_ms):
                return None
            return unpack(AicoMessage.FromString(sock.recv()), ApiResponse)

        def run() -> list[ApiResponse | None]:
            wrong, _ = zmq.curve_keypair()
            return [ask(ipc["endpoint"], server_key), ask(ipc["fallback"], server_key),
                    ask(ipc["fallback"], wrong, 500)]  # a wrong key: silence (answers take ms)

        def check(results: list[ApiResponse | None]) -> None:
            over_ipc, over_tcp, wrong_key = results
            for r in (over_ipc, over_tcp):
                assert r is not None
                self.assertEqual((r.status, json.loads(r.body)["reply"]), (200, "over ipc"))
            self.assertIsNone(wrong_key)

        return threads.deferToThread(run).addCallback(check)

    async def test_client_library_prefers_ipc_and_falls_back_to_websocket(self) -> None:
        token = self.tokens["access_token"]
        client = await connect(reactor, self.gw.state_dir, token=token)
        self.addCleanup(client.close)
        self.assertEqual(client.transport_name, "ipc")
        response = await client.request("GET", "/api/v1/users/me")
        self.assertEqual((response.status, response.json()["username"]), (200, "admin"))
        ws_only = await connect(reactor, self.gw.state_dir, token=token, order=("websocket",))
        self.addCleanup(ws_only.close)
        self.assertEqual(ws_only.transport_name, "websocket")
        response = await ws_only.request("POST", "/api/v1/conversations/messages", {"message": "x"})
        self.assertEqual((response.status, response.json()["reply"]), (200, "x"))

    async def test_transport_negotiation_lists_this_gateways_endpoints(self) -> None:
        r = await self.http.get(self.gw.base + "/api/v1/transport")
        body = json.loads(await r.content())
        self.assertEqual(r.code, 200)
        text = json.dumps(body)
        self.assertIn(self.gw.ports["ipc"]["endpoint"], text)
        self.assertIn(self.gw.ports["ipc"]["fallback"], text)
        self.assertIn("/ws", text)

    def test_no_token_in_logs_over_ipc(self) -> Any:
        """Tokens sent over IPC are never logged (over WebSocket: ``tests/test_ws_gateway.py``)."""
        from twisted.logger import formatEvent, globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        token = self.tokens["access_token"]
        server_key, _ = zmq.auth.load_certificate(self.gw.state_dir / "curve" / "gateway.key")

        def talk() -> None:
            sock = self._dealer(self.gw.ports["ipc"]["fallback"], server_key)
            for n, bearer in enumerate((token, token + "x")):  # a refused one too
                sock.send(wrap(ApiRequest(method="GET", path="/api/v1/users/me",
                                          headers={"authorization": f"Bearer {bearer}"}), "t",
                               {"correlation_id": f"c{n}"}).SerializeToString())
                assert sock.poll(3000)
                sock.recv()

        def check(_: object) -> None:
            self.assertTrue(events)
            text = "\n".join(formatEvent(e) + " " + repr(e) for e in events)
            for part in [token, *token.split(".")]:
                self.assertNotIn(part, text)

        return threads.deferToThread(talk).addCallback(check)

    def test_hostile_input_over_ipc_is_a_clear_4xx(self) -> Any:
        token = self.tokens["access_token"]
        server_key, _ = zmq.auth.load_certificate(self.gw.state_dir / "curve" / "gateway.key")
        deep = "[" * 100_000 + "]" * 100_000

        def talk() -> dict[str, Any]:
            out: dict[str, Any] = {}
            sock = self._dealer(self.gw.ports["ipc"]["fallback"], server_key)
            for name, body in [("ipc_deep", deep.encode()),
                               ("ipc_big", b'{"message": "' + b"x" * (2 * 1024 * 1024) + b'"}')]:
                sock.send(wrap(ApiRequest(method="POST", path="/api/v1/conversations/messages",
                                          headers={"authorization": f"Bearer {token}"}, body=body),
                               "t", {"correlation_id": name}).SerializeToString())
                assert sock.poll(5000), name
                out[name] = unpack(AicoMessage.FromString(sock.recv()), ApiResponse)
            return out

        def check(out: dict[str, Any]) -> None:
            self.assertEqual((out["ipc_deep"].status, json.loads(out["ipc_deep"].body)["code"]), (400, "validation_failed"))
            self.assertEqual((out["ipc_big"].status, json.loads(out["ipc_big"].body)["code"]), (413, "payload_too_large"))

        return threads.deferToThread(talk).addCallback(check)

    def test_ipc_slow_consumer_loses_its_subscriptions_while_a_fast_one_keeps_receiving(self) -> Any:
        token = self.tokens["access_token"]
        server_key, _ = zmq.auth.load_certificate(self.gw.state_dir / "curve" / "gateway.key")
        endpoint = self.gw.ports["ipc"]["fallback"]
        events = 15_000  # more than the ROUTER's 10,000-message queue per peer
        state: dict[str, Any] = {}

        def subscribe(name: str) -> zmq.Socket[bytes]:
            # The slow one never reads, so the gateway's queue for it fills.
            sock = self._dealer(endpoint, server_key, rcvhwm=10 if name == "slow" else 1000)
            sock.send(wrap(ApiRequest(method="SUBSCRIBE", path="conversation/",
                                      headers={"authorization": f"Bearer {token}"}), "t",
                           {"correlation_id": name}).SerializeToString())
            assert sock.poll(5000)
            reply = unpack(AicoMessage.FromString(sock.recv()), ApiResponse)
            assert reply.status == 200, reply
            return sock

        def setup() -> None:
            state["slow"] = subscribe("slow")
            state["fast"] = subscribe("fast")

        def read_fast() -> int:
            fast = state["fast"]
            got = 0
            while got < events and fast.poll(3000):
                message = AicoMessage.FromString(fast.recv())
                if message.any_payload.TypeName() == "aico.gateway.v1.ApiEvent":
                    got += 1
            return got

        async def go() -> None:
            await threads.deferToThread(setup)
            bus = self.gw.parts.bus
            assert bus is not None
            await bus.wait_subscribed(["conversation/"], timeout=5.0)
            reader = threads.deferToThread(read_fast)
            body = b'{"pad": "' + b"x" * 256 + b'"}'
            for i in range(events):
                bus.publish("conversation/load", wrap(ApiEvent(topic="conversation/load", body=body), "t"))
                if i % 500 == 499:
                    await sleep(0.01)  # let the ROUTER send
            got = await reader
            listener = self.gw.parts.ipc  # type: ignore[union-attr]
            self.assertGreaterEqual(listener.slow_consumers, 1)
            self.assertEqual(got, events)
            # the slow peer holds no subscription any more
            subscribers = self.gw.parts.connections.snapshot()  # type: ignore[union-attr]
            self.assertEqual(sum(1 for c in subscribers if c.get("subscriptions")), 1, subscribers)

        return ensureDeferred(go())

    def test_stopping_waits_for_an_ipc_request_in_flight(self) -> Any:
        from aico.proto.aico.gateway.v1.gateway_pb2 import Route
        from tests.rawmodule import RawModule

        token = self.tokens["access_token"]
        server_key, _ = zmq.auth.load_certificate(self.gw.state_dir / "curve" / "gateway.key")
        module = RawModule(self.gw.state_dir, self.gw.bus_pub, self.gw.bus_sub,
                           routes=[Route(method="GET", path="/api/v1/slow", topic="slow", public=True)])
        module.authorize(self.gw.state_dir)
        module.start()
        self.addCleanup(module.stop)

        async def served() -> bool:
            r = await self.http.get(self.gw.base + "/api/v1/slow")
            await r.content()
            return bool(r.code == 200)

        async def go() -> None:
            await eventually(served, interval=0.05)
            module.mode = "hold"
            sock = self._dealer(self.gw.ports["ipc"]["fallback"], server_key)
            sock.send(wrap(ApiRequest(method="GET", path="/api/v1/slow",
                                      headers={"authorization": f"Bearer {token}"}), "t",
                           {"correlation_id": "slow"}).SerializeToString())
            held = await threads.deferToThread(module.events.get, True, 5)
            while held != "held":
                held = await threads.deferToThread(module.events.get, True, 5)
            stopping = self.gw.service.stopService()
            await sleep(0.3)  # long enough to have stopped, had it not waited
            self.assertFalse(stopping.called, "the gateway stopped with an IPC request in flight")
            module.release.put(None)
            got = await threads.deferToThread(sock.poll, 5000)
            self.assertTrue(got)
            reply = unpack(AicoMessage.FromString(sock.recv()), ApiResponse)
            self.assertEqual(reply.status, 200)
            await stopping

        return ensureDeferred(go())
