"""Fair share on IPC over real ZeroMQ sockets: one peer's flood never delays another peer.

One ROUTER socket serves every IPC peer, so the gateway cannot stop reading one of them:
past ``limits.max_inflight`` a peer's requests wait in a queue of
``limits.inflight_queue``, and past that they are refused at once with 429.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import zmq
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from aico.bus.curve import load_public
from aico.gateway.routing.messages import Request, Response, json_response
from aico.gateway.routing.table import RouteEntry
from aico.gateway.testing.waiting import eventually
from aico.proto import AicoMessage, ApiRequest, ApiResponse, unpack, wrap
from tests.realtime import Realtime


class IpcFairShareTests(TestCase):
    timeout = 30

    async def setUp(self) -> None:
        self.rt = await Realtime(self, bus=False).start()
        self.rt.limits = replace(self.rt.limits, max_inflight=2, inflight_queue=3)
        self.held: list[tuple[Request, Deferred[Response]]] = []

        def hold(request: Request) -> Deferred[Response]:
            d: Deferred[Response] = Deferred()
            self.held.append((request, d))
            return d

        table = self.rt.dispatcher.table.with_routes(
            "test", [RouteEntry("GET", "/api/v1/hold", hold, owner="test", public=True,
                                tier="public")])
        self.rt.dispatcher.set_table(table)
        self.ipc = self.rt.start_ipc(endpoint="")

    def dealer(self) -> Any:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.curve_serverkey = load_public(self.rt.layout.gateway_public)
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.linger = 0
        sock.connect(self.ipc.endpoints["fallback"])
        self.addCleanup(sock.close)
        return sock

    @staticmethod
    def send(sock: Any, path: str, correlation: str) -> None:
        sock.send(wrap(ApiRequest(method="GET", path=path), "t",
                       {"correlation_id": correlation}).SerializeToString())

    async def replies(self, sock: Any, count: int) -> dict[str, ApiResponse]:
        def read() -> dict[str, ApiResponse]:
            out = {}
            while len(out) < count and sock.poll(5000):
                message = AicoMessage.FromString(sock.recv())
                out[message.metadata.attributes["correlation_id"]] = unpack(message, ApiResponse)
            return out

        return await threads.deferToThread(read)

    async def test_a_peer_past_its_share_waits_then_is_refused_at_once_while_others_are_served(
            self) -> None:
        flood = self.dealer()
        for i in range(10):
            self.send(flood, "/api/v1/hold", f"f{i}")
        # 2 in flight, 3 waiting, the other 5 refused at once with 429
        refused = await self.replies(flood, 5)
        self.assertEqual(sorted(refused), [f"f{i}" for i in range(5, 10)])
        for reply in refused.values():
            self.assertEqual((reply.status, reply.headers["retry-after"]), (429, "1"))
        self.assertEqual(len(self.held), 2)
        self.assertEqual(self.ipc.overloaded, 5)
        # another peer is answered at once, while the flood's requests are held
        other = self.dealer()
        self.send(other, "/api/v1/ping", "o1")
        answered = await self.replies(other, 1)
        self.assertEqual(answered["o1"].status, 200)
        # answers going out let the waiting requests in, in the order they arrived
        order: list[str] = []
        while len(order) < 5:
            await eventually(lambda: self.held)
            request, d = self.held.pop(0)
            order.append(request.request_id)
            d.callback(json_response({"n": len(order)}))
        done = await self.replies(flood, 5)
        self.assertEqual(sorted(done), [f"f{i}" for i in range(5)])
        self.assertTrue(all(r.status == 200 for r in done.values()))
        self.assertEqual(len(order), 5)
