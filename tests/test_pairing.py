"""Pairing in memory: the gateway's and the device's state machines against each other and
against the PairingService (SQLite ``:memory:``, MemoryReactorClock, SPAKE2 run inline)."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from aico.client.pairing import (
    DeviceInput,
    DevicePairing,
    DeviceState,
    PairingFailed,
    PairingResult,
    _DeviceProtocol,
)
from aico.gateway.config import PairingSection
from aico.gateway.devices import protocol as wire
from aico.gateway.devices.ca import DeviceCA, create_csr, device_id, generate_key
from aico.gateway.devices.pairing import (
    GatewayInput,
    GatewayPairing,
    GatewayState,
    PairingService,
    format_code,
)
from aico.gateway.devices.registry import DeviceStore, PairingWindowStore
from aico.gateway.security.audit import AuditLog
from aico.gateway.store import SyncDatabase, sync_result


def inline(fn: Any, *args: Any) -> Deferred[Any]:
    return maybeDeferred(fn, *args)


def csr_for(name: str = "phone") -> str:
    return create_csr(generate_key(), name).public_bytes(serialization.Encoding.PEM).decode()


class Env:
    """A PairingService over an in-memory registry and a memory reactor."""

    def __init__(self, settings: PairingSection | None = None) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_800_000_000)
        self.db = SyncDatabase(":memory:")
        self.windows = PairingWindowStore(self.db, self.reactor)
        self.devices = DeviceStore(self.db, self.reactor)
        self.audit = AuditLog(self.db, self.reactor)
        self.ca = DeviceCA.create()
        self.server_cert, _ = self.ca.issue_server_cert()
        self.settings = settings or PairingSection()
        self.service = PairingService(
            self.reactor, lambda: self.settings, self.windows, self.devices, self.audit,
            self.ca, self.server_cert, self._listen, inline,
            tls_address=lambda: {"host": "127.0.0.1", "port": 8772})
        self.service.startService()

    def _listen(self, factory: Any) -> Deferred[Any]:
        return succeed(self.reactor.listenTCP(self.settings.port, factory))

    def open(self, seconds: float = 300, **kw: Any) -> dict[str, Any]:
        d = self.service.open_window(seconds=seconds, opened_by="test", **kw)
        out: list[dict[str, Any]] = []
        d.addCallback(out.append)
        assert out, "open_window did not finish synchronously"
        return out[0]

    def events(self) -> list[str]:
        return [e.event for e in reversed(sync_result(self.audit.latest(100)))]

    def audit_details(self, event: str) -> list[dict[str, Any]]:
        return [e.detail for e in reversed(sync_result(self.audit.latest(100)))
                if e.event == event]


class Attempt:
    """A device machine and a gateway machine wired to each other through queues."""

    def __init__(self, env: Env, code: str, name: str = "phone",
                 csr_pem: str | None = None) -> None:
        self.to_gateway: list[dict[str, Any]] = []
        self.to_device: list[dict[str, Any]] = []
        self.gateway_closed = False
        self.device_closed = False
        self.gateway = GatewayPairing(env.service, self.to_device.append, self._close_gw,
                                      "198.51.100.7:4242")
        self.device = DevicePairing(code, name, csr_pem or csr_for(name), self.to_gateway.append,
                                    self._close_dev, run_cpu=inline)
        self.outcome: list[Any] = []
        self.device.result.addBoth(self.outcome.append)

    def _close_gw(self) -> None:
        self.gateway_closed = True

    def _close_dev(self) -> None:
        self.device_closed = True

    def step_until(self, state: GatewayState) -> None:
        """Start, and deliver frames until the gateway reaches *state*."""
        if self.device.state is DeviceState.CONNECTING:
            self.device.connected()
        while self.gateway.state is not state and (self.to_gateway or self.to_device):
            self._deliver_one()

    def _deliver_one(self) -> None:
        if self.to_gateway:
            message = self.to_gateway.pop(0)
            if not self.gateway_closed:
                self.gateway.frame(message)
        elif self.to_device:
            message = self.to_device.pop(0)
            if not self.device_closed:
                self.device.frame(message)

    def run(self) -> Any:
        if self.device.state is DeviceState.CONNECTING:
            self.device.connected()
        while self.to_gateway or self.to_device:
            self._deliver_one()
        # The connection is gone for both.
        self.gateway.lost()
        self.device.lost()
        assert self.outcome, "the device's result did not fire"
        return self.outcome[0]


def reason_of(outcome: Any) -> str:
    assert not isinstance(outcome, PairingResult), "pairing unexpectedly succeeded"
    exc = outcome.value
    assert isinstance(exc, PairingFailed), exc
    return exc.reason


class PairingFlowTests(SynchronousTestCase):
    def test_the_right_code_pairs_the_device_through_every_transition(self) -> None:
        env = Env()
        opened = env.open(device_name=None, paired_for="ursula")
        self.assertEqual(opened["port"], 8776)
        attempt = Attempt(env, opened["code"].lower())  # the code as a person may type it
        result = attempt.run()
        self.assertIsInstance(result, PairingResult)
        G, D = GatewayState, DeviceState
        self.assertEqual([(a, b) for a, _, b in attempt.gateway.machine.trace], [
            (G.WAIT_HELLO, G.PAKE), (G.PAKE, G.WAIT_CONFIRM), (G.WAIT_CONFIRM, G.WAIT_REQUEST),
            (G.WAIT_REQUEST, G.ISSUING), (G.ISSUING, G.PAIRED), (G.PAIRED, G.PAIRED)])
        self.assertEqual([(a, b) for a, _, b in attempt.device.machine.trace][:7], [
            (D.CONNECTING, D.STARTING), (D.STARTING, D.WAIT_PAKE), (D.WAIT_PAKE, D.KEYING),
            (D.KEYING, D.WAIT_CONFIRM), (D.WAIT_CONFIRM, D.WAIT_ANSWER), (D.WAIT_ANSWER, D.DONE),
            (D.DONE, D.DONE)])
        # The answer: a certificate from our CA, the gateway's fingerprint, the tls port.
        self.assertEqual(result.gateway_fingerprint, device_id(env.server_cert))
        self.assertEqual(result.tls, {"host": "127.0.0.1", "port": 8772})
        self.assertIn("BEGIN CERTIFICATE", result.ca_pem)
        devices = sync_result(env.devices.list())
        self.assertEqual([(d.device_id, d.name, d.paired_for) for d in devices],
                         [(result.device_id, "phone", "ursula")])
        window = sync_result(env.windows.get(opened["window_id"]))
        assert window is not None
        self.assertEqual((window.state, window.device_id), ("used", result.device_id))
        # Used: the listener closes with the last open window.
        self.assertIsNone(env.service.port)
        self.assertEqual(env.events(), ["pairing_opened", "device_paired", "pairing_window_closed"])
        self.assertEqual(env.audit_details("pairing_window_closed")[0]["state"], "used")

    def test_the_operator_s_name_for_the_device_wins(self) -> None:
        env = Env()
        opened = env.open(device_name="Kitchen tablet")
        result = Attempt(env, opened["code"], name="android-1234").run()
        self.assertEqual(result.name, "Kitchen tablet")

    def test_a_wrong_code_fails_at_key_confirmation_and_counts_one_failure(self) -> None:
        env = Env()
        opened = env.open()
        attempt = Attempt(env, "2345-6789")
        self.assertEqual(reason_of(attempt.run()), "wrong_code")
        self.assertEqual(attempt.gateway.machine.trace[2][:2],
                         (GatewayState.WAIT_CONFIRM, GatewayInput.CONFIRM_BAD))
        self.assertTrue(attempt.gateway_closed)
        window = sync_result(env.windows.get(opened["window_id"]))
        assert window is not None
        self.assertEqual((window.state, window.failures), ("open", 1))
        self.assertIsNotNone(env.service.port)  # still open for the right code
        self.assertEqual(sync_result(env.devices.list()), [])
        failed = env.audit_details("pairing_failed")
        self.assertEqual((failed[0]["reason"], failed[0]["failures"]), ("wrong_code", 1))

    def test_three_wrong_codes_close_the_window_and_the_listener(self) -> None:
        env = Env()
        opened = env.open()
        for _ in range(3):
            self.assertEqual(reason_of(Attempt(env, "2345-6789").run()), "wrong_code")
        window = sync_result(env.windows.get(opened["window_id"]))
        assert window is not None
        self.assertEqual((window.state, window.failures), ("closed", 3))
        self.assertIsNone(env.service.port)
        self.assertEqual(env.reactor.tcpServers[-1][1], env.service.factory)
        # Even the right code is refused now.
        self.assertEqual(reason_of(Attempt(env, opened["code"]).run()), "no_window")
        closed = env.audit_details("pairing_window_closed")
        self.assertEqual((closed[0]["state"], closed[0]["failures"]), ("closed", 3))

    def test_the_code_cannot_be_replayed_after_use(self) -> None:
        env = Env()
        opened = env.open()
        self.assertIsInstance(Attempt(env, opened["code"]).run(), PairingResult)
        self.assertEqual(reason_of(Attempt(env, opened["code"], name="second").run()), "no_window")
        self.assertEqual(len(sync_result(env.devices.list())), 1)

    def test_two_devices_racing_with_the_same_code_pair_only_one(self) -> None:
        env = Env()
        opened = env.open()
        first, second = Attempt(env, opened["code"]), Attempt(env, opened["code"], name="other")
        first.step_until(GatewayState.WAIT_REQUEST)
        second.step_until(GatewayState.WAIT_REQUEST)
        self.assertIsInstance(first.run(), PairingResult)
        self.assertEqual(reason_of(second.run()), "window_closed")
        self.assertEqual([d.name for d in sync_result(env.devices.list())], ["phone"])

    def test_a_bad_csr_is_refused_and_nothing_is_registered(self) -> None:
        env = Env()
        opened = env.open()
        garbage = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
        attempt = Attempt(env, opened["code"], csr_pem=garbage)
        self.assertEqual(reason_of(attempt.run()), "bad_csr")
        self.assertEqual(attempt.gateway.state, GatewayState.FAILED)
        self.assertEqual(sync_result(env.devices.list()), [])
        window = sync_result(env.windows.get(opened["window_id"]))
        assert window is not None
        self.assertEqual((window.state, window.failures), ("open", 0))

    def test_no_open_window_refuses_before_any_key_exchange(self) -> None:
        env = Env()
        attempt = Attempt(env, "2345-6789")
        self.assertEqual(reason_of(attempt.run()), "no_window")
        self.assertIsNone(attempt.gateway.keys)

    def test_opening_a_window_closes_the_previous_one(self) -> None:
        env = Env()
        old = env.open()
        new = env.open()
        old_window = sync_result(env.windows.get(old["window_id"]))
        assert old_window is not None
        self.assertEqual(old_window.state, "closed")
        self.assertEqual(reason_of(Attempt(env, old["code"]).run()), "wrong_code")
        self.assertIsInstance(Attempt(env, new["code"]).run(), PairingResult)

    def test_expiry_closes_the_listener(self) -> None:
        env = Env()
        opened = env.open(seconds=60)
        port = env.service.port
        self.assertIsNotNone(port)
        env.reactor.advance(59)
        self.assertIs(env.service.port, port)
        env.reactor.advance(2)
        self.assertIsNone(env.service.port)
        window = sync_result(env.windows.get(opened["window_id"]))
        assert window is not None
        self.assertEqual(window.state, "expired")
        self.assertEqual(env.audit_details("pairing_window_closed")[0]["state"], "expired")

    def test_a_window_opened_by_another_process_opens_the_listener_on_refresh(self) -> None:
        env = Env()
        sync_result(env.windows.open(seconds=60, opened_by="cli"))
        self.assertIsNone(env.service.port)
        env.service.refresh()
        self.assertIsNotNone(env.service.port)

    def test_the_audit_log_never_holds_the_code(self) -> None:
        env = Env()
        opened = env.open()
        Attempt(env, "2345-6789").run()
        Attempt(env, opened["code"]).run()
        raw = repr([(e.event, e.detail) for e in sync_result(env.audit.latest(100))])
        self.assertNotIn(opened["code"].replace("-", ""), raw)
        self.assertNotIn(opened["code"], raw)

    def test_the_code_is_formatted_in_groups_of_four(self) -> None:
        self.assertEqual(format_code("abcd efgh"), "ABCD-EFGH")


class GatewayMachineTests(SynchronousTestCase):
    """The gateway's transitions that a well-behaved device never takes."""

    def setUp(self) -> None:
        self.env = Env()
        self.opened = self.env.open()
        self.sent: list[dict[str, Any]] = []
        self.closed: list[bool] = []
        self.gateway = GatewayPairing(self.env.service, self.sent.append,
                                      lambda: self.closed.append(True))

    def hello(self, code: str | None = None) -> Any:
        side, message_a = wire.device_pake(code or self.opened["code"])
        self.gateway.frame({"type": "hello", "version": wire.VERSION,
                            "pake": wire.b64e(message_a)})
        return side, message_a

    def failures(self) -> int:
        window = sync_result(self.env.windows.get(self.opened["window_id"]))
        assert window is not None
        return window.failures

    def test_an_unsupported_version_is_refused(self) -> None:
        self.gateway.frame({"type": "hello", "version": 99, "pake": ""})
        self.assertEqual(self.sent, [wire.error_frame("unsupported_version")])
        self.assertEqual((self.gateway.state, self.closed), (GatewayState.FAILED, [True]))
        self.assertEqual(self.failures(), 0)

    def test_a_message_out_of_order_ends_the_attempt(self) -> None:
        self.gateway.frame({"type": "sealed", "nonce": "", "box": ""})
        self.assertEqual(self.sent, [wire.error_frame("unexpected_message")])
        self.assertEqual(self.gateway.state, GatewayState.FAILED)

    def test_a_second_hello_ends_the_attempt(self) -> None:
        self.hello()
        self.gateway.frame({"type": "hello", "version": 1, "pake": ""})
        self.assertEqual(self.sent[-1], wire.error_frame("unexpected_message"))
        self.assertEqual(self.failures(), 1)  # the PAKE message was out: counted

    def test_a_peer_silent_after_the_pake_counts_a_failure(self) -> None:
        self.hello()
        self.assertEqual(self.gateway.state, GatewayState.WAIT_CONFIRM)
        self.gateway.timeout()
        self.assertEqual(self.sent[-1], wire.error_frame("timeout"))
        self.assertEqual(self.failures(), 1)

    def test_a_peer_that_leaves_before_the_hello_costs_nothing(self) -> None:
        self.gateway.lost()
        self.assertEqual(self.gateway.state, GatewayState.FAILED)
        self.assertEqual((self.sent, self.failures()), ([], 0))
        self.assertNotIn("pairing_failed", self.env.events())

    def test_a_request_that_does_not_decrypt_is_refused(self) -> None:
        side, message_a = self.hello()
        message_b = wire.b64d(self.sent[-1]["pake"])
        keys = wire.derive(wire.device_finish(side, message_b), message_a, message_b)
        self.gateway.frame({"type": "confirm",
                            "mac": wire.b64e(wire.mac(keys.device_confirm, keys.transcript))})
        self.assertEqual(self.gateway.state, GatewayState.WAIT_REQUEST)
        self.gateway.frame(wire.seal(b"\0" * 32, {"name": "x", "csr_pem": csr_for()},
                                     wire.AAD_REQUEST))
        self.assertEqual(self.sent[-1], wire.error_frame("undecryptable"))
        self.assertEqual(sync_result(self.env.devices.list()), [])

    def test_late_results_after_the_end_change_nothing(self) -> None:
        self.gateway.lost()
        for event in (GatewayInput.PAKE_READY, GatewayInput.ISSUED, GatewayInput.TIMEOUT):
            self.gateway.machine.feed(event, None)
        self.assertEqual(self.gateway.state, GatewayState.FAILED)
        self.assertEqual(self.sent, [])

    def test_an_input_without_a_transition_raises(self) -> None:
        with self.assertRaises(wire.UnexpectedInput):
            self.gateway.machine.feed(GatewayInput.ISSUED, {})


class DeviceMachineTests(SynchronousTestCase):
    def test_a_peer_that_does_not_know_the_code_is_not_trusted(self) -> None:
        sent: list[dict[str, Any]] = []
        device = DevicePairing("2345-6789", "phone", csr_for(), sent.append, lambda: None,
                               run_cpu=inline)
        outcome: list[Any] = []
        device.result.addBoth(outcome.append)
        device.connected()
        # An impostor answers the PAKE with another code, then a MAC it made up.
        message_b, _ = wire.gateway_pake("ABCD-EFGH", wire.b64d(sent[0]["pake"]))
        device.frame({"type": "pake", "version": 1, "pake": wire.b64e(message_b)})
        self.assertEqual(device.state, DeviceState.WAIT_CONFIRM)
        device.frame({"type": "confirm", "mac": wire.b64e(b"\0" * 32)})
        self.assertEqual(device.state, DeviceState.FAILED)
        self.assertEqual(reason_of(outcome[0]), "gateway_not_confirmed")
        self.assertEqual([m["type"] for m in sent], ["hello", "confirm"])  # no CSR sent

    def test_the_gateway_s_error_reason_reaches_the_caller(self) -> None:
        device = DevicePairing("2345-6789", "phone", csr_for(), lambda m: None, lambda: None,
                               run_cpu=inline)
        outcome: list[Any] = []
        device.result.addBoth(outcome.append)
        device.connected()
        device.frame(wire.error_frame("no_window"))
        self.assertEqual(reason_of(outcome[0]), "no_window")
        self.assertEqual(device.machine.trace[-1][1], DeviceInput.ERROR)


class FramedProtocolTests(SynchronousTestCase):
    """The same machines behind their length-prefixed protocols (iosim loopback)."""

    def connect(self, env: Env, code: str) -> tuple[Any, _DeviceProtocol, iosim.IOPump]:
        server = env.service.factory.buildProtocol(None)
        assert server is not None
        csr = csr_for()
        client = _DeviceProtocol(lambda p: DevicePairing(code, "phone", csr, p.send, p.close,
                                                         run_cpu=inline))
        pump = iosim.connect(server, iosim.makeFakeServer(server), client,
                             iosim.makeFakeClient(client), greet=False)
        return server, client, pump

    def test_a_full_pairing_over_frames(self) -> None:
        env = Env()
        opened = env.open()
        server, client, pump = self.connect(env, opened["code"])
        pump.flush()
        outcome: list[Any] = []
        client.attempt.result.addBoth(outcome.append)
        pump.flush()
        self.assertIsInstance(outcome[0], PairingResult)
        self.assertEqual(server.attempt.state, GatewayState.PAIRED)

    def test_an_attempt_that_takes_too_long_is_closed(self) -> None:
        env = Env()
        env.open()
        server = env.service.factory.buildProtocol(None)
        assert server is not None
        transport = iosim.makeFakeServer(server)
        server.makeConnection(transport)
        env.reactor.advance(PairingSection().attempt_timeout + 1)
        self.assertEqual(server.attempt.state, GatewayState.FAILED)
        self.assertEqual(server.attempt.reason, "timeout")
        self.assertTrue(transport.disconnecting)

    def test_an_oversized_frame_ends_the_attempt(self) -> None:
        env = Env()
        env.open()
        server = env.service.factory.buildProtocol(None)
        assert server is not None
        transport = iosim.makeFakeServer(server)
        server.makeConnection(transport)
        server.dataReceived((wire.MAX_FRAME + 1).to_bytes(4, "big"))
        self.assertEqual(server.attempt.reason, "frame_too_large")

    def test_connections_past_the_limit_are_refused(self) -> None:
        env = Env(PairingSection(max_connections=1))
        env.open()
        first = env.service.factory.buildProtocol(None)
        assert first is not None
        first.makeConnection(iosim.makeFakeServer(first))
        self.assertIsNone(env.service.factory.buildProtocol(None))
