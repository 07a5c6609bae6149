"""The client contract a stranger implements from ``docs/protocols.md`` (issue 9, points
12, 13 and 15): the envelope's ``Any``, what a bad envelope's 400 keeps, and one rule for
header-name case in every response frame. In memory: IPC frames go straight into the
production :class:`~aico.gateway.adapters.ipc.IpcListener` of a
:class:`~aico.gateway.testing.memory.MemoryGateway` (a fake ROUTER socket stands in
for ZeroMQ); WebSockets use the memory gateway's own. The real-socket IPC test is
``tests/test_contract_real.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from aico.bus.curve import CurveLayout
from aico.gateway.adapters.ipc import IpcListener, _Router
from aico.gateway.testing.memory import MemoryGateway
from aico.proto import (
    TYPE_URL_PREFIX,
    AicoMessage,
    ApiEvent,
    ApiRequest,
    ApiResponse,
    EnvelopeError,
    type_name,
    unpack,
    wrap,
)
from aico.proto.aico.gateway.v1.gateway_pb2 import SocketFrame

#: A standard tier small enough to reach 429 in a few requests.
TINY_STANDARD_TIER = """
[ratelimit.tiers.standard]
requests = 3
per_seconds = 60
burst = 3
"""


class FakeRouterSocket:
    """What :class:`IpcListener` calls on a ROUTER socket; keeps what it sends."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []

    def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
        self.sent.append(list(frames))

    def close(self, linger: int = 0) -> None:
        pass


class MemoryIpc:
    """The gateway's IPC adapter fed frames in memory, one peer."""

    def __init__(self, gw: MemoryGateway) -> None:
        self.gw = gw
        self.listener = IpcListener(gw.parts.sessions, CurveLayout(Path("/nonexistent")), "", "",
                                    True, gw.clock)
        self.sock = FakeRouterSocket()
        self.router = _Router(self.sock, "ipc")  # type: ignore[arg-type]
        self.router.address = "ipc://memory"

    def send_frames(self, *frames: bytes) -> None:
        self.listener._received(self.router, [b"peer-1", *frames])
        self.gw.settle()

    def send(self, message: AicoMessage) -> None:
        self.send_frames(message.SerializeToString())

    def request(self, method: str, path: str, token: str = "", correlation: str = "c1",
                type_url: str | None = None, body: Any = None) -> AicoMessage:
        api = ApiRequest(method=method, path=path)
        if token:
            api.headers["authorization"] = f"Bearer {token}"
        if body is not None:
            api.body = json.dumps(body).encode()
        message = wrap(api, source="test", attributes={"correlation_id": correlation})
        if type_url is not None:
            message.any_payload.type_url = type_url
        return message

    def recv_message(self) -> AicoMessage:
        if not self.sock.sent:
            raise AssertionError("no reply from the IPC adapter")
        frames = self.sock.sent.pop(0)
        return AicoMessage.FromString(frames[-1])

    def recv(self) -> tuple[dict[str, str], ApiResponse]:
        message = self.recv_message()
        return dict(message.metadata.attributes), unpack(message, ApiResponse)


def problem(response: ApiResponse) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(response.body)
    return value


class EnvelopeTypeUrlTests(SynchronousTestCase):
    """Point 12: the ``type_url`` forms accepted, and a 400 that names the expected one."""

    def setUp(self) -> None:
        self.gw = MemoryGateway(test=self)
        self.ipc = MemoryIpc(self.gw)

    def test_the_gateway_writes_the_googleapis_type_url_and_matches_after_the_last_slash(self) -> None:
        message = wrap(ApiEvent(topic="t"), source="x")
        self.assertEqual(message.any_payload.type_url,
                         TYPE_URL_PREFIX + "aico.gateway.v1.ApiEvent")
        self.assertEqual(type_name("type.googleapis.com/aico.gateway.v1.ApiEvent"),
                         "aico.gateway.v1.ApiEvent")
        self.assertEqual(type_name("aico.gateway.v1.ApiEvent"), "aico.gateway.v1.ApiEvent")
        self.assertEqual(type_name("example.com/a/aico.gateway.v1.ApiEvent"),
                         "aico.gateway.v1.ApiEvent")

    def test_ipc_serves_the_documented_type_url_any_prefix_and_the_bare_full_name(self) -> None:
        for n, type_url in enumerate(("type.googleapis.com/aico.gateway.v1.ApiRequest",
                                      "example.com/aico.gateway.v1.ApiRequest",
                                      "aico.gateway.v1.ApiRequest")):
            self.ipc.send(self.ipc.request("GET", "/api/v1/health", correlation=f"c{n}",
                                           type_url=type_url))
            attributes, response = self.ipc.recv()
            self.assertEqual((attributes.get("correlation_id"), response.status),
                             (f"c{n}", 200), (type_url, response.body))

    def test_unpack_accepts_a_bare_type_name(self) -> None:
        message = wrap(ApiRequest(method="GET", path="/x"), source="t")
        message.any_payload.type_url = "aico.gateway.v1.ApiRequest"
        self.assertEqual(unpack(message, ApiRequest).path, "/x")

    def test_a_wrong_type_url_is_400_naming_the_expected_form(self) -> None:
        for type_url, found in (("aico.gateway.v1.ApiRequests", "'aico.gateway.v1.ApiRequests'"),
                                ("type.googleapis.com/aico.gateway.v1.ApiEvent",
                                 "'type.googleapis.com/aico.gateway.v1.ApiEvent'"),
                                ("", "empty")):
            self.ipc.send(self.ipc.request("GET", "/api/v1/health", type_url=type_url))
            _, response = self.ipc.recv()
            body = problem(response)
            self.assertEqual((response.status, body["code"]), (400, "bad_request"))
            self.assertIn("'type.googleapis.com/aico.gateway.v1.ApiRequest'", body["detail"])
            self.assertIn(f"any_payload.type_url is {found}", body["detail"])

    def test_an_envelope_without_a_payload_is_400_naming_the_expected_form(self) -> None:
        message = AicoMessage()
        message.metadata.message_type = "aico.gateway.v1.ApiRequest"
        self.ipc.send(message)
        _, response = self.ipc.recv()
        self.assertIn("no any_payload", problem(response)["detail"])
        self.assertIn("type.googleapis.com/aico.gateway.v1.ApiRequest", problem(response)["detail"])

    def test_bytes_that_are_no_aico_message_are_400_saying_so(self) -> None:
        self.ipc.send_frames(b"\xff\xfe not protobuf")
        attributes, response = self.ipc.recv()
        self.assertEqual(attributes, {})  # nothing could be read
        self.assertEqual(response.status, 400)
        self.assertIn("not a protobuf aico.core.AicoMessage", problem(response)["detail"])

    def test_a_payload_that_does_not_parse_is_an_envelope_error(self) -> None:
        message = wrap(ApiRequest(), source="t")
        message.any_payload.value = b"\xff\xff\xff"
        with self.assertRaises(EnvelopeError) as caught:
            unpack(message, ApiRequest)
        self.assertIn("not a valid aico.gateway.v1.ApiRequest", str(caught.exception))

    def test_an_envelope_without_metadata_is_served_and_answered_without_attributes(self) -> None:
        message = AicoMessage()
        message.any_payload.Pack(ApiRequest(method="GET", path="/api/v1/health"))
        self.ipc.send(message)
        attributes, response = self.ipc.recv()
        self.assertEqual((attributes, response.status), ({}, 200))


class EnvelopeErrorCorrelationTests(SynchronousTestCase):
    """Point 13: a 400 for a bad envelope keeps the ``correlation_id`` it could read."""

    def setUp(self) -> None:
        self.gw = MemoryGateway(test=self)
        self.ipc = MemoryIpc(self.gw)

    def test_a_wrong_type_url_reply_carries_the_correlation_id(self) -> None:
        self.ipc.send(self.ipc.request("GET", "/api/v1/health", correlation="cid-noprefix",
                                       type_url="aico.gateway.v1.Nonsense"))
        attributes, response = self.ipc.recv()
        self.assertEqual(response.status, 400)
        self.assertEqual(attributes, {"correlation_id": "cid-noprefix"})

    def test_a_payload_of_another_type_reply_carries_the_correlation_id(self) -> None:
        self.ipc.send(wrap(ApiEvent(topic="x"), source="t", attributes={"correlation_id": "ev"}))
        attributes, response = self.ipc.recv()
        self.assertEqual((attributes.get("correlation_id"), response.status), ("ev", 400))

    def test_a_oneway_bad_envelope_gets_no_reply_as_documented(self) -> None:
        message = self.ipc.request("GET", "/api/v1/health", type_url="nope")
        message.metadata.attributes["oneway"] = "1"
        self.ipc.send(message)
        self.assertEqual(self.ipc.sock.sent, [])

    def test_pipelined_requests_with_one_bad_envelope_are_all_matched(self) -> None:
        self.ipc.send(self.ipc.request("GET", "/api/v1/health", correlation="a"))
        self.ipc.send(self.ipc.request("GET", "/api/v1/health", correlation="b", type_url="x/y"))
        self.ipc.send(self.ipc.request("GET", "/api/v1/health", correlation="c"))
        got = {}
        for _ in range(3):
            attributes, response = self.ipc.recv()
            got[attributes["correlation_id"]] = response.status
        self.assertEqual(got, {"a": 200, "b": 400, "c": 200})


def lower_case(headers: Any) -> bool:
    return all(name == name.lower() for name in headers)


class ResponseHeaderCaseTests(SynchronousTestCase):
    """Point 15: every response frame's header names are lower case, on every transport."""

    def setUp(self) -> None:
        self.gw = MemoryGateway(TINY_STANDARD_TIER, test=self)
        self.token = self.gw.token()

    def test_ipc_response_headers_are_lower_case(self) -> None:
        ipc = MemoryIpc(self.gw)
        seen: dict[int, dict[str, str]] = {}
        for n in range(6):
            ipc.send(ipc.request("GET", "/api/v1/users/me", token=self.token, correlation=str(n)))
            _, response = ipc.recv()
            seen.setdefault(response.status, dict(response.headers))
        ipc.send(ipc.request("DELETE", "/api/v1/health"))
        _, response = ipc.recv()
        seen[response.status] = dict(response.headers)
        self.assertEqual(sorted(seen), [200, 405, 429])
        for status, headers in seen.items():
            self.assertTrue(lower_case(headers), (status, headers))
        self.assertIn("ratelimit", seen[200])
        self.assertIn("ratelimit-policy", seen[200])
        self.assertIn("retry-after", seen[429])
        self.assertIn("allow", seen[405])

    def test_json_websocket_response_headers_are_lower_case(self) -> None:
        ws = self.gw.websocket(headers={"Authorization": f"Bearer {self.token}"})
        ws.recv_all()
        seen: dict[int, dict[str, str]] = {}
        for n in range(6):
            ws.send({"type": "request", "id": n, "method": "GET", "path": "/api/v1/users/me"})
            frame = ws.recv()
            seen.setdefault(frame["status"], frame.get("headers", {}))
        ws.send({"type": "request", "id": "d", "method": "DELETE", "path": "/api/v1/health"})
        frame = ws.recv()
        seen[frame["status"]] = frame["headers"]
        self.assertEqual(sorted(seen), [200, 405, 429])
        for status, headers in seen.items():
            self.assertTrue(lower_case(headers), (status, headers))
        self.assertIn("ratelimit", seen[200])
        self.assertIn("retry-after", seen[429])
        self.assertIn("allow", seen[405])

    def test_proto_websocket_response_headers_are_lower_case(self) -> None:
        ws = self.gw.websocket(headers={"Authorization": f"Bearer {self.token}"},
                               protocols=["aico.v1.proto"])

        def recv() -> SocketFrame:
            payload, binary = ws.recv_raw()
            self.assertTrue(binary)
            return SocketFrame.FromString(payload)

        recv(), recv()  # welcome, auth_success
        seen: dict[int, dict[str, str]] = {}
        for n in range(6):
            ws.send(SocketFrame(request=ApiRequest(request_id=str(n), method="GET",
                                                   path="/api/v1/users/me")).SerializeToString())
            r = recv().response
            seen.setdefault(r.status, dict(r.headers))
        ws.send(SocketFrame(request=ApiRequest(request_id="d", method="DELETE",
                                               path="/api/v1/health")).SerializeToString())
        r = recv().response
        seen[r.status] = dict(r.headers)
        self.assertEqual(sorted(seen), [200, 405, 429])
        for status, headers in seen.items():
            self.assertTrue(lower_case(headers), (status, headers))
            self.assertIn("content-type", headers)
            self.assertIn("x-request-id", headers)
        self.assertIn("ratelimit-policy", seen[200])
        self.assertIn("retry-after", seen[429])
        self.assertIn("allow", seen[405])

    def test_http_responses_keep_their_spelling(self) -> None:
        r = self.gw.get("/api/v1/users/me", token=self.token)
        self.assertEqual(r.code, 200)
        self.assertIsNotNone(r.header("RateLimit-Policy"))


class IpcRequestHeaderCaseTests(SynchronousTestCase):
    """Request header names may come in any case on IPC, control methods included."""

    def test_subscribe_accepts_an_authorization_header_in_any_case(self) -> None:
        gw = MemoryGateway(test=self)
        ipc = MemoryIpc(gw)
        message = ipc.request("SUBSCRIBE", "user/admin/")
        message.any_payload.Pack(ApiRequest(method="SUBSCRIBE", path="user/admin/",
                                            headers={"AUTHORIZATION": f"Bearer {gw.token()}"}))
        ipc.send(message)
        _, response = ipc.recv()
        self.assertEqual((response.status, json.loads(response.body)),
                         (200, {"topic": "user/admin/", "subscribed": True}))
