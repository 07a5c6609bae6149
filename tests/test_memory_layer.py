"""The in-memory test layer itself, and the example of docs/testing.md."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from aico.gateway.testing.memory import MemoryGateway
from tests.echomodule import Echo


class DocsExampleTests(SynchronousTestCase):
    def test_echo_is_served_with_its_capability(self) -> None:
        gw = MemoryGateway("[roles]\nuser = ['echo:write', 'users:self']\n", test=self)
        gw.add_module(Echo)
        gw.add_user("ursula", "a-long-password-1", ("user",))
        token = gw.token("ursula", "a-long-password-1")
        r = gw.post("/api/v1/echo", {"text": "hi"}, token=token)
        self.assertEqual((r.code, r.json()["echo"]), (200, "hi"))
        ws = gw.websocket(headers={"Authorization": f"Bearer {token}"})
        ws.recv_all()
        ws.send({"type": "request", "id": 1, "method": "POST", "path": "/api/v1/echo",
                 "body": {"text": "hi"}})
        self.assertEqual(ws.recv()["body"]["echo"], "hi")


class MemoryGatewayTests(SynchronousTestCase):
    def test_it_runs_the_production_service_tree_and_stops_it(self) -> None:
        gw = MemoryGateway()
        names = [c.name for c in gw.service]
        self.assertEqual(names, ["security", "bus", "directory", "modules", "connections",
                                 "listeners", "pairing", "jobs", "ports-file"])
        self.assertTrue(gw.service.running)
        self.successResultOf(gw.service.when_ready())
        self.successResultOf(gw.stop())
        self.assertFalse(gw.service.running)
        self.assertFalse(gw.bus.running)

    def test_time_moves_only_when_the_test_says(self) -> None:
        gw = MemoryGateway("[auth]\naccess_ttl = 60\n", test=self)
        token = gw.token()
        self.assertEqual(gw.get("/api/v1/users/me", token=token).code, 200)
        gw.advance(61 + gw.config.auth.leeway)
        self.assertEqual(gw.get("/api/v1/users/me", token=token).json()["code"], "token_expired")

    def test_a_request_that_waits_for_time_says_so(self) -> None:
        gw = MemoryGateway(test=self)
        token = gw.token()
        with self.assertRaises(AssertionError) as caught:
            gw.post("/api/v1/conversations/messages?stream=true", {"message": "a b c"}, token=token)
        self.assertIn("did not finish", str(caught.exception))
        gw.advance(1)  # let the held stream end before the cleanup


class HttpDrainTests(SynchronousTestCase):
    def test_after_the_drain_open_http_connections_are_closed_gracefully(self) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        gw = MemoryGateway()
        site = gw.parts.http_site
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 31337))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 31337))
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        gw.settle()
        self.assertIn(b"200 OK", transport.value())
        self.assertFalse(transport.disconnecting)  # keep-alive: still open
        self.assertIn(channel, site.channels)
        stopped = gw.stop()
        # closed with loseConnection (what was written still goes out), not aborted
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(None)
        self.successResultOf(stopped)
        self.assertNotIn(channel, site.channels)

    def test_an_http_request_is_in_flight_until_its_response_is_finished(self) -> None:
        gw = MemoryGateway(test=self)
        token = gw.token()
        inflight = gw.parts.inflight
        with self.assertRaises(AssertionError):  # the stream waits for time to pass
            gw.post("/api/v1/conversations/messages?stream=true", {"message": "a b c"},
                    token=token)
        self.assertEqual(inflight.count, 1)
        gw.advance(0.05)  # one more word: still streaming
        self.assertEqual(inflight.count, 1)
        gw.advance(1)
        self.assertEqual(inflight.count, 0)
