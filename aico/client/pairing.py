"""Pairing, device side: ``pair()`` and the device's state machine (``docs/devices.md``).

:func:`pair` makes an ECDSA P-256 key and a CSR, connects to the gateway's ``pairing``
listener, runs :class:`DevicePairing` (``CONNECTING → STARTING → WAIT_PAKE → KEYING →
WAIT_CONFIRM → WAIT_ANSWER → DONE``, or ``FAILED``) and writes the certificate directory:
``device.pem``, ``device.key``, ``ca.pem`` and ``gateway.json``. The gateway fingerprint
it writes is the one received under the PAKE key; nothing else is trusted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.threads import deferToThread
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from aico.gateway.devices import protocol as wire
from aico.gateway.devices.ca import create_csr, device_id, generate_key
from aico.keystore import client_keystore

__all__ = ["DeviceInput", "DevicePairing", "DeviceState", "PairingFailed", "PairingResult", "pair"]

#: The files :func:`pair` writes (SPEC §7).
DEVICE_CERT, DEVICE_KEY, CA_CERT, GATEWAY_JSON = "device.pem", "device.key", "ca.pem", "gateway.json"


class PairingFailed(Exception):
    """Pairing did not succeed; *reason* is the protocol's reason (``wrong_code``, …)."""

    def __init__(self, reason: str) -> None:
        super().__init__(_EXPLAIN.get(reason, reason))
        self.reason = reason


_EXPLAIN = {
    "wrong_code": "wrong_code: the gateway did not accept the code",
    "no_window": "no_window: no pairing window is open on the gateway",
    "window_closed": "window_closed: the pairing window closed (used, expired or too many failures)",
    "gateway_not_confirmed": "gateway_not_confirmed: the peer does not know the code (not the gateway?)",
    "bad_csr": "bad_csr: the gateway refused the certificate request",
    "connection_lost": "connection_lost: the connection closed before pairing finished",
    "timeout": "timeout: pairing took too long",
}


@dataclass(frozen=True)
class PairingResult:
    certificate_pem: str
    ca_pem: str
    gateway_fingerprint: str
    device_id: str
    name: str
    tls: dict[str, Any] | None


class DeviceState(Enum):
    CONNECTING = auto()
    STARTING = auto()
    WAIT_PAKE = auto()
    KEYING = auto()
    WAIT_CONFIRM = auto()
    WAIT_ANSWER = auto()
    DONE = auto()
    FAILED = auto()


class DeviceInput(Enum):
    CONNECTED = auto()
    STARTED = auto()
    PAKE = auto()
    KEYED = auto()
    CONFIRM_GOOD = auto()
    CONFIRM_BAD = auto()
    ANSWER = auto()
    ERROR = auto()
    BAD_FRAME = auto()
    LOST = auto()


def _run_in_thread(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return deferToThread(fn, *args)


class DevicePairing:
    """One pairing attempt on the device; :attr:`result` fires with a :class:`PairingResult`
    or fails with :class:`PairingFailed`."""

    def __init__(self, code: str, name: str, csr_pem: str,
                 send: Callable[[dict[str, Any]], None], close: Callable[[], None],
                 run_cpu: Callable[..., Deferred[Any]] = _run_in_thread) -> None:
        self.code = code
        self.name = name
        self.csr_pem = csr_pem
        self._send = send
        self._close = close
        self._run_cpu = run_cpu
        self.result: Deferred[PairingResult] = Deferred()
        self._side: Any = None
        self._message_a = b""
        self.keys: wire.SessionKeys | None = None
        S, I = DeviceState, DeviceInput  # noqa: E741
        table: dict[tuple[DeviceState, DeviceInput],
                    tuple[DeviceState, Callable[..., object] | None]] = {
            (S.CONNECTING, I.CONNECTED): (S.STARTING, self._start),
            (S.STARTING, I.STARTED): (S.WAIT_PAKE, self._send_hello),
            (S.WAIT_PAKE, I.PAKE): (S.KEYING, self._finish_pake),
            (S.KEYING, I.KEYED): (S.WAIT_CONFIRM, self._send_confirm),
            (S.WAIT_CONFIRM, I.CONFIRM_GOOD): (S.WAIT_ANSWER, self._send_request),
            (S.WAIT_CONFIRM, I.CONFIRM_BAD): (S.FAILED, self._fail),
            (S.WAIT_ANSWER, I.ANSWER): (S.DONE, self._done),
        }
        for state in (S.CONNECTING, S.STARTING, S.WAIT_PAKE, S.KEYING, S.WAIT_CONFIRM,
                      S.WAIT_ANSWER):
            for event in (I.ERROR, I.BAD_FRAME, I.LOST):
                table[(state, event)] = (S.FAILED, self._fail)
        for state in (S.DONE, S.FAILED):
            for event in (I.STARTED, I.KEYED, I.ERROR, I.BAD_FRAME, I.LOST):
                table[(state, event)] = (state, None)
        self.machine: wire.Machine[DeviceState, DeviceInput] = wire.Machine(
            "device-pairing", S.CONNECTING, table)

    @property
    def state(self) -> DeviceState:
        return self.machine.state

    # ------------------------------------------------------------------ inputs

    def connected(self) -> None:
        self.machine.feed(DeviceInput.CONNECTED)

    def frame(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        event: DeviceInput
        args: tuple[Any, ...] = (message,)
        if kind == "error":
            event, args = DeviceInput.ERROR, (str(message.get("reason", "refused")),)
        elif kind == "pake":
            event = DeviceInput.PAKE
        elif kind == "confirm" and self.keys is not None:
            try:
                good = wire.mac_ok(self.keys.gateway_confirm, self.keys.transcript,
                                   wire.b64d(message.get("mac")))
            except wire.PairingProtocolError:
                good = False
            event = DeviceInput.CONFIRM_GOOD if good else DeviceInput.CONFIRM_BAD
            args = () if good else ("gateway_not_confirmed",)
        elif kind == "sealed":
            event = DeviceInput.ANSWER
        else:
            event, args = DeviceInput.BAD_FRAME, ("unexpected_message",)
        if not self.machine.accepts(event):
            event, args = DeviceInput.BAD_FRAME, ("unexpected_message",)
        self.machine.feed(event, *args)

    def bad_frame(self, reason: str) -> None:
        self.machine.feed(DeviceInput.BAD_FRAME, reason)

    def lost(self, reason: str = "connection_lost") -> None:
        self.machine.feed(DeviceInput.LOST, reason)

    # ------------------------------------------------------------------ outputs

    def _start(self) -> None:
        d = self._run_cpu(wire.device_pake, self.code)

        def started(pair: tuple[Any, bytes]) -> None:
            self._side, self._message_a = pair
            self.machine.feed(DeviceInput.STARTED)

        d.addCallback(started).addErrback(self._crashed)

    def _send_hello(self) -> None:
        self._send({"type": "hello", "version": wire.VERSION,
                    "pake": wire.b64e(self._message_a)})

    def _finish_pake(self, message: dict[str, Any]) -> None:
        async def go() -> None:
            try:
                message_b = wire.b64d(message.get("pake"))
                key = await self._run_cpu(wire.device_finish, self._side, message_b)
            except wire.PairingProtocolError as e:
                self.machine.feed(DeviceInput.BAD_FRAME, e.reason)
                return
            self.keys = wire.derive(key, self._message_a, message_b)
            self.machine.feed(DeviceInput.KEYED)

        Deferred.fromCoroutine(go()).addErrback(self._crashed)

    def _send_confirm(self) -> None:
        assert self.keys is not None
        self._send({"type": "confirm",
                    "mac": wire.b64e(wire.mac(self.keys.device_confirm, self.keys.transcript))})

    def _send_request(self) -> None:
        assert self.keys is not None
        self._send(wire.seal(self.keys.device_seal, {"name": self.name, "csr_pem": self.csr_pem},
                             wire.AAD_REQUEST))

    def _done(self, message: dict[str, Any]) -> None:
        assert self.keys is not None
        self._close()
        try:
            body = wire.open_box(self.keys.gateway_seal, message, wire.AAD_ANSWER)
            result = PairingResult(
                certificate_pem=str(body["certificate_pem"]), ca_pem=str(body["ca_pem"]),
                gateway_fingerprint=str(body["gateway_fingerprint"]),
                device_id=str(body["device_id"]), name=str(body["name"]),
                tls=body.get("tls") if isinstance(body.get("tls"), dict) else None)
        except (wire.PairingProtocolError, KeyError, ValueError) as e:
            self.machine.state = DeviceState.FAILED
            self.result.errback(PairingFailed(getattr(e, "reason", "bad_answer")))
            return
        self.result.callback(result)

    def _fail(self, reason: str) -> None:
        self._close()
        if not self.result.called:
            self.result.errback(PairingFailed(reason))

    def _crashed(self, failure: Failure) -> None:
        if self.machine.accepts(DeviceInput.BAD_FRAME):
            self.machine.feed(DeviceInput.BAD_FRAME, f"internal_error: {failure.value}")


class _DeviceProtocol(Int32StringReceiver):
    MAX_LENGTH = wire.MAX_FRAME

    def __init__(self, make: Callable[[_DeviceProtocol], DevicePairing]) -> None:
        self.attempt = make(self)

    def send(self, message: dict[str, Any]) -> None:
        if self.transport is not None and self.connected:
            Int32StringReceiver.sendString(self, wire.encode(message))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionMade(self) -> None:
        self.attempt.connected()

    def stringReceived(self, string: bytes) -> None:
        try:
            message = wire.decode(string)
        except wire.PairingProtocolError as e:
            self.attempt.bad_frame(e.reason)
            return
        self.attempt.frame(message)

    def lengthLimitExceeded(self, length: int) -> None:
        self.attempt.bad_frame("frame_too_large")
        self.close()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.attempt.lost()


class _DeviceFactory(Factory):
    def __init__(self, make: Callable[[_DeviceProtocol], DevicePairing]) -> None:
        self.make = make

    def buildProtocol(self, addr: Any) -> _DeviceProtocol:
        p = _DeviceProtocol(self.make)
        p.factory = self
        return p


async def pair(reactor: Any, host: str, port: int, code: str, name: str, out_dir: str | Path,
               *, timeout: float = 30.0) -> PairingResult:
    """Pair with the gateway at *host*:*port* using *code*; write the certificate directory.

    Raises :class:`PairingFailed` (with the gateway's reason) when pairing fails, and
    :class:`FileExistsError` before connecting when *out_dir* already holds a device key.
    """
    out = Path(out_dir)
    if (out / DEVICE_KEY).exists():
        raise FileExistsError(f"{out / DEVICE_KEY} exists: this directory is paired already")
    key: ec.EllipticCurvePrivateKey = await deferToThread(generate_key)
    csr_pem = create_csr(key, name).public_bytes(serialization.Encoding.PEM).decode("ascii")
    attempts: list[DevicePairing] = []

    def make(p: _DeviceProtocol) -> DevicePairing:
        attempt = DevicePairing(code, name, csr_pem, p.send, p.close)
        attempts.append(attempt)
        return attempt

    factory = _DeviceFactory(make)
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    proto = await endpoint.connect(factory)
    assert isinstance(proto, _DeviceProtocol)
    timer: IDelayedCall = reactor.callLater(timeout, proto.attempt.lost, "timeout")
    try:
        result: PairingResult = await proto.attempt.result
    finally:
        if timer.active():
            timer.cancel()
        proto.close()
    _check_answer(result, key)
    await deferToThread(_write_directory, out, key, result, host, port)
    return result


def _check_answer(result: PairingResult, key: ec.EllipticCurvePrivateKey) -> None:
    """The certificate is for our key and signed by the CA we received."""
    cert = x509.load_pem_x509_certificate(result.certificate_pem.encode("ascii"))
    ca = x509.load_pem_x509_certificate(result.ca_pem.encode("ascii"))
    if cert.public_key() != key.public_key():
        raise PairingFailed("bad_answer")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PairingFailed("bad_answer") from None
    if device_id(cert) != result.device_id:
        raise PairingFailed("bad_answer")


def _write_device_key(out_dir: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write the device's private key (the one place that does; mode 0600)."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    # Sealed at rest like the gateway's keys (aico.keystore: the master secret from the
    # keyring, $AICO_MASTER_PASSWORD, or cert_dir/master-key).
    client_keystore(out_dir).write_sealed(out_dir / DEVICE_KEY, data, DEVICE_KEY)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_directory(out: Path, key: ec.EllipticCurvePrivateKey, result: PairingResult,
                     host: str, port: int) -> None:
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_device_key(out, key)
    _write(out / DEVICE_CERT, result.certificate_pem.encode("ascii"), 0o644)
    _write(out / CA_CERT, result.ca_pem.encode("ascii"), 0o644)
    tls = result.tls or {}
    gateway = {"fingerprint": result.gateway_fingerprint, "host": host, "port": port,
               "tls_port": tls.get("port"), "name": result.name, "device_id": result.device_id}
    _write(out / GATEWAY_JSON, (json.dumps(gateway, indent=2) + "\n").encode("utf-8"), 0o644)
