"""BusClient against a real embedded broker with Curve, on 127.0.0.1."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import zmq
from twisted.internet import reactor as _reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredList, gatherResults
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from aico.bus import client as client_module
from aico.bus.broker import EmbeddedBroker
from aico.bus.client import BusClient, BusReactor, CurveClientKeys, Integration
from aico.bus.curve import CurveLayout, create_keypair, ensure_client, load_pair, load_public
from aico.bus.errors import BusError, BusStopped, BusTimeout
from aico.bus.interfaces import ATTR_CORRELATION_ID, ATTR_REPLY_TO, ATTR_STREAM, IMessageBus
from aico.gateway.testing.waiting import eventually, sleep
from aico.keystore import Keystore
from aico.proto import AicoMessage, ApiEvent, ApiRequest, ApiResponse, unpack, wrap

reactor = cast(Any, _reactor)


async def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    await eventually(predicate, timeout)


class BusHarness:
    """A broker in the test's temp dir, and admitted clients that are stopped on cleanup."""

    def __init__(self, case: TestCase, state_dir: Path | None = None,
                 keystore: Keystore | None = None) -> None:
        self.case = case
        self.keystore = keystore or Keystore.ephemeral()
        self.layout = CurveLayout(state_dir or Path(case.mktemp()), self.keystore)
        create_keypair(self.layout.root, "broker", self.keystore)
        self.layout.modules_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.broker = EmbeddedBroker(self.layout, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
        self.broker.start()
        case.addCleanup(self.broker.stop)

    def client(self, name: str, **kwargs: Any) -> BusClient:
        ensure_client(self.layout, name)
        return self.client_with(name, CurveClientKeys.from_layout(self.layout, name), **kwargs)

    def client_with(self, name: str, keys: CurveClientKeys, **kwargs: Any) -> BusClient:
        client = BusClient(
            cast(BusReactor, reactor),
            name,
            self.broker.pub_endpoint,
            self.broker.sub_endpoint,
            keys,
            **kwargs,
        )
        self.case.addCleanup(client.stop)
        return client

    def stranger_keys(self, name: str) -> tuple[CurveClientKeys, Path]:
        """Keys the broker does not know (made outside ``modules/``) and their public file."""
        public_file, secret_file = create_keypair(self.layout.state_dir / "strangers", name,
                                                  self.keystore)
        public, secret = load_pair(secret_file, self.keystore)
        return (
            CurveClientKeys(public, secret, load_public(self.layout.broker_public)),
            public_file,
        )

    def raw_socket(self, kind: int, name: str) -> zmq.Socket[bytes]:
        """A plain pyzmq socket with admitted Curve keys (closed on cleanup)."""
        ensure_client(self.layout, name)
        keys = CurveClientKeys.from_layout(self.layout, name)
        sock = zmq.Context.instance().socket(kind)
        sock.linger = 0
        sock.curve_publickey = keys.public
        sock.curve_secretkey = keys.secret
        sock.curve_serverkey = keys.server
        sock.connect(self.broker.pub_endpoint if kind == zmq.PUB else self.broker.sub_endpoint)
        self.case.addCleanup(sock.close)
        return sock


def event(text: str) -> AicoMessage:
    return wrap(ApiEvent(topic="t", body=text.encode()), "test")


def text_of(message: AicoMessage) -> str:
    return unpack(message, ApiEvent).body.decode()


class _ClientBehaviour:
    """Behaviour every reactor integration must show; mixed into one TestCase each."""

    integration: Integration
    timeout = 15

    def setUp(self) -> None:
        self.bus = BusHarness(cast(TestCase, self))

    async def pair(self) -> tuple[BusClient, BusClient]:
        caller = self.bus.client("caller", integration=self.integration)
        responder = self.bus.client("responder", integration=self.integration)
        await gatherResults([caller.start(), responder.start()])
        return caller, responder

    def test_client_provides_IMessageBus(self) -> None:
        client = self.bus.client("verify", integration=self.integration)
        self.assertTrue(verifyObject(IMessageBus, client))  # type: ignore[attr-defined]

    async def test_start_fires_only_after_probe_came_back_through_broker(self) -> None:
        caller, responder = await self.pair()
        seen: list[str] = []
        responder.subscribe("svc/", lambda t, m: seen.append(t))
        client = self.bus.client("late", integration=self.integration)
        started = client.start()
        self.assertFalse(started.called)  # needs a round trip through the broker
        await started
        self.assertTrue(client.running)
        # The reply topic is live the moment start() fired: a message sent to it right
        # away arrives (no slow-joiner loss).
        got: Deferred[AicoMessage] = client.request("nobody/", event("x"), timeout=2)
        reply = event("hello")
        reply.metadata.attributes[ATTR_CORRELATION_ID] = next(iter(client._pending))
        caller.publish(client.reply_topic, reply)
        self.assertEqual(text_of(await got), "hello")

    async def test_200_concurrent_requests_answered_in_shuffled_order_reach_their_callers(
        self,
    ) -> None:
        caller, responder = await self.pair()
        received: list[AicoMessage] = []
        all_in: Deferred[None] = Deferred()

        def collect(topic: str, message: AicoMessage) -> None:
            received.append(message)
            if len(received) == 200:
                all_in.callback(None)

        responder.subscribe("svc/echo", collect)
        # Wait until the responder's subscription has reached the caller's PUB.
        await self._until_delivered(caller, responder, "svc/echo")
        received.clear()
        requests = [caller.request("svc/echo", event(f"n{i}")) for i in range(200)]
        self.assertEqual(caller.pending, 200)
        await all_in
        random.shuffle(received)
        for message in received:
            responder.reply(message, event("re:" + text_of(message)))
        replies = await gatherResults(requests)
        self.assertEqual([text_of(r) for r in replies], [f"re:n{i}" for i in range(200)])
        self.assertEqual(caller.pending, 0)

    async def _until_delivered(self, caller: BusClient, responder: BusClient, topic: str) -> None:
        arrived: list[str] = []

        def mark(t: str, m: AicoMessage) -> None:
            arrived.append(t)

        responder.subscribe(topic, mark)
        try:
            while not arrived:
                caller.publish(topic, event("warm-up"))
                await sleep(0.02)
        finally:
            responder.unsubscribe(topic, mark)

    async def test_request_without_reply_fails_with_BusTimeout(self) -> None:
        caller, _ = await self.pair()
        d = caller.request("nobody/home", event("x"), timeout=0.1)
        error = await self.assertFailure(d, BusTimeout)  # type: ignore[attr-defined]
        self.assertEqual(error.topic, "nobody/home")
        self.assertEqual(caller.pending, 0)

    async def test_reply_arriving_after_timeout_is_dropped(self) -> None:
        caller, responder = await self.pair()
        held: list[AicoMessage] = []
        responder.subscribe("svc/slow", lambda t, m: held.append(m))
        await self._until_delivered(caller, responder, "svc/slow")
        held.clear()
        d = caller.request("svc/slow", event("x"), timeout=0.1)
        await self.assertFailure(d, BusTimeout)  # type: ignore[attr-defined]
        responder.reply(held[0], event("too late"))
        await sleep(0.05)  # nothing blows up; the late reply is ignored
        self.assertEqual(caller.pending, 0)

    async def test_cancelling_a_request_forgets_it(self) -> None:
        caller, _ = await self.pair()
        d = caller.request("nobody/home", event("x"), timeout=5)
        d.cancel()
        await self.assertFailure(d, CancelledError)  # type: ignore[attr-defined]
        self.assertEqual(caller.pending, 0)

    async def test_streamed_reply_delivers_chunks_then_end_and_each_chunk_restarts_timeout(
        self,
    ) -> None:
        caller, responder = await self.pair()

        async def stream(message: AicoMessage) -> None:
            if ATTR_REPLY_TO not in message.metadata.attributes:
                return  # a warm-up message
            self.assertEqual(message.metadata.attributes[ATTR_STREAM], "1")
            for i in range(4):
                await sleep(0.05)  # each gap < timeout, total > timeout
                responder.reply(message, event(f"c{i}"), stream="chunk")
            responder.reply(message, event("done"), stream="end")

        responder.subscribe("svc/stream", lambda t, m: Deferred.fromCoroutine(stream(m)))
        await self._until_delivered(caller, responder, "svc/stream")
        chunks: list[str] = []
        final = await caller.request(
            "svc/stream", event("go"), timeout=0.12, on_chunk=lambda m: chunks.append(text_of(m))
        )
        self.assertEqual(chunks, ["c0", "c1", "c2", "c3"])
        self.assertEqual(text_of(final), "done")
        self.assertEqual(final.metadata.attributes[ATTR_STREAM], "end")

    async def test_subscription_matches_by_prefix_with_several_handlers(self) -> None:
        caller, responder = await self.pair()
        first: list[str] = []
        second: list[str] = []
        h1 = lambda t, m: first.append(t)  # noqa: E731
        h2 = lambda t, m: second.append(t)  # noqa: E731
        responder.subscribe("news/", h1)
        responder.subscribe("news/", h2)
        await self._until_delivered(caller, responder, "news/")
        first.clear()
        second.clear()
        caller.publish("news/sport", event("a"))
        caller.publish("other/x", event("b"))
        await wait_for(lambda: len(first) == 1 and len(second) == 1)
        responder.unsubscribe("news/", h1)
        caller.publish("news/weather", event("c"))
        await wait_for(lambda: len(second) == 2)
        self.assertEqual(first, ["news/sport"])
        self.assertEqual(second, ["news/sport", "news/weather"])

    async def test_stop_fails_pending_requests_with_BusStopped(self) -> None:
        caller, _ = await self.pair()
        d = caller.request("nobody/home", event("x"), timeout=5)
        await caller.stop()
        await self.assertFailure(d, BusStopped)  # type: ignore[attr-defined]
        self.assertFalse(caller.running)
        failed = caller.request("nobody/home", event("x"))
        await self.assertFailure(failed, BusStopped)  # type: ignore[attr-defined]


class NativeClientTests(_ClientBehaviour, TestCase):
    integration = "native"


class TxZmqClientTests(_ClientBehaviour, TestCase):
    integration = "txzmq"


class ClientRobustnessTests(TestCase):
    timeout = 15

    def setUp(self) -> None:
        self.bus = BusHarness(self)

    async def test_malformed_frames_are_logged_and_dropped_without_crash(self) -> None:
        logged: list[str] = []

        def observe(e: dict[str, Any]) -> None:
            if e.get("log_namespace", "").startswith("aico.bus.client"):
                logged.append(str(e.get("log_format")))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        client = self.bus.client("victim")
        good: list[str] = []
        client.subscribe("t/", lambda t, m: good.append(text_of(m)))
        await client.start()
        raw = self.bus.raw_socket(zmq.PUB, "rogue")
        bad_frames: list[list[bytes]] = [
            [b"t/one-frame"],
            [b"t/three", b"frames", b"here"],
            [b"t/garbage", b"\xff\xff\xff not a protobuf"],
            [b"t/\xff\xfe", event("bad topic").SerializeToString()],
        ]
        while not good:
            for frames in bad_frames:
                raw.send_multipart(frames)
            raw.send_multipart([b"t/ok", event("fine").SerializeToString()])
            await sleep(0.02)
        self.assertEqual(set(good), {"fine"})
        self.assertEqual(self.flushLoggedErrors(), [])
        dropped = " ".join(logged)
        self.assertIn("malformed message", dropped)
        self.assertIn("non-UTF-8 topic", dropped)
        self.assertIn("undecodable message", dropped)
        # Still working afterwards.
        self.assertTrue(client.running)

    async def test_a_failing_handler_does_not_stop_other_handlers(self) -> None:
        client = self.bus.client("victim")
        seen: list[str] = []

        def boom(topic: str, message: AicoMessage) -> None:
            raise RuntimeError("handler bug")

        client.subscribe("t/", boom)
        client.subscribe("t/", lambda t, m: seen.append(t))
        await client.start()
        raw = self.bus.raw_socket(zmq.PUB, "sender")
        while not seen:
            raw.send_multipart([b"t/x", event("x").SerializeToString()])
            await sleep(0.02)
        self.assertTrue(self.flushLoggedErrors(RuntimeError))

    async def test_start_gives_up_with_BusTimeout_when_start_timeout_is_set(self) -> None:
        keys, _ = self.bus.stranger_keys("stranger")
        client = self.bus.client_with("stranger", keys, start_timeout=0.3)
        await self.assertFailure(client.start(), BusTimeout)
        self.assertFalse(client.running)

    async def test_wait_subscribed_confirms_new_subscriptions_and_hides_its_probes(self) -> None:
        client = self.bus.client("listener")
        await client.start()
        seen: list[str] = []
        client.subscribe("late/topic", lambda t, m: seen.append(t))
        await client.wait_subscribed(["late/topic"], timeout=3)
        self.assertEqual(seen, [])  # the probes never reach handlers
        with self.assertRaises(BusError):
            await client.wait_subscribed(["not/subscribed"])

    async def test_request_copies_message_and_sets_correlation_attributes(self) -> None:
        client = self.bus.client("caller")
        seen: list[AicoMessage] = []
        client.subscribe("svc/", lambda t, m: seen.append(m))
        await client.start()
        original = wrap(ApiRequest(method="GET", path="/x"), "caller")
        d = client.request("svc/x", original, timeout=2)
        await wait_for(lambda: bool(seen))
        attributes = seen[0].metadata.attributes
        self.assertEqual(attributes[ATTR_REPLY_TO], client.reply_topic)
        self.assertTrue(attributes[ATTR_CORRELATION_ID])
        self.assertNotIn(ATTR_STREAM, attributes)
        self.assertNotIn(ATTR_CORRELATION_ID, original.metadata.attributes)
        client.reply(seen[0], wrap(ApiResponse(status=204), "caller"))
        reply = await d
        self.assertEqual(unpack(reply, ApiResponse).status, 204)

    async def test_concurrent_requests_from_many_clients_stay_separate(self) -> None:
        responder = self.bus.client("responder")
        responder.subscribe("svc/who", lambda t, m: responder.reply(m, event("re:" + text_of(m))))
        callers = [self.bus.client(f"c{i}") for i in range(3)]
        await gatherResults([responder.start(), *(c.start() for c in callers)])
        results = await DeferredList(
            [c.request("svc/who", event(f"{c.source}:{n}"), timeout=3) for c in callers for n in range(20)],
            consumeErrors=True,
        )
        # Early requests may race the responder's subscription; every answer that came
        # back must belong to its own caller and number.
        answers = [text_of(r) for ok, r in results if ok]
        expected = [f"re:c{i}:{n}" for i in range(3) for n in range(20)]
        got = [text_of(r) if ok else None for ok, r in results]
        for have, want in zip(got, expected, strict=True):
            if have is not None:
                self.assertEqual(have, want)
        self.assertTrue(answers)

    async def test_a_zeromq_failure_on_send_is_a_BusError_from_publish_reply_and_request(self) -> None:
        client = self.bus.client("broken")
        await client.start()
        request = event("question")
        request.metadata.attributes[ATTR_REPLY_TO] = "reply/someone/1"
        request.metadata.attributes[ATTR_CORRELATION_ID] = "c-1"
        cast(Any, client._transport)._pub.close()  # every send now fails with ENOTSOCK
        with self.assertRaises(BusError) as raised:
            client.publish("t/x", event("x"))
        self.assertIsInstance(raised.exception.__cause__, zmq.ZMQError)
        self.assertIn("'t/x'", str(raised.exception))
        with self.assertRaises(BusError):
            client.reply(request, event("answer"))
        error = await self.assertFailure(client.request("svc/x", event("x")), BusError)
        self.assertNotIsInstance(error, BusStopped)
        self.assertEqual(client.pending, 0)
        self.assertTrue(client.running)

    async def test_start_probes_survive_a_send_that_fails_once(self) -> None:
        failures = [zmq.ZMQError(zmq.EAGAIN)]
        send = client_module._NativeTransport.send

        def flaky(transport: Any, frames: Any) -> None:
            if failures:
                raise failures.pop()
            send(transport, frames)

        self.patch(client_module._NativeTransport, "send", flaky)
        client = self.bus.client("flaky", start_timeout=10)
        await client.start()  # the first probe failed; the next ones got through
        self.assertEqual(failures, [])
        self.assertTrue(client.running)


class LocalServingTests(TestCase):
    """``serve_locally``: a module in the gateway's process answers the gateway's requests
    without four Curve hops through the broker; everyone else still goes through it."""

    timeout = 15

    def setUp(self) -> None:
        self.bus = BusHarness(self)

    async def _spy(self, gateway: BusClient) -> list[str]:
        """A second client on the broker that sees every ``svc/`` and ``reply/`` message."""
        spy = self.bus.client("spy")
        seen: list[str] = []
        spy.subscribe("svc/", lambda t, m: seen.append(t))
        spy.subscribe("reply/", lambda t, m: seen.append(t))
        await spy.start()
        while "svc/warm" not in seen:  # the spy's subscriptions reached the gateway's PUB
            gateway.publish("svc/warm", event("warm"))
            await sleep(0.02)
        seen.clear()
        return seen

    async def test_requests_to_a_local_topic_and_their_replies_never_reach_the_broker(self) -> None:
        gateway = self.bus.client("gateway")
        await gateway.start()
        gateway.subscribe("svc/local", lambda t, m: gateway.reply(m, event("re:" + text_of(m))))
        seen = await self._spy(gateway)

        gateway.serve_locally(["svc/local"])
        replies = await gatherResults([gateway.request("svc/local", event(f"n{i}"))
                                       for i in range(50)])
        self.assertEqual([text_of(r) for r in replies], [f"re:n{i}" for i in range(50)])
        await sleep(0.1)
        self.assertEqual(seen, [])  # nothing crossed the broker, not even the replies

        # Another client's request crosses the broker both ways (so the spy sees such
        # traffic), and without local serving the gateway's own request crosses it too.
        other = self.bus.client("other")
        await other.start()
        self.assertEqual(text_of(await other.request("svc/local", event("o"))), "re:o")
        await wait_for(lambda: "svc/local" in seen and f"{other.reply_topic}" in seen)
        seen.clear()
        gateway.stop_serving_locally(["svc/local"])
        self.assertEqual(gateway.local_topics, frozenset())
        self.assertEqual(text_of(await gateway.request("svc/local", event("w"))), "re:w")
        await wait_for(lambda: seen == ["svc/local"])

    async def test_local_delivery_waits_for_a_later_turn_and_keeps_the_order(self) -> None:
        gateway = self.bus.client("gateway")
        await gateway.start()
        order: list[str] = []
        gateway.subscribe("svc/local", lambda t, m: order.append(text_of(m)))
        gateway.serve_locally(["svc/local"])
        for i in range(5):
            gateway.request("svc/local", event(f"n{i}"), timeout=1).addErrback(lambda f: None)
        self.assertEqual(order, [])  # never nested inside request()
        await wait_for(lambda: len(order) == 5)
        self.assertEqual(order, [f"n{i}" for i in range(5)])

    async def test_a_stopped_client_refuses_local_requests_and_drops_queued_ones(self) -> None:
        gateway = self.bus.client("gateway")
        await gateway.start()
        handled: list[str] = []
        gateway.subscribe("svc/local", lambda t, m: handled.append(t))
        gateway.serve_locally(["svc/local"])
        queued = gateway.request("svc/local", event("x"), timeout=1)
        await gateway.stop()
        await self.assertFailure(queued, BusStopped)
        await self.assertFailure(gateway.request("svc/local", event("y")), BusStopped)
        await sleep(0.05)
        self.assertEqual(handled, [])

    async def test_a_module_on_the_gateways_client_serves_its_topics_locally_until_stopped(
            self) -> None:
        from tests.echomodule import Echo

        gateway = self.bus.client("gateway")
        await gateway.start()
        module = Echo(gateway, reactor)
        await module.start(heartbeat=False)
        self.assertEqual(gateway.local_topics, frozenset({"echo/say/v1", "echo/health/v1"}))
        seen = await self._spy(gateway)
        request = ApiRequest(method="POST", path="/api/v1/echo", body=b'{"text": "hi"}')
        request.principal.subject = "alice"
        answer = unpack(await gateway.request("echo/say/v1", wrap(request, "gateway")),
                        ApiResponse)
        self.assertEqual((answer.status, json.loads(answer.body)), (200, {"echo": "hi", "by": "alice"}))
        self.assertEqual(seen, [])
        await module.stop()
        self.assertEqual(gateway.local_topics, frozenset())
