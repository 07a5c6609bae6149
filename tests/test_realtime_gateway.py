"""WebSocket, ZeroMQ IPC and ``aico.client`` against the real gateway (``build_service``):
the same route table and security chain as REST, on real sockets."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import websockets.sync.client as ws_client
import zmq
import zmq.auth
from twisted.internet import reactor, threads
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from aico.client.connect import connect
from aico.gateway.testing.harness import RunningGateway, http_client, login, start_gateway
from aico.proto import AicoMessage, ApiEvent, ApiRequest, ApiResponse, unpack, wrap


class RealtimeGatewayTests(TestCase):
    timeout = 60

    async def setUp(self) -> None:
        self.gw: RunningGateway = await start_gateway(self)
        self.http = http_client(self)
        self.tokens = await login(self.http, self.gw.base, "admin", self.gw.admin_password)

    @property
    def ws_url(self) -> str:
        return self.gw.base.replace("http://", "ws://") + "/ws"

    def test_websocket_goes_through_the_same_chain_as_rest(self) -> Any:
        token = self.tokens["access_token"]

        def client() -> list[dict[str, Any]]:
            out = []
            with ws_client.connect(self.ws_url) as ws:
                out.append(json.loads(ws.recv(timeout=5)))  # welcome
                ws.send(json.dumps({"type": "request", "id": 1, "method": "GET", "path": "/api/v1/users/me"}))
                out.append(json.loads(ws.recv(timeout=5)))  # 401 before auth
                ws.send(json.dumps({"type": "auth", "token": token}))
                out.append(json.loads(ws.recv(timeout=5)))
                ws.send(json.dumps({"type": "request", "id": "c", "method": "POST",
                                    "path": "/api/v1/conversations/messages", "body": {"message": "over ws"}}))
                out.append(json.loads(ws.recv(timeout=5)))
                ws.send(json.dumps({"type": "request", "id": "v", "method": "POST",
                                    "path": "/api/v1/conversations/messages", "body": {"nope": 1}}))
                out.append(json.loads(ws.recv(timeout=5)))
            return out

        def check(frames: list[dict[str, Any]]) -> None:
            welcome, anon, auth, ok, invalid = frames
            self.assertEqual(welcome["type"], "welcome")
            self.assertEqual((anon["type"], anon["status"], anon["body"]["code"]), ("response", 401, "unauthenticated"))
            self.assertEqual((auth["type"], auth["subject"]), ("auth_success", "admin"))
            self.assertEqual((ok["id"], ok["status"], ok["body"]["reply"]), ("c", 200, "over ws"))
            self.assertEqual((invalid["status"], invalid["body"]["code"]), (400, "validation_failed"))

        return threads.deferToThread(client).addCallback(check)

    async def test_websocket_subscriber_receives_module_events_and_is_told_of_logout(self) -> None:
        tokens = await login(self.http, self.gw.base, "admin", self.gw.admin_password)
        frames: list[dict[str, Any]] = []
        subscribed = threading.Event()
        go_on = threading.Event()

        def client() -> None:
            with ws_client.connect(self.ws_url, additional_headers={
                    "Authorization": f"Bearer {tokens['access_token']}"}) as ws:
                ws.recv(timeout=5)  # welcome
                frames.append(json.loads(ws.recv(timeout=5)))  # auth_success from the upgrade header
                ws.send(json.dumps({"type": "subscribe", "topic": "conversation/"}))
                frames.append(json.loads(ws.recv(timeout=5)))
                subscribed.set()
                frames.append(json.loads(ws.recv(timeout=5)))  # the event
                go_on.wait(10)
                frames.append(json.loads(ws.recv(timeout=5)))  # auth_revoked
                ws.send(json.dumps({"type": "request", "id": 9, "method": "GET", "path": "/api/v1/users/me"}))
                frames.append(json.loads(ws.recv(timeout=5)))

        done = threads.deferToThread(client)
        for _ in range(250):
            if subscribed.is_set():
                break
            await deferLater(reactor, 0.02, lambda: None)
        bus = self.gw.parts.bus
        assert bus is not None
        # The gateway's own PUB socket publishes the event: wait until it has learnt of
        # the subscription the socket caused (ZeroMQ's slow joiner).
        await bus.wait_subscribed(["conversation/"], timeout=5.0)
        bus.publish("conversation/events/v1",
                    wrap(ApiEvent(topic="conversation/events/v1", body=b'{"typing": true}'), "test"))
        for _ in range(250):
            if len(frames) >= 3:
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(len(frames), 3, frames)
        r = await self.http.post(self.gw.base + "/api/v1/users/logout", json={},
                                 headers={"Authorization": f"Bearer {tokens['access_token']}"})
        self.assertEqual(r.code, 204)
        go_on.set()
        await done
        auth, sub, event, revoked, after = frames
        self.assertEqual((auth["type"], auth["subject"]), ("auth_success", "admin"))
        self.assertEqual(sub["type"], "subscribed")
        self.assertEqual((event["type"], event["topic"], event["body"]), ("event", "conversation/events/v1", {"typing": True}))
        self.assertEqual(revoked["type"], "auth_revoked")
        self.assertEqual(after["body"]["code"] if "body" in after else after["problem"]["code"], "token_revoked")

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

        def ask(endpoint: str, key: bytes | None) -> ApiResponse | None:
            sock = self._dealer(endpoint, key)
            request = ApiRequest(method="POST", path="/api/v1/conversations/messages",
                                 headers={"authorization": f"Bearer {token}"},
                                 body=b'{"message": "over ipc"}')
            sock.send(wrap(request, "test", {"correlation_id": uuid.uuid4().hex}).SerializeToString())
            if not sock.poll(3000):
                return None
            return unpack(AicoMessage.FromString(sock.recv()), ApiResponse)

        def run() -> list[ApiResponse | None]:
            wrong, _ = zmq.curve_keypair()
            return [ask(ipc["endpoint"], server_key), ask(ipc["fallback"], server_key),
                    ask(ipc["fallback"], wrong)]

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



    def test_no_token_in_logs_over_websocket_and_ipc(self) -> Any:
        """Tokens sent over WebSocket (upgrade header and auth frame) and IPC are never logged."""
        from twisted.logger import formatEvent, globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        token = self.tokens["access_token"]
        server_key, _ = zmq.auth.load_certificate(self.gw.state_dir / "curve" / "gateway.key")

        def talk() -> None:
            with ws_client.connect(self.ws_url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
                ws.recv(timeout=5)
                ws.recv(timeout=5)
            with ws_client.connect(self.ws_url) as ws:
                ws.recv(timeout=5)
                ws.send(json.dumps({"type": "auth", "token": token}))
                ws.recv(timeout=5)
                ws.send(json.dumps({"type": "auth", "token": token + "x"}))  # a refused one too
                ws.recv(timeout=5)
            sock = self._dealer(self.gw.ports["ipc"]["fallback"], server_key)
            sock.send(wrap(ApiRequest(method="GET", path="/api/v1/users/me",
                                      headers={"authorization": f"Bearer {token}"}), "t",
                           {"correlation_id": "c1"}).SerializeToString())
            assert sock.poll(3000)
            sock.recv()

        def check(_: object) -> None:
            # Autobahn's own debug lines (once routed here) carried the upgrade headers.
            text = "\n".join(formatEvent(e) + " " + repr(e) for e in events)
            for part in [token, *token.split(".")]:
                self.assertNotIn(part, text)

        return threads.deferToThread(talk).addCallback(check)

    def test_hostile_input_over_websocket_and_ipc_is_a_clear_4xx(self) -> Any:
        token = self.tokens["access_token"]
        server_key, _ = zmq.auth.load_certificate(self.gw.state_dir / "curve" / "gateway.key")
        deep = "[" * 100_000 + "]" * 100_000

        def talk() -> dict[str, Any]:
            out: dict[str, Any] = {}
            with ws_client.connect(self.ws_url, max_size=None) as ws:
                ws.recv(timeout=5)
                ws.send(json.dumps({"type": "auth", "token": token}))
                ws.recv(timeout=5)
                ws.send(deep)  # the frame itself nests too deeply
                out["ws_frame"] = json.loads(ws.recv(timeout=5))
                ws.send(json.dumps({"type": "request", "id": 1, "method": "POST",
                                    "path": "/api/v1/conversations/messages"})[:-1]
                        + ', "body": ' + "[" * 100 + "]" * 100 + "}")  # deeper than limits.json_depth
                out["ws_body"] = json.loads(ws.recv(timeout=5))
                ws.send(json.dumps({"type": "heartbeat", "id": "still-open"}))
                out["ws_alive"] = json.loads(ws.recv(timeout=5))
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
            self.assertEqual(out["ws_frame"]["type"], "error")
            self.assertEqual((out["ws_frame"]["problem"]["status"], out["ws_frame"]["problem"]["code"]),
                             (400, "malformed_json"))
            self.assertEqual((out["ws_body"]["status"], out["ws_body"]["body"]["code"]), (400, "validation_failed"))
            self.assertEqual((out["ws_alive"]["type"], out["ws_alive"]["id"]), ("heartbeat_ack", "still-open"))
            self.assertEqual((out["ipc_deep"].status, json.loads(out["ipc_deep"].body)["code"]), (400, "validation_failed"))
            self.assertEqual((out["ipc_big"].status, json.loads(out["ipc_big"].body)["code"]), (413, "payload_too_large"))

        return threads.deferToThread(talk).addCallback(check)

    def test_websocket_origins_and_plain_get(self) -> Any:
        port = self.gw.ports["http"]["port"]

        def talk() -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name, origin in [("evil", "http://evil.example"), ("local", f"http://127.0.0.1:{port}")]:
                try:
                    with ws_client.connect(self.ws_url, origin=origin) as ws:  # type: ignore[arg-type]
                        out[name] = json.loads(ws.recv(timeout=5))["type"]
                except Exception as e:
                    out[name] = type(e).__name__ + ": " + str(e)
            with ws_client.connect(self.ws_url) as ws:  # no Origin: not a browser
                out["none"] = json.loads(ws.recv(timeout=5))["type"]
            return out

        def check(out: dict[str, Any]) -> None:
            self.assertIn("rejected WebSocket connection: HTTP 400", out["evil"])
            self.assertEqual((out["local"], out["none"]), ("welcome", "welcome"))

        async def plain_get() -> None:
            r = await self.http.get(self.gw.base + "/ws")
            body = json.loads(await r.content())
            self.assertEqual((r.code, body["code"]), (400, "bad_request"))
            self.assertEqual(r.headers.getRawHeaders("x-request-id")[0], body["request_id"])
            self.assertNotIn(b"Autobahn", json.dumps(body).encode())

        d = threads.deferToThread(talk).addCallback(check)
        return d.addCallback(lambda _: ensureDeferred(plain_get()))

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
            while fast.poll(3000):
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
                    await deferLater(reactor, 0.01, lambda: None)
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

        async def go() -> None:
            for _ in range(100):
                r = await self.http.get(self.gw.base + "/api/v1/slow")
                await r.content()
                if r.code == 200:
                    break
                await deferLater(reactor, 0.05, lambda: None)
            module.mode = "hold"
            sock = self._dealer(self.gw.ports["ipc"]["fallback"], server_key)
            sock.send(wrap(ApiRequest(method="GET", path="/api/v1/slow",
                                      headers={"authorization": f"Bearer {token}"}), "t",
                           {"correlation_id": "slow"}).SerializeToString())
            held = await threads.deferToThread(module.events.get, True, 5)
            while held != "held":
                held = await threads.deferToThread(module.events.get, True, 5)
            stopping = self.gw.service.stopService()
            await deferLater(reactor, 0.3, lambda: None)
            self.assertFalse(stopping.called, "the gateway stopped with an IPC request in flight")
            module.release.put(None)
            got = await threads.deferToThread(sock.poll, 5000)
            self.assertTrue(got)
            reply = unpack(AicoMessage.FromString(sock.recv()), ApiResponse)
            self.assertEqual(reply.status, 200)
            await stopping

        return ensureDeferred(go())

    async def frames_around(self, token: str, act: Any) -> list[dict[str, Any]]:
        """Open a socket authenticated with *token*, run *act* once it is authenticated, and
        return the socket's first three frames."""
        frames: list[dict[str, Any]] = []
        opened = threading.Event()

        def client() -> None:
            with ws_client.connect(self.ws_url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
                frames.append(json.loads(ws.recv(timeout=5)))
                frames.append(json.loads(ws.recv(timeout=5)))
                opened.set()
                frames.append(json.loads(ws.recv(timeout=5)))

        done = threads.deferToThread(client)
        for _ in range(250):
            if opened.is_set():
                break
            await deferLater(reactor, 0.02, lambda: None)
        await act()
        await done
        return frames

    async def test_disabling_a_user_tells_their_open_sockets(self) -> None:
        admin = http_client(self, token=self.tokens["access_token"])
        r = await admin.post(self.gw.base + "/api/v1/users",
                             json={"username": "hank", "password": "a-long-password-1", "roles": ["user"]})
        await r.content()
        user = await login(self.http, self.gw.base, "hank", "a-long-password-1")

        async def disable() -> None:
            r = await admin.patch(self.gw.base + "/api/v1/users/hank", json={"disabled": True})
            self.assertEqual(r.code, 200)
            await r.content()

        frames = await self.frames_around(user["access_token"], disable)
        self.assertEqual([f["type"] for f in frames], ["welcome", "auth_success", "auth_revoked"])
        self.assertEqual(frames[2]["problem"]["code"], "token_revoked")

    async def test_logout_with_a_newer_token_of_the_session_tells_sockets_holding_an_older_one(self) -> None:
        first = await login(self.http, self.gw.base, "admin", self.gw.admin_password)

        async def refresh_then_logout() -> None:
            r = await self.http.post(self.gw.base + "/api/v1/users/refresh",
                                     json={"refresh_token": first["refresh_token"]})
            second = json.loads(await r.content())
            r = await self.http.post(self.gw.base + "/api/v1/users/logout", json={},
                                     headers={"Authorization": f"Bearer {second['access_token']}"})
            self.assertEqual(r.code, 204)

        frames = await self.frames_around(first["access_token"], refresh_then_logout)
        self.assertEqual([f["type"] for f in frames], ["welcome", "auth_success", "auth_revoked"])
