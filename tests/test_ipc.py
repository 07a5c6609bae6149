"""ZeroMQ IPC end to end with a plain pyzmq DEALER (not aico.client), Curve on both endpoints."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import zmq
from twisted.trial.unittest import TestCase

from aico.bus.curve import load_public
from aico.gateway.adapters.ipc import IpcBindError, IpcListener
from aico.gateway.testing.waiting import eventually, sleep
from aico.proto import AicoMessage, ApiEvent, ApiRequest, ApiResponse, unpack, wrap
from tests.realtime import NOTES, USER_CAPS, Realtime, reactor


class Dealer:
    """A plain pyzmq DEALER, polled without blocking the reactor."""

    def __init__(self, case: TestCase, endpoint: str, server_key: bytes | None) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.linger = 0
        if server_key is not None:
            public, secret = zmq.curve_keypair()
            self.sock.curve_publickey = public
            self.sock.curve_secretkey = secret
            self.sock.curve_serverkey = server_key
        self.sock.connect(endpoint)
        case.addCleanup(self.close)

    def close(self) -> None:
        self.sock.close(0)
        self.context.term()

    def send_request(self, method: str, path: str, body: Any = None, token: str = "",
                     correlation: str | None = None, **attributes: str) -> str:
        api = ApiRequest(method=method, path=path)
        if body is not None:
            api.body = json.dumps(body).encode()
            api.headers["content-type"] = "application/json"
        if token:
            api.headers["authorization"] = f"Bearer {token}"
        correlation = correlation or uuid.uuid4().hex
        self.sock.send(wrap(api, source="test", attributes={"correlation_id": correlation,
                                                             **attributes}).SerializeToString())
        return correlation

    async def recv_message(self, timeout: float = 5.0) -> AicoMessage:
        deadline = time.monotonic() + timeout
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                if time.monotonic() > deadline:
                    raise TimeoutError("no message") from None
                await sleep(0.002)
                continue
            assert len(frames) == 1, frames
            return AicoMessage.FromString(frames[0])

    async def recv(self, timeout: float = 5.0) -> tuple[str, ApiResponse]:
        message = await self.recv_message(timeout)
        return message.metadata.attributes.get("correlation_id", ""), unpack(message, ApiResponse)

    async def silent(self, seconds: float) -> bool:
        try:
            await self.recv_message(seconds)
        except TimeoutError:
            return True
        return False


class IpcTests(TestCase):
    timeout = 30

    async def setUp(self) -> None:
        self.rt = await Realtime(self).start()
        self.ipc = self.rt.start_ipc()
        self.key = load_public(self.rt.layout.gateway_public)

    def dealer(self, which: str = "endpoint", key: bytes | str | None = "right") -> Dealer:
        server_key = self.key if key == "right" else key
        assert not isinstance(server_key, str)
        return Dealer(self, self.ipc.endpoints[which], server_key)

    def test_endpoints_are_both_bound_and_reported(self) -> None:
        eps = self.ipc.endpoints
        self.assertEqual(eps["endpoint"], f"ipc://{self.rt.root}/gateway.ipc")
        self.assertTrue(eps["fallback"].startswith("tcp://127.0.0.1:"))
        self.assertNotEqual(eps["fallback"], "tcp://127.0.0.1:*")
        self.assertTrue((self.rt.root / "gateway.ipc").exists())

    async def _request_roundtrip(self, which: str) -> None:
        d = self.dealer(which)
        token = self.rt.tokens.issue("alice", USER_CAPS)
        cid = d.send_request("POST", "/api/v1/echo", {"text": "hi"}, token=token)
        got_cid, response = await d.recv()
        self.assertEqual((got_cid, response.status), (cid, 200))
        self.assertEqual(response.headers["content-type"], "application/json")
        body = json.loads(response.body)
        self.assertEqual(body["echo"], {"text": "hi"})
        self.assertEqual(body["subject"], "alice")
        self.assertEqual(body["transport"], "ipc" if which == "endpoint" else "ipc-tcp")
        cid = d.send_request("GET", "/api/v1/whoami")
        _, response = await d.recv()
        self.assertEqual(response.status, 401)
        self.assertEqual(json.loads(response.body)["code"], "unauthenticated")

    def test_request_and_reply_over_ipc_with_curve(self) -> Any:
        return self._request_roundtrip("endpoint")

    def test_request_and_reply_over_the_tcp_fallback_with_curve(self) -> Any:
        return self._request_roundtrip("fallback")

    async def test_silent_to_a_client_without_the_right_server_key(self) -> None:
        wrong, _ = zmq.curve_keypair()
        for which in ("endpoint", "fallback"):
            for key in (wrong, None):
                d = self.dealer(which, key)
                d.send_request("GET", "/api/v1/ping")
                self.assertTrue(await d.silent(0.3), (which, key))
        self.assertEqual(self.ipc.peers, 0)

    async def test_malformed_frames_answered_with_400_never_a_crash(self) -> None:
        d = self.dealer()
        bad = [
            [b"\xff\xfe not protobuf"],
            [b"one", b"two", b"three"],
            [wrap(ApiEvent(topic="x", body=b"1"), source="t").SerializeToString()],
            [AicoMessage().SerializeToString()],
        ]
        for frames in bad:
            d.sock.send_multipart(frames)
            _, response = await d.recv()
            self.assertEqual(response.status, 400, frames)
            self.assertEqual(response.headers["content-type"], "application/problem+json")
            self.assertEqual(json.loads(response.body)["code"], "bad_request")
        d.send_request("GET", "relative/path")
        self.assertEqual((await d.recv())[1].status, 400)
        d.send_request("GET", "/api/v1/ping?n=5")
        _, response = await d.recv()
        self.assertEqual((response.status, json.loads(response.body)["n"]), (200, "5"))

    async def test_subscribe_pushes_events_on_the_same_socket(self) -> None:
        d = self.dealer("fallback")
        token = self.rt.tokens.issue("bob", USER_CAPS)
        d.send_request("SUBSCRIBE", "conversation/", token=token)
        _, response = await d.recv()
        self.assertEqual((response.status, json.loads(response.body)),
                         (200, {"topic": "conversation/", "subscribed": True}))
        await self.rt.subscribed_on_bus("conversation/")
        self.rt.publish("conversation/user/output/v1", {"text": "hello"})
        message = await d.recv_message()
        event = unpack(message, ApiEvent)
        self.assertEqual((event.topic, json.loads(event.body)),
                         ("conversation/user/output/v1", {"text": "hello"}))
        d.send_request("HEARTBEAT", "/")
        _, response = await d.recv()
        self.assertEqual(json.loads(response.body), {"subscriptions": ["conversation/"]})
        d.send_request("UNSUBSCRIBE", "conversation/")
        self.assertEqual((await d.recv())[1].status, 200)
        self.assertEqual(self.rt.connections.bus_prefixes, frozenset())

    async def test_forbidden_and_anonymous_subscriptions_are_refused(self) -> None:
        d = self.dealer()
        d.send_request("SUBSCRIBE", "conversation/")
        self.assertEqual((await d.recv())[1].status, 401)
        token = self.rt.tokens.issue("carol", USER_CAPS)
        for topic in ("system/", "user/dave/", "reply/"):
            d.send_request("SUBSCRIBE", topic, token=token)
            _, response = await d.recv()
            self.assertEqual((response.status, json.loads(response.body)["code"]), (403, "forbidden"))
        d.send_request("SUBSCRIBE", "conversation/", token="forged")
        self.assertEqual(json.loads((await d.recv())[1].body)["code"], "token_invalid")

    async def test_revoked_subscriber_is_told_and_events_stop(self) -> None:
        d = self.dealer()
        token = self.rt.tokens.issue("erin", USER_CAPS)
        d.send_request("SUBSCRIBE", "conversation/", token=token)
        await d.recv()
        jti = self.rt.tokens.table[token].token_id
        self.assertEqual(self.rt.connections.revoke_token(jti), 1)
        message = await d.recv_message()
        self.assertEqual(message.metadata.attributes["notice"], "auth_revoked")
        self.assertEqual(unpack(message, ApiResponse).status, 401)
        self.assertEqual(self.rt.connections.bus_prefixes, frozenset())

    async def test_oneway_requests_are_served_without_a_reply(self) -> None:
        del NOTES[:]
        d = self.dealer()
        d.send_request("POST", "/api/v1/notes", {"n": 1}, oneway="1")
        await eventually(lambda: NOTES == [{"n": 1}])
        self.assertTrue(await d.silent(0.2))

    async def test_thousand_pipelined_requests_matched_by_correlation_id(self) -> None:
        d = self.dealer()
        token = self.rt.tokens.issue("pip", USER_CAPS)
        n = 1000
        start = time.perf_counter()
        sent = {d.send_request("POST", "/api/v1/echo", {"text": str(i)}, token=token): i
                for i in range(n)}
        seen = {}
        for _ in range(n):
            cid, response = await d.recv()
            seen[cid] = json.loads(response.body)["echo"]["text"]
        elapsed = time.perf_counter() - start
        self.assertEqual(seen, {cid: str(i) for cid, i in sent.items()})
        print(f"\n  1000 pipelined IPC requests: {elapsed:.3f} s, {n / elapsed:,.0f} req/s")

    async def test_connections_lists_ipc_peers(self) -> None:
        d = self.dealer()
        d.send_request("GET", "/api/v1/whoami", token=self.rt.tokens.issue("fay", USER_CAPS))
        await d.recv()
        [entry] = self.rt.connections.snapshot()
        self.assertEqual((entry["transport"], entry["subject"]), ("ipc", "fay"))
        self.assertGreater(entry["bytes_in"], 0)


class IpcOptionsTests(TestCase):
    timeout = 20

    async def setUp(self) -> None:
        self.rt = await Realtime(self, bus=False).start()

    async def test_plain_ipc_when_curve_is_off_there_and_fallback_disabled(self) -> None:
        ipc = self.rt.start_ipc(fallback="", curve_on_ipc=False)
        self.assertEqual(list(ipc.endpoints), ["endpoint"])
        d = Dealer(self, ipc.endpoints["endpoint"], None)
        d.send_request("GET", "/api/v1/ping")
        self.assertEqual((await d.recv())[1].status, 200)

    def test_an_address_in_use_is_an_error_naming_it(self) -> None:
        first = self.rt.start_ipc(endpoint="")
        taken = first.endpoints["fallback"]
        second = IpcListener(self.rt.sessions, self.rt.layout, "", taken, True, reactor)
        with self.assertRaises(IpcBindError) as caught:
            second.listen()
        self.assertIn(taken, str(caught.exception))
        self.assertEqual(second.endpoints, {})

    def test_default_ipc_path_too_long_for_a_unix_socket_leaves_the_tcp_fallback(self) -> None:
        from aico.bus.curve import CurveLayout

        deep = CurveLayout(self.rt.layout.state_dir / ("x" * 120))
        listener = IpcListener(self.rt.sessions, deep, "default", "tcp://127.0.0.1:*", True,
                               reactor)
        self.assertEqual(listener.ipc_endpoint, "")
        short = IpcListener(self.rt.sessions, CurveLayout(Path("/tmp/s")), "default", "", True,
                            reactor)
        self.assertEqual(short.ipc_endpoint, "ipc:///tmp/s/gateway.ipc")
