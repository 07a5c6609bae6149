"""The module SDK and the built-in modules, through a real broker with Curve."""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.bus.builtin import BUILTIN_MODULES
from aico.bus.builtin.conversation import ConversationModule
from aico.bus.builtin.health import HealthModule
from aico.bus.client import BusClient
from aico.bus.directory import ModuleDirectory
from aico.bus.errors import BusStopped, BusTimeout
from aico.bus.interfaces import (
    ATTR_CORRELATION_ID,
    ATTR_REPLY_TO,
    ATTR_STREAM,
    TOPIC_DISCOVER,
    TOPIC_HEARTBEAT,
    TOPIC_REGISTERED,
)
from aico.bus.module import (
    BackendModule,
    ProblemError,
    RequestContext,
    Response,
    RouteSpec,
    route,
)
from aico.bus.runner import RunnerError, bus_endpoints
from aico.bus.testing import MemoryBroker, MemoryBus
from aico.keystore import TEST_KDF, state_keystore
from aico.proto import (
    AicoMessage,
    ApiRequest,
    ApiResponse,
    ModuleHeartbeat,
    ModuleRegistration,
    unpack,
    wrap,
)
from tests.test_bus_client import BusHarness, reactor, wait_for

ECHO_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string"}},
    "required": ["text"],
    "additionalProperties": False,
}


class EchoModule(BackendModule):
    name = "echo"
    version = "1.0.0"
    heartbeat_interval = 1.0
    health_topic = "echo/health/v1"

    @route(
        "POST",
        "/api/v1/echo",
        topic="echo/say/v1",
        capability="echo:write",
        request_schema=ECHO_SCHEMA,
    )
    async def say(self, request: ApiRequest, ctx: RequestContext) -> Response:
        return Response(200, {"echo": ctx.json()["text"]})

    @route("GET", "/api/v1/echo/boom", topic="echo/boom/v1")
    def boom(self, request: ApiRequest, ctx: RequestContext) -> Response:
        raise RuntimeError("secret internals /etc/passwd")

    @route("GET", "/api/v1/echo/later", topic="echo/later/v1", public=True)
    def later(self, request: ApiRequest, ctx: RequestContext) -> Deferred[Response]:
        return deferLater(reactor, 0.01, lambda: Response(201, {"later": True}))

    @route("GET", "/api/v1/echo/forbidden", topic="echo/forbidden/v1")
    async def forbidden(self, request: ApiRequest, ctx: RequestContext) -> Response:
        raise ProblemError(403, "forbidden", "Not for you.")

    @route("GET", "/api/v1/echo/count", topic="echo/count/v1")
    async def count(self, request: ApiRequest, ctx: RequestContext) -> Any:
        if not ctx.streaming:
            return {"all": [0, 1, 2]}
        for i in range(3):
            await deferLater(reactor, 0.001, lambda: None)
            ctx.send_chunk({"i": i}, headers={"content-type": "application/x-ndjson"})
        return None

    @route("GET", "/api/v1/echo/unjsonable", topic="echo/unjsonable/v1")
    async def unjsonable(self, request: ApiRequest, ctx: RequestContext) -> Response:
        return Response(200, {"when": object()})

    @route("GET", "/admin/settings", topic="echo/admin/v1", admin=True)
    async def settings(self, request: ApiRequest, ctx: RequestContext) -> dict[str, Any]:
        return {"settings": {}}


def api_request(method: str, path: str, body: Any = None, **query: str) -> AicoMessage:
    return wrap(
        ApiRequest(
            request_id=uuid.uuid4().hex,
            method=method,
            path=path,
            body=b"" if body is None else json.dumps(body).encode(),
            query=query,
        ),
        "gateway",
    )


def response_of(message: AicoMessage) -> tuple[int, Any, dict[str, str]]:
    response = unpack(message, ApiResponse)
    body = json.loads(response.body) if response.body else None
    return response.status, body, dict(response.headers)


class _ModuleOnBus:
    timeout = 15

    async def start_module(self, factory: Any, name: str) -> tuple[BusClient, BackendModule]:
        self.bus = BusHarness(cast(TestCase, self))
        self.gateway = self.bus.client("gateway")
        self.directory = ModuleDirectory(self.gateway, cast(Any, reactor))
        self.directory.subscribe()
        await self.gateway.start()
        await self.directory.start()
        cast(TestCase, self).addCleanup(self.directory.stop)
        module = factory(self.bus.client(name), cast(Any, reactor))
        cast(TestCase, self).addCleanup(module.stop)
        await module.start()
        await wait_for(lambda: name in self.directory.modules)
        return self.gateway, module


class ModuleSdkTests(_ModuleOnBus, TestCase):
    async def test_registration_reaches_the_directory_with_routes_schemas_and_health(self) -> None:
        await self.start_module(EchoModule, "echo")
        info = self.directory.modules["echo"]
        self.assertTrue(info.alive)
        self.assertEqual(info.version, "1.0.0")
        self.assertEqual(info.heartbeat_interval, 1.0)
        self.assertEqual(info.health_topic, "echo/health/v1")
        routes = {r.path: r for r in info.routes}
        say = routes["/api/v1/echo"]
        self.assertEqual((say.method, say.topic, say.capability), ("POST", "echo/say/v1", "echo:write"))
        self.assertEqual(json.loads(say.request_schema), ECHO_SCHEMA)
        self.assertTrue(routes["/api/v1/echo/later"].public)
        self.assertEqual([r.path for r in info.admin_routes], ["/admin/settings"])
        self.assertNotIn("/admin/settings", routes)

    async def test_request_is_answered_on_reply_to_with_its_correlation_id(self) -> None:
        gateway, _ = await self.start_module(EchoModule, "echo")
        request = api_request("POST", "/api/v1/echo", {"text": "hi"})
        reply = await gateway.request("echo/say/v1", request, timeout=3)
        self.assertTrue(reply.metadata.attributes[ATTR_CORRELATION_ID])
        self.assertNotIn(ATTR_STREAM, reply.metadata.attributes)
        status, body, headers = response_of(reply)
        self.assertEqual((status, body), (200, {"echo": "hi"}))
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(unpack(reply, ApiResponse).request_id, unpack(request, ApiRequest).request_id)

    async def test_deferred_returning_handler_is_answered(self) -> None:
        gateway, _ = await self.start_module(EchoModule, "echo")
        reply = await gateway.request("echo/later/v1", api_request("GET", "/api/v1/echo/later"))
        self.assertEqual(response_of(reply)[:2], (201, {"later": True}))

    async def test_handler_exception_becomes_500_problem_without_internals(self) -> None:
        gateway, _ = await self.start_module(EchoModule, "echo")
        reply = await gateway.request("echo/boom/v1", api_request("GET", "/api/v1/echo/boom"))
        status, body, headers = response_of(reply)
        self.assertEqual(status, 500)
        self.assertEqual(headers["content-type"], "application/problem+json")
        self.assertEqual(body["code"], "internal_error")
        self.assertEqual(body["status"], 500)
        self.assertLessEqual({"type", "title", "status", "detail", "code"}, set(body))
        self.assertNotIn("secret", json.dumps(body))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # logged with traceback

    async def test_result_that_cannot_be_serialised_becomes_500(self) -> None:
        gateway, _ = await self.start_module(EchoModule, "echo")
        reply = await gateway.request("echo/unjsonable/v1", api_request("GET", "/x"))
        status, body, _ = response_of(reply)
        self.assertEqual((status, body["code"]), (500, "internal_error"))
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    async def test_problem_error_gives_its_status_and_code(self) -> None:
        gateway, _ = await self.start_module(EchoModule, "echo")
        reply = await gateway.request("echo/forbidden/v1", api_request("GET", "/api/v1/echo/forbidden"))
        status, body, _ = response_of(reply)
        self.assertEqual((status, body["code"], body["detail"]), (403, "forbidden", "Not for you."))

    async def test_wrong_method_on_a_route_topic_gives_405(self) -> None:
        gateway, _ = await self.start_module(EchoModule, "echo")
        reply = await gateway.request("echo/say/v1", api_request("DELETE", "/api/v1/echo"))
        status, body, _ = response_of(reply)
        self.assertEqual((status, body["code"]), (405, "method_not_allowed"))

    async def test_sdk_answers_health_with_200_ok(self) -> None:
        gateway, _ = await self.start_module(EchoModule, "echo")
        reply = await gateway.request("echo/health/v1", api_request("GET", "/health"))
        status, body, _ = response_of(reply)
        self.assertEqual(status, 200)
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["module"], "echo")

    async def test_streamed_reply_sends_json_chunks_then_end(self) -> None:
        gateway, _ = await self.start_module(EchoModule, "echo")
        chunks: list[AicoMessage] = []
        end = await gateway.request(
            "echo/count/v1", api_request("GET", "/api/v1/echo/count"), on_chunk=chunks.append
        )
        self.assertEqual([response_of(c)[1] for c in chunks], [{"i": 0}, {"i": 1}, {"i": 2}])
        self.assertEqual(response_of(chunks[0])[0], 200)
        self.assertEqual(response_of(chunks[0])[2]["content-type"], "application/x-ndjson")
        self.assertTrue(all(c.metadata.attributes[ATTR_STREAM] == "chunk" for c in chunks))
        self.assertEqual(end.metadata.attributes[ATTR_STREAM], "end")
        self.assertEqual(response_of(end)[:2], (200, None))

    async def test_without_accepting_a_stream_the_reply_is_single(self) -> None:
        gateway, _ = await self.start_module(EchoModule, "echo")
        reply = await gateway.request("echo/count/v1", api_request("GET", "/api/v1/echo/count"))
        self.assertEqual(response_of(reply)[:2], (200, {"all": [0, 1, 2]}))

    async def test_module_registers_again_on_discover(self) -> None:
        await self.start_module(EchoModule, "echo")
        first = self.directory.modules["echo"].registered_at
        seen: list[str] = []
        self.directory.add_observer(lambda e, i: seen.append(e))
        self.directory.discover()
        await wait_for(lambda: "registered" in seen)
        self.assertGreaterEqual(self.directory.modules["echo"].registered_at, first)

    async def test_module_sharing_a_running_bus_leaves_it_running(self) -> None:
        gateway, _ = await self.start_module(HealthModule, "health")
        shared = EchoModule(gateway, cast(Any, reactor))
        await shared.start()
        reply = await gateway.request("echo/say/v1", api_request("POST", "/x", {"text": "s"}))
        self.assertEqual(response_of(reply)[1], {"echo": "s"})
        await shared.stop()
        self.assertTrue(gateway.running)


class BuiltinModuleTests(_ModuleOnBus, TestCase):
    def test_builtin_registry_offers_conversation_and_health(self) -> None:
        self.assertEqual(set(BUILTIN_MODULES), {"conversation", "health"})

    async def test_conversation_registers_its_route_and_schemas(self) -> None:
        await self.start_module(ConversationModule, "conversation")
        info = self.directory.modules["conversation"]
        (r,) = info.routes
        self.assertEqual(
            (r.method, r.path, r.topic, r.capability),
            (
                "POST",
                "/api/v1/conversations/messages",
                "conversation/user/input/v1",
                "conversations:write",
            ),
        )
        schema = json.loads(r.request_schema)
        self.assertFalse(schema["additionalProperties"])
        self.assertEqual(schema["properties"]["message"]["maxLength"], 16000)
        self.assertEqual(schema["required"], ["message"])
        self.assertIn("reply", json.loads(r.response_schema)["required"])
        self.assertEqual(info.health_topic, "conversation/health/v1")

    async def test_conversation_echoes_the_message_with_ids(self) -> None:
        gateway, _ = await self.start_module(ConversationModule, "conversation")
        topic = "conversation/user/input/v1"
        path = "/api/v1/conversations/messages"
        reply = await gateway.request(topic, api_request("POST", path, {"message": "hello there"}))
        status, body, _ = response_of(reply)
        self.assertEqual(status, 200)
        self.assertEqual(body["reply"], "hello there")
        self.assertTrue(body["conversation_id"] and body["message_id"])
        reply = await gateway.request(
            topic, api_request("POST", path, {"message": "again", "conversation_id": "c-1"})
        )
        self.assertEqual(response_of(reply)[1]["conversation_id"], "c-1")

    async def test_conversation_streams_word_by_word_when_accepted_and_asked(self) -> None:
        gateway, _ = await self.start_module(ConversationModule, "conversation")
        chunks: list[AicoMessage] = []
        end = await gateway.request(
            "conversation/user/input/v1",
            api_request(
                "POST",
                "/api/v1/conversations/messages",
                {"message": "one two three", "conversation_id": "c-9"},
                stream="true",
            ),
            on_chunk=chunks.append,
        )
        objects = [response_of(c)[1] for c in chunks]
        self.assertEqual("".join(o["delta"] for o in objects[:-1]), "one two three")
        self.assertEqual(len(objects), 4)
        self.assertEqual(objects[-1]["done"], True)
        self.assertEqual(objects[-1]["conversation_id"], "c-9")
        self.assertEqual(end.metadata.attributes[ATTR_STREAM], "end")

    async def test_conversation_does_not_stream_without_the_query_flag(self) -> None:
        gateway, _ = await self.start_module(ConversationModule, "conversation")
        chunks: list[AicoMessage] = []
        reply = await gateway.request(
            "conversation/user/input/v1",
            api_request("POST", "/api/v1/conversations/messages", {"message": "hi"}),
            on_chunk=chunks.append,
        )
        self.assertEqual(chunks, [])
        self.assertEqual(response_of(reply)[1]["reply"], "hi")

    async def test_conversation_rejects_a_body_without_message(self) -> None:
        gateway, _ = await self.start_module(ConversationModule, "conversation")
        reply = await gateway.request(
            "conversation/user/input/v1",
            api_request("POST", "/api/v1/conversations/messages", {"nope": 1}),
        )
        status, body, _ = response_of(reply)
        self.assertEqual((status, body["code"]), (400, "validation_failed"))

    async def test_health_module_answers_status_uptime_and_pid(self) -> None:
        gateway, _ = await self.start_module(HealthModule, "health")
        self.assertEqual(list(self.directory.modules["health"].routes), [])
        reply = await gateway.request("system/health/v1", api_request("GET", "/health"))
        status, body, _ = response_of(reply)
        self.assertEqual(status, 200)
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["pid"], os.getpid())
        self.assertGreaterEqual(body["uptime_s"], 0)


class ModuleOnClockTests(SynchronousTestCase):
    """The SDK's timing, synchronously on an in-memory bus and a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = MemoryBus(self.clock, "echo")
        self.module = EchoModule(self.bus, self.clock)
        self.successResultOf(self.module.start())
        self.addCleanup(self.module.stop)

    def test_registers_on_start_and_heartbeats_every_interval(self) -> None:
        self.assertEqual(self.bus.count(TOPIC_REGISTERED), 1)
        self.assertEqual(self.bus.count(TOPIC_HEARTBEAT), 0)
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        self.assertEqual(self.bus.count(TOPIC_HEARTBEAT), 2)
        beat = next(m for t, m in self.bus.published if t == TOPIC_HEARTBEAT)
        self.assertEqual(unpack(beat, ModuleHeartbeat).name, "echo")

    def test_registers_again_when_asked_to_discover(self) -> None:
        self.bus.publish(TOPIC_DISCOVER, wrap(ModuleHeartbeat(name="gateway"), "gateway"))
        self.assertEqual(self.bus.count(TOPIC_REGISTERED), 2)
        registration = unpack(self.bus.published[-1][1], ModuleRegistration)
        self.assertEqual(registration.heartbeat_interval_ms, 1000)

    def test_stop_ends_heartbeats(self) -> None:
        self.successResultOf(self.module.stop())
        self.clock.advance(10)
        self.assertEqual(self.bus.count(TOPIC_HEARTBEAT), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_request_without_reply_to_is_dropped(self) -> None:
        before = len(self.bus.published)
        self.bus.publish("echo/say/v1", api_request("POST", "/api/v1/echo", {"text": "x"}))
        self.assertEqual(len(self.bus.published), before + 1)  # only the request itself

    def test_route_spec_to_proto_carries_schema_text(self) -> None:
        spec = RouteSpec("get", "/a/{id}", "a/v1", "a:read", True, {"type": "object"}, None)
        proto = spec.to_proto()
        self.assertEqual((proto.method, proto.public, proto.response_schema), ("GET", True, ""))
        self.assertEqual(json.loads(proto.request_schema), {"type": "object"})

    def test_reply_carries_correlation_id_to_reply_to(self) -> None:
        replies: list[AicoMessage] = []
        self.bus.subscribe("reply/x", lambda t, m: replies.append(m))
        request = api_request("POST", "/api/v1/echo", {"text": "sync"})
        request.metadata.attributes[ATTR_REPLY_TO] = "reply/x"
        request.metadata.attributes[ATTR_CORRELATION_ID] = "c-42"
        self.bus.publish("echo/say/v1", request)
        (reply,) = replies
        self.assertEqual(reply.metadata.attributes[ATTR_CORRELATION_ID], "c-42")
        self.assertEqual(response_of(reply)[1], {"echo": "sync"})


    def flaky_publish(self, error: Exception) -> list[Exception]:
        """Make the bus's next heartbeat publish raise *error* (once)."""
        publish = self.bus.publish
        errors = [error]

        def flaky(topic: str, message: AicoMessage) -> None:
            if topic == TOPIC_HEARTBEAT and errors:
                raise errors.pop()
            publish(topic, message)

        self.patch(self.bus, "publish", flaky)
        return errors

    def test_heartbeat_loop_survives_a_publish_that_raises_anything(self) -> None:
        left = self.flaky_publish(RuntimeError("bus bug"))
        self.clock.advance(1.0)  # this beat raises: logged with its traceback
        self.assertEqual(left, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.bus.count(TOPIC_HEARTBEAT), 0)
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        self.assertEqual(self.bus.count(TOPIC_HEARTBEAT), 2)

    def test_heartbeat_loop_survives_a_bus_error_with_a_warning(self) -> None:
        self.flaky_publish(BusStopped())
        self.clock.advance(1.0)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.clock.advance(1.0)
        self.assertEqual(self.bus.count(TOPIC_HEARTBEAT), 1)

    def test_beat_publishes_one_heartbeat_while_running_and_nothing_otherwise(self) -> None:
        self.assertTrue(self.module.beat())
        self.assertEqual(self.bus.count(TOPIC_HEARTBEAT), 1)
        self.flaky_publish(RuntimeError("bus bug"))
        self.assertFalse(self.module.beat())  # never raises
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.successResultOf(self.module.stop())
        self.assertFalse(self.module.beat())
        self.assertEqual(self.bus.count(TOPIC_HEARTBEAT), 1)

    def test_start_without_heartbeat_leaves_the_beats_to_the_host(self) -> None:
        clock = Clock()
        bus = MemoryBus(clock, "hosted")
        module = EchoModule(bus, clock)
        self.successResultOf(module.start(heartbeat=False))
        self.addCleanup(module.stop)
        self.assertEqual(bus.count(TOPIC_REGISTERED), 1)
        registration = unpack(bus.published[0][1], ModuleRegistration)
        self.assertEqual(registration.heartbeat_interval_ms, 1000)  # still announced
        self.assertEqual(clock.getDelayedCalls(), [])  # no LoopingCall of its own
        clock.advance(10)
        self.assertEqual(bus.count(TOPIC_HEARTBEAT), 0)
        self.assertTrue(module.beat())  # the host's periodic job
        self.assertEqual(bus.count(TOPIC_HEARTBEAT), 1)


class ModuleOnMemoryBrokerTests(SynchronousTestCase):
    """A gateway bus and a module bus on one MemoryBroker talk as over ZeroMQ, on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        broker = MemoryBroker()
        self.gateway = MemoryBus(self.clock, "gateway", broker=broker)
        self.directory = ModuleDirectory(self.gateway, self.clock)
        self.directory.subscribe()
        self.successResultOf(self.gateway.start())
        self.successResultOf(self.directory.start())
        self.addCleanup(self.gateway.stop)
        self.addCleanup(self.directory.stop)
        self.module = EchoModule(MemoryBus(self.clock, "echo", broker=broker), self.clock)
        self.successResultOf(self.module.start())
        self.addCleanup(self.module.stop)

    def test_registration_heartbeats_and_drop_reach_the_directory(self) -> None:
        info = self.directory.modules["echo"]
        self.assertTrue(info.alive)
        self.assertEqual(info.version, "1.0.0")
        self.clock.pump([1.0] * 10)  # heartbeats every second keep it alive
        self.assertTrue(self.directory.modules["echo"].alive)
        self.assertEqual(self.directory.modules["echo"].last_seen, 10)
        self.successResultOf(self.module.stop())
        self.clock.pump([1.0] * 3)
        self.assertFalse(self.directory.modules["echo"].alive)

    def test_module_registers_again_when_the_gateway_asks(self) -> None:
        self.clock.advance(5)
        self.directory.discover()
        self.assertEqual(self.directory.modules["echo"].registered_at, 5)

    def test_requests_from_the_gateway_are_answered_on_the_clock(self) -> None:
        reply = self.successResultOf(
            self.gateway.request("echo/say/v1", api_request("POST", "/api/v1/echo", {"text": "hi"}))
        )
        self.assertEqual(response_of(reply)[:2], (200, {"echo": "hi"}))
        self.assertEqual(reply.metadata.source, "echo")
        reply = self.successResultOf(
            self.gateway.request("echo/forbidden/v1", api_request("GET", "/api/v1/echo/forbidden"))
        )
        self.assertEqual(response_of(reply)[1]["code"], "forbidden")
        reply = self.successResultOf(
            self.gateway.request("echo/health/v1", api_request("GET", "/health"))
        )
        self.assertEqual(response_of(reply)[1]["module"], "echo")
        self.assertEqual(self.gateway.pending, 0)

    def test_a_route_naming_several_topics_is_answered_on_each(self) -> None:
        class Fan(BackendModule):
            name = "fan"
            version = "1"

            @route("GET", "/api/v1/fan", topic="fan/a, fan/b", public=True)
            def both(self, request: ApiRequest, ctx: RequestContext) -> Any:
                return {"ok": True}

        fan = Fan(MemoryBus(self.clock, "fan", broker=self.gateway.broker), self.clock)
        self.successResultOf(fan.start())
        self.addCleanup(fan.stop)
        for topic in ("fan/a", "fan/b"):
            reply = self.successResultOf(
                self.gateway.request(topic, api_request("GET", "/api/v1/fan")))
            self.assertEqual(response_of(reply)[:2], (200, {"ok": True}))

    def test_a_request_to_a_stopped_module_times_out_on_the_clock(self) -> None:
        self.successResultOf(self.module.stop())
        d = self.gateway.request("echo/say/v1", api_request("POST", "/x", {"text": "x"}), timeout=2)
        self.assertNoResult(d)
        self.clock.advance(2)
        self.failureResultOf(d, BusTimeout)


class _Exit(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.err = b""

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self.ended.callback(None)


class RunnerTests(TestCase):
    timeout = 20

    def test_endpoints_come_from_ports_json_unless_given(self) -> None:
        state = Path(self.mktemp())
        state.mkdir()
        self.assertRaises(RunnerError, bus_endpoints, state, None, None)
        (state / "ports.json").write_text(json.dumps({"bus": {"pub": "tcp://a:1", "sub": "b"}}))
        self.assertEqual(bus_endpoints(state, None, None), ("tcp://a:1", "b"))
        self.assertEqual(bus_endpoints(state, "p", None), ("p", "b"))
        self.assertEqual(bus_endpoints(state, "p", "s"), ("p", "s"))

    async def test_module_runs_as_a_process_registers_and_exits_0_on_sigterm(self) -> None:
        # A state directory's own keystore (master-key file): the runner, another process,
        # finds the master secret as the gateway does and opens its sealed Curve key.
        state = Path(self.mktemp())
        state.mkdir(mode=0o700)
        keystore = state_keystore(state, create=True, kdf=TEST_KDF, env={"AICO_NO_KEYRING": "1"})
        bus = BusHarness(self, state, keystore)
        ports = {"bus": {"pub": bus.broker.pub_endpoint, "sub": bus.broker.sub_endpoint}}
        (bus.layout.state_dir / "ports.json").write_text(json.dumps(ports))
        gateway = bus.client("gateway")
        directory = ModuleDirectory(gateway, cast(Any, reactor))
        directory.subscribe()
        await gateway.start()
        self.addCleanup(directory.stop)
        exit = _Exit()
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent),
                   AICO_NO_KEYRING="1")
        env.pop("AICO_MASTER_PASSWORD", None)
        process = reactor.spawnProcess(
            exit,
            sys.executable,
            [
                sys.executable,
                "-m",
                "aico.bus.runner",
                "health",
                "--state-dir",
                str(bus.layout.state_dir),
            ],
            env=env,
        )
        try:
            await wait_for(lambda: "health" in directory.modules, timeout=10)
        finally:
            process.signalProcess(signal.SIGTERM)
        await exit.ended
        assert exit.reason is not None
        self.assertTrue(exit.reason.check(ProcessDone), exit.err.decode(errors="replace"))
        self.assertEqual(directory.modules["health"].health_topic, "system/health/v1")


class Stepper(BackendModule):
    """Handlers that await Deferreds the test fires, to step a coroutine by hand."""

    name = "stepper"
    version = "1.0.0"
    heartbeat_interval = 0

    def __init__(self, bus: Any, clock: Any) -> None:
        super().__init__(bus, clock)
        self.gates: list[Deferred[Any]] = []

    def gate(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.gates.append(d)
        return d

    @route("GET", "/api/v1/step/now", topic="step/now/v1", public=True)
    async def now(self, request: ApiRequest, ctx: RequestContext) -> Response:
        return Response(200, {"now": True})

    @route("GET", "/api/v1/step/twice", topic="step/twice/v1", public=True)
    async def twice(self, request: ApiRequest, ctx: RequestContext) -> Response:
        first = await self.gate()
        try:
            await self.gate()
        except KeyError as e:  # a failure of the awaited Deferred is raised here
            second = f"caught {e.args[0]}"
        return Response(200, {"first": first, "second": second})

    @route("GET", "/api/v1/step/raise", topic="step/raise/v1", public=True)
    async def raises_after_await(self, request: ApiRequest, ctx: RequestContext) -> Response:
        await self.gate()
        raise RuntimeError("internal detail")


class HandlerSteppingTests(SynchronousTestCase):
    """A coroutine handler runs its first step at once: one that never awaits is answered
    without any Deferred; one that awaits is driven on by Twisted with every value and
    exception passed through (aico.bus.module._resume)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = MemoryBus(self.clock, "stepper")
        self.module = Stepper(self.bus, self.clock)
        self.successResultOf(self.module.start())
        self.replies: list[AicoMessage] = []
        self.bus.subscribe("reply/s", lambda t, m: self.replies.append(m))

    def ask(self, topic: str, path: str) -> None:
        request = api_request("GET", path)
        request.metadata.attributes[ATTR_REPLY_TO] = "reply/s"
        request.metadata.attributes[ATTR_CORRELATION_ID] = "c"
        self.bus.publish(topic, request)

    def test_a_handler_that_never_awaits_is_answered_without_a_deferred(self) -> None:
        made: list[object] = []
        original = Deferred.__init__

        def counting(d: Deferred[Any], *a: Any, **k: Any) -> None:
            made.append(d)
            original(d, *a, **k)

        self.patch(Deferred, "__init__", counting)
        self.ask("step/now/v1", "/api/v1/step/now")
        self.assertEqual(made, [])
        self.assertEqual(response_of(self.replies[0])[:2], (200, {"now": True}))

    def test_values_and_failures_of_awaited_deferreds_reach_the_handler(self) -> None:
        self.ask("step/twice/v1", "/api/v1/step/twice")
        self.assertEqual(self.replies, [])
        self.module.gates[0].callback("one")
        self.assertEqual(self.replies, [])
        self.module.gates[1].errback(KeyError("two"))
        self.assertEqual(response_of(self.replies[0])[:2],
                         (200, {"first": "one", "second": "caught two"}))

    def test_an_exception_after_an_await_is_a_500_problem_without_internals(self) -> None:
        self.ask("step/raise/v1", "/api/v1/step/raise")
        self.module.gates[0].callback(None)
        status, body, _ = response_of(self.replies[0])
        self.assertEqual((status, body["code"]), (500, "internal_error"))
        self.assertNotIn("internal detail", json.dumps(body))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
