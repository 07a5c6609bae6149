"""The access log: one line per finished request on every transport, read back."""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.logger import formatEvent, globalLogPublisher, jsonFileLogObserver
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.gateway.access import ACCESS_NAMESPACE, AccessLog
from aico.gateway.logs import escape
from aico.gateway.testing.memory import MemoryGateway
from aico.proto import AicoMessage, ApiRequest, ApiResponse, unpack, wrap
from tests.realtime import USER_CAPS, Realtime


class Capture:
    """Every access-log event published while the test runs."""

    def __init__(self, test: Any) -> None:
        self.events: list[dict[str, Any]] = []
        self.all_text: list[str] = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        self.all_text.append(formatEvent(event))
        if event.get("log_namespace") == ACCESS_NAMESPACE:
            self.events.append(event)

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]


class MemoryAccessLogTests(SynchronousTestCase):
    def test_rest_and_websocket_requests_each_write_one_line_with_every_field(self) -> None:
        gw = MemoryGateway(test=self)
        log = Capture(self)
        anonymous = gw.get("/api/v1/health", headers={"X-Request-ID": "probe-1"})
        token = gw.token()
        gw.clock.advance(0.25)  # time passes between requests, not inside them
        me = gw.get("/api/v1/users/me", token=token, headers={"X-Request-ID": "me-1"})
        ws = gw.websocket(headers={"Authorization": f"Bearer {token}"})
        ws.recv_all()
        ws.send({"type": "request", "id": 7, "method": "GET", "path": "/api/v1/users/me",
                 "headers": {"x-request-id": "ws-1"}})
        ws.recv()
        by_id = {e["request_id"]: e for e in log.events}
        probe, http, websocket = by_id["probe-1"], by_id["me-1"], by_id["ws-1"]
        self.assertEqual((probe["transport"], probe["principal"], probe["method"], probe["path"],
                          probe["status"], probe["bytes"]),
                         ("http", "-", "GET", "/api/v1/health", 200, len(anonymous.body)))
        self.assertEqual((http["transport"], http["principal"], http["status"], http["bytes"]),
                         ("http", "admin", 200, len(me.body)))
        self.assertEqual((websocket["transport"], websocket["principal"], websocket["path"]),
                         ("websocket", "admin", "/api/v1/users/me"))
        for event in (probe, http, websocket):
            self.assertGreaterEqual(event["duration_ms"], 0.0)
            self.assertIn("log_time", event)
        # the login itself is one line too; no line ever holds a token
        self.assertEqual([e["path"] for e in log.events].count("/api/v1/users/authenticate"), 1)
        for text in log.all_text:
            self.assertNotIn(token, text)
        (line,) = [formatEvent(e) for e in log.events if e["request_id"] == "me-1"]
        self.assertIn('me-1 http admin "GET /api/v1/users/me" 200', line)

    def test_a_streamed_answer_is_logged_once_when_it_ends_with_every_byte_sent(self) -> None:
        gw = MemoryGateway(test=self)
        token = gw.token()
        log = Capture(self)
        r = gw.post("/api/v1/conversations/messages?stream=true", {"message": "one two three"},
                    token=token, advance=2)
        (event,) = [e for e in log.events if e["path"] == "/api/v1/conversations/messages"]
        self.assertEqual(event["status"], 200)
        # every chunk the module produced, without the adapter's added newlines
        self.assertEqual(event["bytes"], sum(len(x) for x in r.body.splitlines()))
        self.assertGreater(event["duration_ms"], 0.0)

    def test_refusals_before_the_dispatcher_and_control_requests_are_logged_too(self) -> None:
        gw = MemoryGateway("[limits]\nbody_max = 100\n", test=self)
        token = gw.token()
        log = Capture(self)
        gw.request("POST", "/api/v1/conversations/messages", data=b'{"message": "' + b"x" * 500 + b'"}',
                   headers={"Content-Type": "application/json"}, token=token)
        ws = gw.websocket(headers={"Authorization": f"Bearer {token}"})
        ws.recv_all()
        ws.send({"type": "subscribe", "id": 1, "topic": "conversation/"})
        ws.recv()
        statuses = [(e["method"], e["status"]) for e in log.events]
        self.assertIn(("POST", 413), statuses)
        self.assertIn(("SUBSCRIBE", 200), statuses)

    def test_it_can_be_turned_off_and_on_again_by_a_reload(self) -> None:
        gw = MemoryGateway("[logging]\naccess = false\n", test=self)
        log = Capture(self)
        gw.get("/api/v1/health")
        self.assertEqual(log.events, [])
        gw.parts.reconfigure(gw.config.replace(
            logging=type(gw.config.logging)(access=True)))
        gw.get("/api/v1/health")
        self.assertEqual(len(log.events), 1)

    def test_under_the_json_logger_each_field_is_its_own_json_member(self) -> None:
        gw = MemoryGateway(test=self)
        out = io.StringIO()
        observer = jsonFileLogObserver(out, recordSeparator="")
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        gw.get("/api/v1/nope", headers={"X-Request-ID": "json-1"})
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        (record,) = [r for r in records if r.get("log_namespace") == ACCESS_NAMESPACE]
        self.assertEqual((record["request_id"], record["transport"], record["method"],
                          record["path"], record["status"], record["principal"]),
                         ("json-1", "http", "GET", "/api/v1/nope", 404, "-"))

    def test_client_text_cannot_forge_a_log_line(self) -> None:
        gw = MemoryGateway(test=self)
        ws = gw.websocket()
        ws.recv_all()
        log = Capture(self)
        ws.send({"type": "request", "id": 1, "method": "GET",
                 "path": "/api/v1/a\r\n2026-01-01 [aico.access#info] forged\u2028x"})
        self.assertEqual(ws.recv()["status"], 404)
        (line,) = log.lines()
        self.assertNotIn("\n", line)
        self.assertNotIn("\r", line)
        self.assertNotIn("\u2028", line)
        self.assertIn("\\r\\n2026-01-01", line)


class EscapeTests(SynchronousTestCase):
    def test_control_and_line_separator_characters_are_escaped(self) -> None:
        self.assertEqual(escape("plain café"), "plain café")
        self.assertEqual(escape("a\r\nb\tc\x00d\x1be\u2028f\u2029\\"),
                         "a\\r\\nb\\tc\\x00d\\x1be\\u2028f\\u2029\\\\")


class IpcAccessLogTests(TestCase):
    async def test_an_ipc_request_writes_one_line_with_its_transport(self) -> None:
        import zmq

        from aico.bus.curve import load_public

        rt = await Realtime(self).start()
        access = AccessLog(rt.clock)
        rt.dispatcher.observers.append(access.record)
        ipc = rt.start_ipc()
        log = Capture(self)
        token = rt.tokens.issue("ivy", USER_CAPS)
        context = zmq.Context.instance()
        sock = context.socket(zmq.DEALER)
        sock.curve_serverkey = load_public(rt.layout.gateway_public)
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.linger = 0
        sock.connect(ipc.endpoints["fallback"])
        self.addCleanup(sock.close)
        sock.send(wrap(ApiRequest(method="GET", path="/api/v1/whoami", request_id="ipc-1",
                                  headers={"authorization": f"Bearer {token}"}), "t",
                       {"correlation_id": "c1"}).SerializeToString())
        from twisted.internet import threads

        self.assertTrue(await threads.deferToThread(sock.poll, 5000))
        reply = unpack(AicoMessage.FromString(sock.recv()), ApiResponse)
        self.assertEqual(reply.status, 200)
        (event,) = log.events
        self.assertEqual((event["request_id"], event["transport"], event["principal"],
                          event["status"], event["bytes"]),
                         ("ipc-1", "ipc-tcp", "ivy", 200, len(reply.body)))
        self.assertEqual(access.count, 1)
