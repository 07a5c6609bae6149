"""aico.client: transport negotiation, the same request()/subscribe() everywhere, reconnects."""

from __future__ import annotations

import io
import json
from typing import Any

import zmq
from twisted.trial.unittest import TestCase

from aico.client import Client, ClientError, Endpoints, TransportUnavailable, connect
from aico.client.cli import parser, run_request
from aico.gateway.testing.waiting import eventually
from tests.realtime import USER_CAPS, Realtime, reactor


class ClientTests(TestCase):
    timeout = 30

    async def setUp(self) -> None:
        self.rt = await Realtime(self).start()
        self.token = self.rt.tokens.issue("alice", USER_CAPS)

    async def connect(self, **kw: Any) -> Client:
        client = await connect(reactor, self.rt.root, token=self.token, **kw)
        self.addCleanup(client.close)
        return client

    async def check_behaviour(self, client: Client) -> dict[str, Any]:
        """Request and subscription, as a user of the library sees them."""
        r = await client.request("POST", "/api/v1/echo", {"text": "hi"})
        self.assertEqual(r.status, 200)
        body = r.json()
        self.assertEqual((body["echo"], body["subject"]), ({"text": "hi"}, "alice"))
        r = await client.request("GET", "/api/v1/nope")
        self.assertEqual((r.status, r.json()["code"]), (404, "not_found"))
        streamed = await client.request("GET", "/api/v1/stream", query={"stream": "true"})
        self.assertEqual([json.loads(line) for line in streamed.body.splitlines()],
                         [{"delta": 0}, {"delta": 1}, {"delta": 2}])
        events: list[tuple[str, Any]] = []
        await client.subscribe("conversation/", lambda topic, value: events.append((topic, value)))
        await self.rt.subscribed_on_bus("conversation/")
        self.rt.publish("conversation/out", {"n": 1})
        await eventually(lambda: bool(events))
        self.assertEqual(events, [("conversation/out", {"n": 1})])
        with self.assertRaises(ClientError):
            await client.subscribe("system/", lambda topic, value: None)
        return dict(body)

    async def test_prefers_ipc_and_behaves_the_same_on_every_transport(self) -> None:
        self.rt.start_ipc()
        self.rt.write_ports()
        seen = {}
        for order in (None, ("ipc-tcp",), ("websocket",)):
            client = await (self.connect() if order is None else self.connect(order=order))
            body = await self.check_behaviour(client)
            seen[client.transport_name] = body.pop("transport")
            await client.close()
        self.assertEqual(seen, {"ipc": "ipc", "ipc-tcp": "ipc-tcp", "websocket": "websocket"})

    async def test_falls_back_to_websocket_when_the_ipc_socket_is_absent(self) -> None:
        ports = {"http": {"host": "127.0.0.1", "port": self.rt.http_port},
                 "ipc": {"endpoint": f"ipc://{self.rt.root}/gateway.ipc", "fallback": ""}}
        (self.rt.root / "ports.json").write_text(json.dumps(ports))
        self.assertFalse((self.rt.root / "gateway.ipc").exists())
        client = await self.connect()
        self.assertEqual(client.transport_name, "websocket")
        await self.check_behaviour(client)

    async def test_falls_back_to_tcp_when_ipc_is_off_and_past_a_wrong_key_to_websocket(self) -> None:
        self.rt.start_ipc(endpoint="")
        self.rt.write_ports()
        client = await self.connect()
        self.assertEqual(client.transport_name, "ipc-tcp")
        await client.close()
        wrong, _ = zmq.curve_keypair()
        endpoints = Endpoints.from_state_dir(self.rt.root)
        endpoints = Endpoints(ipc="", fallback=endpoints.fallback, http=endpoints.http,
                              server_key=wrong)
        client = await connect(reactor, endpoints=endpoints, token=self.token, probe_timeout=0.3)
        self.addCleanup(client.close)
        self.assertEqual(client.transport_name, "websocket")

    async def test_nothing_reachable_is_a_clear_error(self) -> None:
        endpoints = Endpoints(ipc=f"ipc://{self.rt.root}/missing.ipc",
                              http="http://127.0.0.1:1")
        with self.assertRaises(TransportUnavailable) as caught:
            await connect(reactor, endpoints=endpoints)
        self.assertIn("missing.ipc", str(caught.exception))

    async def test_reconnects_with_backoff_and_subscribes_again(self) -> None:
        self.rt.write_ports()
        client = await self.connect(backoff_base=0.05)
        self.assertEqual(client.transport_name, "websocket")
        events: list[Any] = []
        await client.subscribe("conversation/", lambda topic, value: events.append(value))
        self.assertEqual(self.rt.factory.close_all(), 1)
        await eventually(lambda: client.reconnects == 1 and len(self.rt.connections) == 1
                         and bool(self.rt.connections.bus_prefixes))
        await self.rt.subscribed_on_bus("conversation/")
        self.rt.publish("conversation/again", {"back": True})
        await eventually(lambda: events == [{"back": True}])
        r = await client.request("GET", "/api/v1/whoami")
        self.assertEqual(r.json(), {"subject": "alice"})

    async def test_cli_request_prints_the_body_and_status(self) -> None:
        self.rt.start_ipc()
        self.rt.write_ports()
        args = parser().parse_args(["request", "POST", "/api/v1/echo", "--body", '{"text": "cli"}',
                                    "--token", self.token, "--state-dir", str(self.rt.root)])
        out, err = io.StringIO(), io.StringIO()
        code = await run_request(reactor, args, out, err)
        self.assertEqual(code, 0, err.getvalue())
        self.assertEqual(json.loads(out.getvalue())["echo"], {"text": "cli"})
        self.assertEqual(err.getvalue(), "200 via ipc\n")
        args = parser().parse_args(["request", "GET", "/api/v1/whoami",
                                    "--state-dir", str(self.rt.root)])
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(await run_request(reactor, args, out, err), 1)
        self.assertEqual(json.loads(out.getvalue())["code"], "unauthenticated")

    async def test_transport_route_lists_what_is_offered_in_json_and_protobuf(self) -> None:
        from aico.proto.aico.gateway.v1.gateway_pb2 import TransportInfo

        self.rt.start_ipc()
        self.rt.write_ports()
        client = await self.connect(order=("websocket",))
        r = await client.request("GET", "/api/v1/transport")
        names = [e["transport"] for e in r.json()["endpoints"]]
        self.assertEqual(names, ["ipc", "ipc-tcp", "websocket", "rest"])
        self.assertEqual(r.json()["endpoints"][2]["address"], self.rt.ws_url)
        ipc = await self.connect(order=("ipc",))
        r = await ipc.request("GET", "/api/v1/transport",
                              headers={"Accept": "application/x-protobuf"})
        self.assertEqual(r.headers["content-type"], "application/x-protobuf")
        info = TransportInfo.FromString(r.body)
        self.assertEqual(info.endpoints[0].address, self.rt.ipc.endpoints["endpoint"]
                         if self.rt.ipc else "")
        self.assertTrue(info.endpoints[1].curve_server_key)


class ClientCommandLineTests(TestCase):
    def test_request_and_login_need_exactly_one_of_state_dir_and_cert_dir(self) -> None:
        for command in (["request", "GET", "/api/v1/health"], ["login", "--username", "a"]):
            for where in ([], ["--state-dir", "s", "--cert-dir", "c"]):
                with self.assertRaises(SystemExit):
                    parser().parse_args([*command, *where])
            coupled = parser().parse_args([*command, "--state-dir", "s"])
            detached = parser().parse_args([*command, "--cert-dir", "c", "--url", "https://h:8772"])
            self.assertEqual((coupled.state_dir, coupled.cert_dir), ("s", None))
            self.assertEqual((detached.cert_dir, detached.url), ("c", "https://h:8772"))

    async def test_a_missing_cert_dir_is_a_clear_error(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        args = parser().parse_args(["request", "GET", "/x", "--token", "t", "--cert-dir", "/nonexistent"])
        self.assertEqual(await run_request(reactor, args, out, err), 2)
        self.assertIn("gateway.json", err.getvalue())
