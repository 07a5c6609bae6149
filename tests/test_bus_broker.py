"""The embedded broker: loopback binding, Curve + ZAP admission, clean shutdown."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, cast

import zmq
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.bus.broker import EmbeddedBroker, is_loopback_endpoint
from aico.bus.curve import CurveLayout, create_keypair
from aico.bus.directory import ModuleDirectory
from aico.bus.errors import BrokerBindError
from aico.bus.interfaces import TOPIC_REGISTERED
from aico.bus.zap import ModuleKeyStore
from aico.keystore import Keystore
from aico.proto import ModuleRegistration, Route, wrap
from tests.test_bus_client import BusHarness, event, reactor, sleep, text_of, wait_for


def _layout(case: SynchronousTestCase) -> CurveLayout:
    layout = CurveLayout(Path(case.mktemp()), Keystore.ephemeral())
    create_keypair(layout.root, "broker", layout.sealer)
    return layout


class BrokerLifecycleTests(SynchronousTestCase):
    def test_star_port_binds_a_free_port_and_exposes_the_bound_endpoints(self) -> None:
        broker = EmbeddedBroker(_layout(self), "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
        broker.start()
        self.addCleanup(broker.stop)
        for endpoint in (broker.pub_endpoint, broker.sub_endpoint):
            self.assertTrue(endpoint.startswith("tcp://127.0.0.1:"))
            self.assertGreater(int(endpoint.rsplit(":", 1)[1]), 0)
        self.assertNotEqual(broker.pub_endpoint, broker.sub_endpoint)

    def test_bind_failure_raises_BrokerBindError_naming_the_address(self) -> None:
        first = EmbeddedBroker(_layout(self), "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
        first.start()
        self.addCleanup(first.stop)
        taken = first.pub_endpoint
        second = EmbeddedBroker(_layout(self), "tcp://127.0.0.1:*", taken)
        error = self.assertRaises(BrokerBindError, second.start)
        self.assertEqual(error.address, taken)
        self.assertIn(taken, str(error))
        self.assertFalse(second.running)

    def test_non_loopback_address_is_refused(self) -> None:
        broker = EmbeddedBroker(_layout(self), "tcp://0.0.0.0:*", "tcp://127.0.0.1:*")
        error = self.assertRaises(BrokerBindError, broker.start)
        self.assertIn("tcp://0.0.0.0:*", str(error))
        self.assertIn("loopback", str(error))

    def test_loopback_endpoint_check(self) -> None:
        for ok in ("tcp://127.0.0.1:5555", "tcp://[::1]:*", "tcp://localhost:1", "ipc:///tmp/x"):
            self.assertTrue(is_loopback_endpoint(ok), ok)
        for bad in ("tcp://*:5555", "tcp://0.0.0.0:1", "tcp://10.0.0.1:1", "udp://127.0.0.1:1"):
            self.assertFalse(is_loopback_endpoint(bad), bad)

    def test_stop_terminates_the_proxy_and_joins_its_threads(self) -> None:
        broker = EmbeddedBroker(_layout(self), "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
        broker.start()
        names = {t.name for t in threading.enumerate()}
        self.assertIn("aico-bus-broker", names)
        self.assertIn("aico-bus-zap", names)
        broker.stop()
        names = {t.name for t in threading.enumerate()}
        self.assertNotIn("aico-bus-broker", names)
        self.assertNotIn("aico-bus-zap", names)
        self.assertFalse(broker.running)
        broker.stop()  # idempotent

    def test_key_store_rereads_the_directory_when_a_key_is_added(self) -> None:
        layout = _layout(self)
        store = ModuleKeyStore(layout.modules_dir)
        public_file, _ = create_keypair(layout.state_dir / "elsewhere", "late", layout.sealer)
        public = public_file.read_text()
        key = next(line.split('"')[1] for line in public.splitlines() if "public-key" in line).encode()
        self.assertIsNone(store.lookup(key))
        layout.modules_dir.mkdir(parents=True, exist_ok=True)
        (layout.modules_dir / "late.key").write_text(public)
        self.assertEqual(store.lookup(key), "late")


class ZapAdmissionTests(TestCase):
    timeout = 15

    def setUp(self) -> None:
        self.bus = BusHarness(self)

    def _raw(self, kind: int, public: bytes, secret: bytes) -> zmq.Socket[bytes]:
        from aico.bus.curve import load_public

        sock = zmq.Context.instance().socket(kind)
        sock.linger = 0
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_serverkey = load_public(self.bus.layout.broker_public)
        sock.connect(self.bus.broker.pub_endpoint if kind == zmq.PUB else self.bus.broker.sub_endpoint)
        self.addCleanup(sock.close)
        return sock

    async def test_client_with_unknown_key_receives_nothing(self) -> None:
        keys, _ = self.bus.stranger_keys("eavesdropper")
        spy = self._raw(zmq.SUB, keys.public, keys.secret)
        spy.subscribe(b"")
        insider = self.bus.client("insider")
        got: list[str] = []
        insider.subscribe("news/", lambda t, m: got.append(text_of(m)))
        await insider.start()
        for _ in range(15):
            insider.publish("news/x", event("secret"))
            await sleep(0.02)
        self.assertTrue(got)  # the admitted client does receive
        self.assertEqual(spy.poll(0), 0)  # the stranger received nothing at all

    async def test_client_with_unknown_key_cannot_register_a_route(self) -> None:
        gateway = self.bus.client("gateway")
        directory = ModuleDirectory(gateway, cast(Any, reactor))
        directory.subscribe()
        await gateway.start()
        keys, _ = self.bus.stranger_keys("intruder")
        intruder = self._raw(zmq.PUB, keys.public, keys.secret)
        bogus = wrap(
            ModuleRegistration(
                name="intruder",
                routes=[Route(method="GET", path="/api/v1/steal", topic="x/v1", public=True)],
                heartbeat_interval_ms=1000,
            ),
            "intruder",
        ).SerializeToString()
        legit = self.bus.raw_socket(zmq.PUB, "legit")
        good = wrap(ModuleRegistration(name="legit"), "legit").SerializeToString()
        for _ in range(20):
            intruder.send_multipart([TOPIC_REGISTERED.encode(), bogus])
            legit.send_multipart([TOPIC_REGISTERED.encode(), good])
            await sleep(0.02)
        self.assertIn("legit", directory.modules)  # the path works for admitted keys
        self.assertNotIn("intruder", directory.modules)
        directory.stop()

    async def test_key_added_to_modules_while_running_is_admitted_after_reconnect(self) -> None:
        keys, public_file = self.bus.stranger_keys("newcomer")
        client = self.bus.client_with("newcomer", keys, reconnect_after=0.1)
        started: Deferred[None] = client.start()
        await sleep(0.3)
        self.assertFalse(started.called)  # refused so far
        target = self.bus.layout.modules_dir / "newcomer.key"
        target.write_bytes(public_file.read_bytes())
        await wait_for(lambda: started.called, timeout=5)
        await started
        self.assertTrue(client.running)

    async def test_broker_keeps_working_after_refusing_a_client(self) -> None:
        keys, _ = self.bus.stranger_keys("stranger")
        stranger = self.bus.client_with("stranger", keys, start_timeout=0.2)
        d = stranger.start()
        await self.assertFailure(d, Exception)
        admitted = self.bus.client("admitted")
        await admitted.start()  # the ZAP thread and the proxy survived the refusal
        self.assertTrue(admitted.running)
