"""Pairing, gateway side: the per-connection state machine and the service that owns the
``pairing`` listener (``docs/devices.md``, "The pairing protocol").

* :class:`GatewayPairing` — one attempt, an explicit :class:`~.protocol.Machine`
  (``WAIT_HELLO → PAKE → WAIT_CONFIRM → WAIT_REQUEST → ISSUING → PAIRED``, or ``FAILED``).
  It knows nothing of sockets: it is fed frames and results and calls ``send``/``close``.
* :class:`PairingProtocol` — the length-prefixed frames on a TCP connection.
* :class:`PairingService` — opens windows (:meth:`~PairingService.open_window`, for the
  admin API), follows the windows in the registry (:meth:`~PairingService.refresh`, run
  when another process such as ``aico-gateway pair`` committed, and when a window
  expires), listens while at least one window is open, and does the work the machines
  ask for: SPAKE2 on the CPU pool, counting failures, issuing and registering.

One window is open at a time: opening a window closes the others (the newest code is the
one that works), so a connection always belongs to the newest open window.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum, auto
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from aico.gateway.devices import protocol as wire
from aico.gateway.devices.ca import CSRError, DeviceCA, device_id
from aico.gateway.devices.registry import (
    Device,
    DeviceStore,
    PairingWindow,
    PairingWindowStore,
    normalise_code,
)
from aico.gateway.devices.registry import new_code as _new_code

__all__ = [
    "GatewayInput",
    "GatewayPairing",
    "GatewayState",
    "PairingFactory",
    "PairingProtocol",
    "PairingRefused",
    "PairingService",
    "format_code",
]

log = Logger(namespace="aico.gateway.pairing")


def format_code(code: str) -> str:
    """A stored (normalised) code as a person reads it: ``ABCD-EFGH``."""
    raw = normalise_code(code)
    return "-".join(raw[i:i + 4] for i in range(0, len(raw), 4))


class PairingRefused(Exception):
    """The gateway refuses this attempt; *reason* goes to the device and the audit log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GatewayState(Enum):
    WAIT_HELLO = auto()
    PAKE = auto()
    WAIT_CONFIRM = auto()
    WAIT_REQUEST = auto()
    ISSUING = auto()
    #: Version 2, a gateway joining for sync: our answer (with our CSR) is out; waiting
    #: for the certificate its CA issued us, then storing the peer.
    WAIT_FINAL = auto()
    FINISHING = auto()
    PAIRED = auto()
    FAILED = auto()


class GatewayInput(Enum):
    HELLO = auto()
    PAKE_READY = auto()
    PAKE_REFUSED = auto()
    CONFIRM_GOOD = auto()
    CONFIRM_BAD = auto()
    REQUEST = auto()
    ISSUED = auto()
    ISSUED_SYNC = auto()
    ISSUE_REFUSED = auto()
    FINAL = auto()
    FINISHED = auto()
    BAD_FRAME = auto()
    TIMEOUT = auto()
    LOST = auto()


class PairingBackend(Protocol):
    """What a :class:`GatewayPairing` asks of the gateway (the :class:`PairingService`)."""

    def current_window(self) -> Deferred[PairingWindow | None]: ...

    def run_cpu(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]: ...

    def attempt_failed(self, window: PairingWindow | None, reason: str, peer: str,
                       counted: bool) -> Deferred[None]: ...

    def issue(self, window: PairingWindow, name: str, csr_pem: str,
              peer: str) -> Deferred[dict[str, Any]]: ...

    def issue_sync(self, window: PairingWindow, body: dict[str, Any],
                   peer: str) -> Deferred[tuple[dict[str, Any], Any]]: ...

    def finish_sync(self, pending: Any, body: dict[str, Any]) -> Deferred[dict[str, Any]]: ...


class GatewayPairing:
    """One pairing attempt on the gateway: the table below is the whole protocol."""

    def __init__(self, backend: PairingBackend, send: Callable[[dict[str, Any]], None],
                 close: Callable[[], None], peer: str = "-") -> None:
        self.backend = backend
        self._send = send
        self._close = close
        self.peer = peer
        self.window: PairingWindow | None = None
        self.keys: wire.SessionKeys | None = None
        #: The protocol version the peer's hello asked for (1: a device; 2: may join).
        self.version = wire.VERSION
        #: A sync join's state between our answer and the peer's final frame.
        self._pending: Any = None
        #: Why the attempt failed (``None`` while it has not).
        self.reason: str | None = None
        S, I = GatewayState, GatewayInput  # noqa: E741
        table: dict[tuple[GatewayState, GatewayInput],
                    tuple[GatewayState, Callable[..., object] | None]] = {
            (S.WAIT_HELLO, I.HELLO): (S.PAKE, self._start_pake),
            (S.PAKE, I.PAKE_READY): (S.WAIT_CONFIRM, self._send_pake),
            (S.PAKE, I.PAKE_REFUSED): (S.FAILED, self._refuse),
            (S.WAIT_CONFIRM, I.CONFIRM_GOOD): (S.WAIT_REQUEST, self._send_confirm),
            # A wrong code shows here: one guess spent, counted on the window.
            (S.WAIT_CONFIRM, I.CONFIRM_BAD): (S.FAILED, self._wrong_code),
            (S.WAIT_REQUEST, I.REQUEST): (S.ISSUING, self._issue),
            (S.ISSUING, I.ISSUED): (S.PAIRED, self._send_answer),
            (S.ISSUING, I.ISSUE_REFUSED): (S.FAILED, self._refuse),
            (S.ISSUING, I.ISSUED_SYNC): (S.WAIT_FINAL, self._send_sync_answer),
            (S.WAIT_FINAL, I.FINAL): (S.FINISHING, self._finish),
            (S.FINISHING, I.FINISHED): (S.PAIRED, self._send_done),
            (S.FINISHING, I.ISSUE_REFUSED): (S.FAILED, self._refuse),
        }
        for state in (S.WAIT_HELLO, S.PAKE, S.WAIT_REQUEST, S.ISSUING, S.WAIT_FINAL,
                      S.FINISHING):
            table[(state, I.BAD_FRAME)] = (S.FAILED, self._refuse)
            table[(state, I.TIMEOUT)] = (S.FAILED, self._refuse)
            table[(state, I.LOST)] = (S.FAILED, self._lost)
        # Once the gateway's SPAKE2 message is out, the peer has spent its guess however
        # the attempt ends: a silent or broken peer counts like a wrong code.
        for event in (I.BAD_FRAME, I.TIMEOUT, I.LOST):
            table[(S.WAIT_CONFIRM, event)] = (S.FAILED, self._abandoned)
        # Late results and events after the end change nothing.
        for state in (S.FAILED, S.PAIRED):
            for event in (I.PAKE_READY, I.PAKE_REFUSED, I.ISSUED, I.ISSUED_SYNC,
                          I.ISSUE_REFUSED, I.FINISHED, I.TIMEOUT, I.LOST, I.BAD_FRAME):
                table[(state, event)] = (state, None)
        self.machine: wire.Machine[GatewayState, GatewayInput] = wire.Machine(
            "gateway-pairing", S.WAIT_HELLO, table)

    @property
    def state(self) -> GatewayState:
        return self.machine.state

    # ------------------------------------------------------------------ inputs

    def frame(self, message: dict[str, Any]) -> None:
        """A decoded frame from the device."""
        kind = message["type"]
        event: GatewayInput
        args: tuple[Any, ...] = (message,)
        if kind == "hello":
            event = GatewayInput.HELLO
        elif kind == "confirm" and self.state is GatewayState.WAIT_CONFIRM:
            assert self.keys is not None
            try:
                good = wire.mac_ok(self.keys.device_confirm, self.keys.transcript,
                                   wire.b64d(message.get("mac")))
            except wire.PairingProtocolError:
                good = False
            event = GatewayInput.CONFIRM_GOOD if good else GatewayInput.CONFIRM_BAD
            args = ()
        elif kind == "sealed":
            event = (GatewayInput.FINAL if self.state is GatewayState.WAIT_FINAL
                     else GatewayInput.REQUEST)
        else:
            event, args = GatewayInput.BAD_FRAME, ("unexpected_message",)
        if not self.machine.accepts(event):
            event, args = GatewayInput.BAD_FRAME, ("unexpected_message",)
        self.machine.feed(event, *args)

    def bad_frame(self, reason: str) -> None:
        self.machine.feed(GatewayInput.BAD_FRAME, reason)

    def timeout(self) -> None:
        self.machine.feed(GatewayInput.TIMEOUT, "timeout")

    def lost(self) -> None:
        self.machine.feed(GatewayInput.LOST, "connection_lost")

    # ------------------------------------------------------------------ outputs

    def _start_pake(self, hello: dict[str, Any]) -> None:
        Deferred.fromCoroutine(self._pake(hello)).addErrback(
            self._unexpected, GatewayInput.PAKE_REFUSED)

    async def _pake(self, hello: dict[str, Any]) -> None:
        if hello.get("version") not in wire.VERSIONS:
            self.machine.feed(GatewayInput.PAKE_REFUSED, "unsupported_version")
            return
        self.version = int(hello["version"])
        try:
            message_a = wire.b64d(hello.get("pake"))
        except wire.PairingProtocolError as e:
            self.machine.feed(GatewayInput.PAKE_REFUSED, e.reason)
            return
        window = await self.backend.current_window()
        if window is None:
            self.machine.feed(GatewayInput.PAKE_REFUSED, "no_window")
            return
        self.window = window
        try:
            message_b, key = await self.backend.run_cpu(wire.gateway_pake, window.code, message_a)
        except wire.PairingProtocolError as e:
            self.machine.feed(GatewayInput.PAKE_REFUSED, e.reason)
            return
        self.keys = wire.derive(key, message_a, message_b, self.version)
        self.machine.feed(GatewayInput.PAKE_READY, message_b)

    def _send_pake(self, message_b: bytes) -> None:
        self._send({"type": "pake", "version": self.version, "pake": wire.b64e(message_b)})

    def _send_confirm(self) -> None:
        assert self.keys is not None
        self._send({"type": "confirm",
                    "mac": wire.b64e(wire.mac(self.keys.gateway_confirm, self.keys.transcript))})

    def _wrong_code(self) -> None:
        self._fail("wrong_code", counted=True)

    def _abandoned(self, reason: str) -> None:
        self._fail(reason, counted=True)

    def _refuse(self, reason: str) -> None:
        self._fail(reason, counted=False)

    def _lost(self, reason: str) -> None:
        # Before any SPAKE2 message went out nothing was learnt; audit only what started.
        if self.machine.trace and self.machine.trace[-1][0] is not GatewayState.WAIT_HELLO:
            self._fail(reason, counted=False)
        else:
            self.reason = reason

    def _fail(self, reason: str, *, counted: bool) -> None:
        self.reason = reason
        self._send(wire.error_frame(reason))
        self._close()
        self.backend.attempt_failed(self.window, reason, self.peer, counted).addErrback(
            lambda f: log.failure("could not record a failed pairing attempt", f))

    def _issue(self, message: dict[str, Any]) -> None:
        Deferred.fromCoroutine(self._do_issue(message)).addErrback(
            self._unexpected, GatewayInput.ISSUE_REFUSED)

    async def _do_issue(self, message: dict[str, Any]) -> None:
        assert self.keys is not None and self.window is not None
        try:
            body = wire.open_box(self.keys.device_seal, message,
                                 wire.aad(self.version, "request"))
            name, csr_pem = body.get("name"), body.get("csr_pem")
            if not isinstance(name, str) or not isinstance(csr_pem, str):
                raise PairingRefused("bad_message")
            if body.get("kind", "device") == "sync":
                if self.version < wire.JOIN_VERSION:
                    raise PairingRefused("bad_message")
                answer, self._pending = await self.backend.issue_sync(self.window, body,
                                                                      self.peer)
                self.machine.feed(GatewayInput.ISSUED_SYNC, answer)
                return
            answer = await self.backend.issue(self.window, name, csr_pem, self.peer)
        except (wire.PairingProtocolError, PairingRefused) as e:
            self.machine.feed(GatewayInput.ISSUE_REFUSED, e.reason)
            return
        self.machine.feed(GatewayInput.ISSUED, answer)

    def _send_answer(self, answer: dict[str, Any]) -> None:
        assert self.keys is not None
        self._send(wire.seal(self.keys.gateway_seal, answer, wire.aad(self.version, "answer")))
        self._close()

    def _send_sync_answer(self, answer: dict[str, Any]) -> None:
        assert self.keys is not None
        self._send(wire.seal(self.keys.gateway_seal, answer, wire.aad(self.version, "answer")))

    def _finish(self, message: dict[str, Any]) -> None:
        Deferred.fromCoroutine(self._do_finish(message)).addErrback(
            self._unexpected, GatewayInput.ISSUE_REFUSED)

    async def _do_finish(self, message: dict[str, Any]) -> None:
        assert self.keys is not None
        try:
            body = wire.open_box(self.keys.device_seal, message, wire.aad(self.version, "final"))
            done = await self.backend.finish_sync(self._pending, body)
        except (wire.PairingProtocolError, PairingRefused) as e:
            self.machine.feed(GatewayInput.ISSUE_REFUSED, e.reason)
            return
        self.machine.feed(GatewayInput.FINISHED, done)

    def _send_done(self, done: dict[str, Any]) -> None:
        assert self.keys is not None
        self._send(wire.seal(self.keys.gateway_seal, done, wire.aad(self.version, "done")))
        self._close()

    def _unexpected(self, failure: Failure, event: GatewayInput) -> None:
        log.failure("pairing attempt failed unexpectedly", failure)
        if self.machine.accepts(event):
            self.machine.feed(event, "internal_error")


class PairingProtocol(Int32StringReceiver):
    """The pairing frames on one TCP connection (4-byte length, JSON)."""

    MAX_LENGTH = wire.MAX_FRAME
    factory: PairingFactory

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.attempt = GatewayPairing(self.factory.service, self.send, self.close,
                                      f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}")
        self.factory.live.add(self)
        self._timer: IDelayedCall | None = self.factory.service.reactor.callLater(
            self.factory.service.attempt_timeout(), self._timed_out)

    def send(self, message: dict[str, Any]) -> None:
        if self.transport is not None and self.connected:
            Int32StringReceiver.sendString(self, wire.encode(message))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def stringReceived(self, string: bytes) -> None:
        try:
            message = wire.decode(string)
        except wire.PairingProtocolError as e:
            self.attempt.bad_frame(e.reason)
            return
        self.attempt.frame(message)

    def lengthLimitExceeded(self, length: int) -> None:
        self.attempt.bad_frame("frame_too_large")

    def _timed_out(self) -> None:
        self._timer = None
        self.attempt.timeout()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.live.discard(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.attempt.lost()


class PairingFactory(Factory):
    """Pairing connections, at most ``pairing.max_connections`` at once."""

    protocol = PairingProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(self, service: PairingService) -> None:
        self.service = service
        self.live: set[PairingProtocol] = set()

    def buildProtocol(self, addr: Any) -> PairingProtocol | None:  # type: ignore[override]
        if len(self.live) >= self.service.max_connections():
            return None
        p = super().buildProtocol(addr)
        assert isinstance(p, PairingProtocol)
        return p


class PairingService(Service):
    """Pairing windows and the ``pairing`` listener that is open while one is.

    *settings* returns the ``[pairing]`` section (reloadable values are read each time);
    *listen* binds the listener with a factory (``tcp_endpoint(...).listen``);
    *run_cpu* runs SPAKE2 off the reactor; *tls_address* the ``tls`` listener's
    ``{"host", "port"}`` (``None`` when there is none).
    """

    name = "pairing"

    def __init__(self, reactor: Any, settings: Callable[[], Any],
                 windows: PairingWindowStore, devices: DeviceStore, audit: Any,
                 ca: DeviceCA | None, server_cert: x509.Certificate | None,
                 listen: Callable[[Factory], Deferred[IListeningPort]],
                 run_cpu: Callable[..., Deferred[Any]],
                 tls_address: Callable[[], dict[str, Any] | None] = lambda: None,
                 baseline: Callable[[], Deferred[None]] | None = None,
                 on_paired: Callable[[Device], object] = lambda device: None,
                 sync_join: Any = None) -> None:
        self.reactor = reactor
        #: Answers a gateway joining for sync (:class:`aico.sync.join.JoinHost`);
        #: ``None``: such requests are refused with ``sync_disabled``.
        self.sync_join = sync_join
        #: Told each device paired here (the tls listener admits it at once).
        self.on_paired = on_paired
        self.settings = settings
        self.windows = windows
        self.devices = devices
        self.audit = audit
        self.ca = ca
        self.server_cert = server_cert
        self._listen = listen
        self._run_cpu = run_cpu
        self.tls_address = tls_address
        self._baseline = baseline
        self.factory = PairingFactory(self)
        self.port: IListeningPort | None = None
        #: Called with ``(open, port)`` whenever the listener opens or closes (mDNS).
        self.observers: list[Callable[[bool, int | None], object]] = []
        self._lock = DeferredLock()
        self._timer: IDelayedCall | None = None
        self._known: dict[str, PairingWindow] = {}
        self._stopped = False

    # ------------------------------------------------------------------ settings

    def attempt_timeout(self) -> float:
        return float(self.settings().attempt_timeout)

    def max_connections(self) -> int:
        return int(self.settings().max_connections)

    @property
    def fingerprint(self) -> str:
        return device_id(self.server_cert) if self.server_cert is not None else ""

    @property
    def listening_port(self) -> int | None:
        return self.port.getHost().port if self.port is not None else None  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ service

    def startService(self) -> Deferred[None]:
        """First the registry watcher's baseline (*baseline*: its first check only records
        the database's version, so a window opened before it would go unnoticed), then a
        first look at the windows (one opened while the gateway was down opens now)."""
        Service.startService(self)
        self._stopped = False
        d: Deferred[Any] = maybeDeferred(self._baseline) if self._baseline else Deferred()
        if self._baseline is None:
            d.callback(None)
        d.addCallback(lambda _: self.refresh())
        d.addErrback(lambda f: log.failure("pairing: first look at windows failed", f))
        return d

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for p in list(self.factory.live):
            p.transport.abortConnection()  # type: ignore[union-attr]
        return self._lock.run(lambda: Deferred.fromCoroutine(self._stop_listening()))

    # ------------------------------------------------------------------ windows

    def open_window(self, *, seconds: float | None = None, opened_by: str,
                    device_name: str | None = None,
                    paired_for: str | None = None) -> Deferred[dict[str, Any]]:
        """Open a window (closing any other), audit it, open the listener.

        Fires with ``{"window_id", "code", "port", "expires_at"}``; *seconds* defaults to
        ``pairing.window_minutes``.
        """
        return Deferred.fromCoroutine(self._open_window(seconds, opened_by, device_name,
                                                        paired_for))

    async def _open_window(self, seconds: float | None, opened_by: str,
                           device_name: str | None, paired_for: str | None) -> dict[str, Any]:
        if seconds is None:
            seconds = float(self.settings().window_minutes) * 60
        for old in await self.windows.active():
            await self.windows.close(old.window_id)
        window = await self.windows.open(seconds=seconds, opened_by=opened_by,
                                         device_name=device_name, paired_for=paired_for,
                                         code=_new_code())
        await self.audit.append("pairing_opened", opened_by, _window_detail(window))
        await self.refresh()
        return {"window_id": window.window_id, "code": format_code(window.code),
                "port": self.listening_port, "expires_at": window.expires_at}

    def close_window(self, window_id: str) -> Deferred[bool]:
        async def go() -> bool:
            closed = await self.windows.close(window_id)
            await self.refresh()
            return closed

        return Deferred.fromCoroutine(go())

    def refresh(self) -> Deferred[None]:
        """Look at the windows: audit those that ended, listen while one is open."""
        return self._lock.run(lambda: Deferred.fromCoroutine(self._refresh()))

    async def _refresh(self) -> None:
        active = {w.window_id: w for w in await self.windows.active()}
        for window_id, old in list(self._known.items()):
            if window_id not in active:
                del self._known[window_id]
                now = await self.windows.get(window_id)
                state = now.state if now is not None else "gone"
                detail = _window_detail(now or old)
                detail["state"] = state
                await self.audit.append("pairing_window_closed", "gateway", detail)
        self._known.update(active)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if active and not self._stopped and self.settings().enabled:
            if self.port is None:
                await self._start_listening()
            soonest = min(w.expires_at for w in active.values())
            delay = max(0.0, soonest - self.reactor.seconds()) + 0.01
            self._timer = self.reactor.callLater(delay, self._expire)
        elif self.port is not None:
            await self._stop_listening()

    def _expire(self) -> None:
        self._timer = None
        self.refresh().addErrback(lambda f: log.failure("pairing: expiry check failed", f))

    async def _start_listening(self) -> None:
        self.port = await self._listen(self.factory)
        log.info("pairing listener open on port {port}", port=self.listening_port)
        self._notify()

    async def _stop_listening(self) -> None:
        port, self.port = self.port, None
        if port is not None:
            await maybeDeferred(port.stopListening)
            log.info("pairing listener closed")
            self._notify()

    def _notify(self) -> None:
        for observer in list(self.observers):
            try:
                observer(self.port is not None, self.listening_port)
            except Exception:
                log.failure("a pairing observer failed")

    # ------------------------------------------------------------------ backend of the machines

    def current_window(self) -> Deferred[PairingWindow | None]:
        async def go() -> PairingWindow | None:
            active = await self.windows.active()
            return active[-1] if active else None

        return Deferred.fromCoroutine(go())

    def run_cpu(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return self._run_cpu(fn, *args)

    def attempt_failed(self, window: PairingWindow | None, reason: str, peer: str,
                       counted: bool) -> Deferred[None]:
        async def go() -> None:
            detail: dict[str, Any] = {"reason": reason, "peer": peer,
                                      "window_id": window.window_id if window else None}
            if counted and window is not None:
                after = await self.windows.record_failure(
                    window.window_id, int(self.settings().max_failures))
                detail["failures"] = after.failures if after is not None else None
            await self.audit.append("pairing_failed", "gateway", detail)
            if counted:
                await self.refresh()

        return Deferred.fromCoroutine(go())

    def issue(self, window: PairingWindow, name: str, csr_pem: str,
              peer: str) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._issue(window, name, csr_pem, peer))

    async def _issue(self, window: PairingWindow, name: str, csr_pem: str,
                     peer: str) -> dict[str, Any]:
        if self.ca is None:
            raise PairingRefused("no_ca")
        name = window.device_name or name
        try:
            cert = self.ca.issue_client_cert(csr_pem.encode("utf-8"), name)
        except (CSRError, UnicodeEncodeError):
            raise PairingRefused("bad_csr") from None
        did = device_id(cert)
        # Single use: the first attempt that gets here takes the window.
        if not await self.windows.use(window.window_id, did):
            raise PairingRefused("window_closed")
        cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        device = await self.devices.add(cert_pem, name, paired_for=window.paired_for)
        self.on_paired(device)
        await self.audit.append("device_paired", "gateway", {
            "device_id": did, "name": name, "paired_for": window.paired_for,
            "window_id": window.window_id, "peer": peer})
        await self.refresh()
        ca_pem = self.ca.cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        return {"certificate_pem": cert_pem, "ca_pem": ca_pem, "device_id": device.device_id,
                "name": name, "gateway_fingerprint": self.fingerprint,
                "tls": self.tls_address()}

    def issue_sync(self, window: PairingWindow, body: dict[str, Any],
                   peer: str) -> Deferred[tuple[dict[str, Any], Any]]:
        """A gateway joins for sync (version 2): :class:`aico.sync.join.JoinHost` issues
        its certificate, registers it and answers with our CSR."""
        async def go() -> tuple[dict[str, Any], Any]:
            if self.sync_join is None or self.ca is None:
                raise PairingRefused("sync_disabled")
            result: tuple[dict[str, Any], Any] = await self.sync_join.issue(window, body, peer)
            await self.refresh()
            return result

        return Deferred.fromCoroutine(go())

    def finish_sync(self, pending: Any, body: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """The joining gateway's certificate for us: the peer is stored."""
        async def go() -> dict[str, Any]:
            if self.sync_join is None:
                raise PairingRefused("sync_disabled")
            done: dict[str, Any] = await self.sync_join.finish(pending, body)
            return done

        return Deferred.fromCoroutine(go())


def _window_detail(window: PairingWindow) -> dict[str, Any]:
    """A window as the audit log records it (never its code)."""
    return {"window_id": window.window_id, "device_name": window.device_name,
            "paired_for": window.paired_for, "expires_at": window.expires_at,
            "failures": window.failures}
