"""``aico-gateway sync join``: two gateways pair for sync over the pairing protocol, v2.

The joining gateway (side A, :func:`join`; it may be running or not) talks to the
``pairing`` listener of the other (side B, :class:`JoinHost` behind
:class:`~aico.gateway.devices.pairing.PairingService`), whose pairing window gave the
code. Steps 1-4 are the device pairing's (SPAKE2 with the code, key confirmation),
under version-2 labels; then (``docs/sync-protocol.md``, "Joining"):

5. A → B sealed ``request``: ``{kind: "sync", name, csr_pem, ca_pem, node_id, sync}`` —
   A's CSR for a client certificate from B's CA, A's CA, where A's ``sync`` listener is.
6. B → A sealed ``answer``: the certificate B's CA issued A, B's CA, B's ``sync`` address,
   and B's own CSR (``csr_pem``, ``peer_name``). B has registered A (``paired_for = sync``).
7. A → B sealed ``final``: ``{certificate_pem}``, the certificate A's CA issued B.
8. B → A sealed ``done``: B stored A in ``sync_peers``; A then stores B in its registry
   and ``sync_peers`` (a running A picks it up through the registry watcher).

Each side's private key for the other never leaves it; it is kept sealed with the
state directory's keystore. The code is never logged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.threads import deferToThread
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from aico.gateway.devices import protocol as wire
from aico.gateway.devices.ca import CSRError, DeviceCA, create_csr, device_id, generate_key
from aico.gateway.devices.pairing import PairingRefused
from aico.gateway.devices.registry import Device, DeviceStore, PairingWindow, PairingWindowStore
from aico.gateway.store import DatabaseLike
from aico.keystore import Keystore
from aico.sync.peers import PeerStore, SyncPeer, seal_key
from aico.sync.service import PAIRED_FOR

__all__ = ["JoinFailed", "JoinHost", "JoinResult", "join"]


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _load_ca(pem: Any) -> x509.Certificate:
    """A peer's CA certificate: a self-signed CA (raises ValueError)."""
    if not isinstance(pem, str):
        raise ValueError("no CA certificate")
    cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if not bc.ca:
        raise ValueError("not a CA certificate")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise ValueError("the CA certificate is not self-signed") from e
    return cert


def _check_issued(pem: Any, ca: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """A certificate for *key*, issued by *ca* (raises ValueError)."""
    if not isinstance(pem, str):
        raise ValueError("no certificate")
    cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    if cert.public_key() != key.public_key():
        raise ValueError("the certificate is not for our key")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise ValueError("the certificate is not from the peer's CA") from e
    return cert


def _address(value: Any, fallback_host: str) -> tuple[str, int]:
    """``{host, port}`` of a sync listener; a wildcard host becomes *fallback_host*."""
    if not isinstance(value, dict):
        return "", 0
    host, port = value.get("host"), value.get("port")
    if not isinstance(port, int) or not 0 < port < 65536:
        return "", 0
    if not isinstance(host, str) or host in ("", "0.0.0.0", "::"):  # noqa: S104
        host = fallback_host
    return host, port


# --------------------------------------------------------------------------- side B


@dataclass
class _Pending:
    key: ec.EllipticCurvePrivateKey
    their_ca: x509.Certificate
    device_id: str
    name: str
    host: str
    port: int

    def __repr__(self) -> str:
        return f"_Pending({self.device_id!r})"


class JoinHost:
    """The gateway side of a sync join (steps 5-8), for the :class:`PairingService`."""

    def __init__(self, ca: DeviceCA, devices: DeviceStore, windows: PairingWindowStore,
                 peers: PeerStore, keystore: Keystore, audit: Any, *, name: str, node_id: str,
                 sync_address: Callable[[], dict[str, Any] | None],
                 run_cpu: Callable[..., Deferred[Any]],
                 on_device: Callable[[Device], object] = lambda d: None,
                 on_peer: Callable[[], object] = lambda: None) -> None:
        self.ca = ca
        self.devices = devices
        self.windows = windows
        self.peers = peers
        self.keystore = keystore
        self.audit = audit
        self.name = name
        self.node_id = node_id
        self.sync_address = sync_address
        self.run_cpu = run_cpu
        self.on_device = on_device
        self.on_peer = on_peer

    async def issue(self, window: PairingWindow, body: dict[str, Any],
                    peer: str) -> tuple[dict[str, Any], _Pending]:
        try:
            their_ca = _load_ca(body.get("ca_pem"))
        except ValueError:
            raise PairingRefused("bad_ca") from None
        if their_ca == self.ca.cert:
            raise PairingRefused("bad_ca")  # a gateway joining itself
        name = window.device_name or str(body.get("name"))
        try:
            cert = self.ca.issue_client_cert(str(body.get("csr_pem")).encode("utf-8"), name)
        except (CSRError, UnicodeEncodeError):
            raise PairingRefused("bad_csr") from None
        did = device_id(cert)
        if not await self.windows.use(window.window_id, did):
            raise PairingRefused("window_closed")
        device = await self.devices.add(_pem(cert), name, paired_for=PAIRED_FOR)
        self.on_device(device)
        await self.audit.append("device_paired", "gateway", {
            "device_id": did, "name": name, "paired_for": PAIRED_FOR,
            "window_id": window.window_id, "peer": peer})
        key: ec.EllipticCurvePrivateKey = await self.run_cpu(generate_key)
        csr = create_csr(key, self.name).public_bytes(serialization.Encoding.PEM).decode("ascii")
        host, port = _address(body.get("sync"), peer.rsplit(":", 1)[0])
        answer = {"certificate_pem": _pem(cert), "ca_pem": _pem(self.ca.cert),
                  "device_id": did, "name": name, "gateway_fingerprint": self.node_id,
                  "node_id": self.node_id, "tls": None, "sync": self.sync_address(),
                  "csr_pem": csr, "peer_name": self.name}
        return answer, _Pending(key, their_ca, did, name, host, port)

    async def finish(self, pending: _Pending, body: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(pending, _Pending):
            raise PairingRefused("unexpected_message")
        try:
            cert = _check_issued(body.get("certificate_pem"), pending.their_ca, pending.key)
        except ValueError:
            raise PairingRefused("bad_certificate") from None
        await self.peers.add(SyncPeer(
            peer_id=pending.device_id, name=pending.name, device_id=pending.device_id,
            host=pending.host, port=pending.port, their_ca=_pem(pending.their_ca),
            our_device_id=device_id(cert), our_cert=_pem(cert),
            our_key=seal_key(self.keystore, pending.key), added_at=0.0))
        await self.audit.append("sync_peer_added", "gateway", {
            "peer_id": pending.device_id, "name": pending.name,
            "host": pending.host, "port": pending.port})
        self.on_peer()
        return {"ok": True, "peer_id": pending.device_id}


# --------------------------------------------------------------------------- side A


class JoinFailed(Exception):
    """The join did not succeed; *reason* is the protocol's (``wrong_code``, …)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class JoinResult:
    #: The other gateway's device ID in our registry (its sync peer ID here).
    peer_id: str
    name: str
    host: str
    port: int
    #: Our device ID in the other gateway's registry.
    our_device_id: str
    node_id: str


class _Frames(Int32StringReceiver):
    MAX_LENGTH = wire.MAX_FRAME

    def __init__(self) -> None:
        self.frames: DeferredQueue[dict[str, Any] | None] = DeferredQueue()

    def stringReceived(self, string: bytes) -> None:
        try:
            self.frames.put(wire.decode(string))
        except wire.PairingProtocolError as e:
            self.frames.put({"type": "error", "reason": e.reason})

    def lengthLimitExceeded(self, length: int) -> None:
        self.frames.put({"type": "error", "reason": "frame_too_large"})
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.frames.put(None)

    def send(self, message: dict[str, Any]) -> None:
        self.sendString(wire.encode(message))  # type: ignore[no-untyped-call]

    async def expect(self, kind: str) -> dict[str, Any]:
        message = await self.frames.get()
        if message is None:
            raise JoinFailed("connection_lost")
        if message["type"] == "error":
            raise JoinFailed(str(message.get("reason", "refused")))
        if message["type"] != kind:
            raise JoinFailed("unexpected_message")
        return message


async def join(reactor: Any, *, ca: DeviceCA, keystore: Keystore, db: DatabaseLike,
               host: str, port: int, code: str, name: str, node_id: str,
               sync_address: dict[str, Any] | None, timeout: float = 30.0) -> JoinResult:
    """Join the gateway at *host*:*port* (its pairing listener) with *code*; store it as
    a device (``paired_for = sync``) and a sync peer in *db*. Raises :class:`JoinFailed`."""
    key: ec.EllipticCurvePrivateKey = await deferToThread(generate_key)
    csr = create_csr(key, name).public_bytes(serialization.Encoding.PEM).decode("ascii")
    factory = Factory.forProtocol(_Frames)
    try:
        proto = await HostnameEndpoint(reactor, host, port, timeout=timeout).connect(factory)
    except Exception as e:
        raise JoinFailed(f"unreachable: {e}") from e
    assert isinstance(proto, _Frames)
    transport: Any = proto.transport
    timer = reactor.callLater(timeout, transport.loseConnection)
    try:
        v = wire.JOIN_VERSION
        side, message_a = await deferToThread(wire.device_pake, code)
        proto.send({"type": "hello", "version": v, "pake": wire.b64e(message_a)})
        pake = await proto.expect("pake")
        try:
            message_b = wire.b64d(pake.get("pake"))
            k = await deferToThread(wire.device_finish, side, message_b)
        except wire.PairingProtocolError as e:
            raise JoinFailed(e.reason) from e
        keys = wire.derive(k, message_a, message_b, v)
        proto.send({"type": "confirm", "mac": wire.b64e(wire.mac(keys.device_confirm,
                                                                 keys.transcript))})
        confirm = await proto.expect("confirm")
        try:
            good = wire.mac_ok(keys.gateway_confirm, keys.transcript, wire.b64d(confirm.get("mac")))
        except wire.PairingProtocolError:
            good = False
        if not good:
            raise JoinFailed("gateway_not_confirmed")
        proto.send(wire.seal(keys.device_seal, {
            "kind": "sync", "name": name, "csr_pem": csr, "ca_pem": _pem(ca.cert),
            "node_id": node_id, "sync": sync_address}, wire.aad(v, "request")))
        try:
            answer = wire.open_box(keys.gateway_seal, await proto.expect("sealed"),
                                   wire.aad(v, "answer"))
            their_ca = _load_ca(answer.get("ca_pem"))
            ours = _check_issued(answer.get("certificate_pem"), their_ca, key)
            peer_name = str(answer.get("peer_name") or "gateway")
            theirs = ca.issue_client_cert(str(answer.get("csr_pem")).encode("utf-8"), peer_name)
        except (wire.PairingProtocolError, ValueError, CSRError) as e:
            raise JoinFailed(getattr(e, "reason", "bad_answer")) from e
        proto.send(wire.seal(keys.device_seal, {"certificate_pem": _pem(theirs)},
                             wire.aad(v, "final")))
        try:
            done = wire.open_box(keys.gateway_seal, await proto.expect("sealed"),
                                 wire.aad(v, "done"))
        except wire.PairingProtocolError as e:
            raise JoinFailed(e.reason) from e
        if done.get("ok") is not True:
            raise JoinFailed("not_stored")
    finally:
        if timer.active():
            timer.cancel()
        transport.loseConnection()
    _, sync_port = _address(answer.get("sync"), host)
    device = await DeviceStore(db).add(_pem(theirs), peer_name, paired_for=PAIRED_FOR)
    await PeerStore(db).add(SyncPeer(
        peer_id=device.device_id, name=peer_name, device_id=device.device_id, host=host,
        port=sync_port, their_ca=_pem(their_ca), our_device_id=device_id(ours),
        our_cert=_pem(ours), our_key=seal_key(keystore, key), added_at=time.time()))
    return JoinResult(device.device_id, peer_name, host, sync_port, device_id(ours),
                      str(answer.get("node_id", "")))
