"""The gateways this one syncs with: the ``sync_peers`` table (migration 5).

A row per peer, written by ``sync join`` on both sides (:mod:`aico.sync.join`):

* ``peer_id`` — the peer's device ID *in our registry* (the certificate our CA issued it);
  the name the policy (``[sync.collections.X] peers``), the engine and ``sync_acks`` use.
  ``device_id`` holds the same value.
* ``host``/``port`` — where its ``sync`` listener is (``""``/0: it cannot be dialled;
  it dials us).
* ``their_ca`` — its device CA (PEM): the only root we trust for its server certificate.
* ``our_device_id``/``our_cert`` — the client certificate *its* CA issued us, and
  ``our_key`` its private key sealed with the state directory's keystore
  (:mod:`aico.keystore`, role :data:`KEY_ROLE`).

:func:`client_options` turns a row into the TLS options of a connection to that peer:
TLS 1.3 only, our certificate for it, and its CA as the only trust root.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.interfaces import IReactorTime
from twisted.internet.ssl import CertificateOptions, TLSVersion

from aico.gateway.store import DatabaseLike
from aico.gateway.tls import _DeviceCATrust
from aico.keystore import Keystore

__all__ = ["KEY_ROLE", "PeerStore", "SyncPeer", "client_options", "open_key", "seal_key"]

#: The keystore role our client keys for peers are sealed under.
KEY_ROLE = "sync-peer-key"

_COLUMNS = ("peer_id, name, device_id, host, port, their_ca, our_device_id, our_cert, "
            "our_key, added_at, last_round, last_error")


@dataclass(frozen=True)
class SyncPeer:
    peer_id: str
    name: str
    device_id: str
    host: str
    port: int
    their_ca: str
    our_device_id: str
    our_cert: str
    our_key: str
    added_at: float
    last_round: float | None = None
    last_error: str | None = None

    def __repr__(self) -> str:  # the sealed key stays out of logs
        return f"SyncPeer({self.peer_id!r}, {self.name!r}, {self.host}:{self.port})"

    @property
    def dialable(self) -> bool:
        return bool(self.host) and self.port > 0


def _peer(row: tuple[Any, ...]) -> SyncPeer:
    return SyncPeer(row[0], row[1], row[2], row[3], int(row[4]), row[5], row[6], row[7],
                    row[8], float(row[9]), None if row[10] is None else float(row[10]), row[11])


def seal_key(keystore: Keystore, key: ec.EllipticCurvePrivateKey) -> str:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    return keystore.seal(data, KEY_ROLE).decode("ascii")


def open_key(keystore: Keystore, sealed: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(
        keystore.open(sealed.encode("ascii"), KEY_ROLE, "a sync peer's client key"), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("a sync peer's client key is not an EC key")
    return key


def client_options(peer: SyncPeer, keystore: Keystore) -> CertificateOptions:
    """TLS 1.3 client options for *peer*: our certificate from its CA, its CA trusted
    alone (OpenSSL checks the server certificate's chain and ``serverAuth`` purpose)."""
    key: Any = open_key(keystore, peer.our_key)
    cert: Any = x509.load_pem_x509_certificate(peer.our_cert.encode("ascii"))
    trust: Any = _DeviceCATrust(x509.load_pem_x509_certificate(peer.their_ca.encode("ascii")))
    return CertificateOptions(privateKey=key, certificate=cert, trustRoot=trust,
                              raiseMinimumTo=TLSVersion.TLSv1_3)


class PeerStore:
    """``sync_peers`` over any :class:`DatabaseLike` (the gateway's or the CLI's)."""

    def __init__(self, db: DatabaseLike, clock: IReactorTime | None = None) -> None:
        self.db = db
        self._now: Callable[[], float] = clock.seconds if clock is not None else time.time

    async def add(self, peer: SyncPeer) -> SyncPeer:
        """Insert *peer*, replacing an older row of the same peer (paired again)."""
        await self.db.run_operation(
            f"INSERT OR REPLACE INTO sync_peers ({_COLUMNS}) "  # noqa: S608
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
            (peer.peer_id, peer.name, peer.device_id, peer.host, peer.port, peer.their_ca,
             peer.our_device_id, peer.our_cert, peer.our_key, peer.added_at or self._now()))
        stored = await self.get(peer.peer_id)
        assert stored is not None
        return stored

    async def get(self, peer_id: str) -> SyncPeer | None:
        rows = await self.db.run_query(
            f"SELECT {_COLUMNS} FROM sync_peers WHERE peer_id = ?", (peer_id,))  # noqa: S608
        return _peer(rows[0]) if rows else None

    async def list(self) -> list[SyncPeer]:
        rows = await self.db.run_query(
            f"SELECT {_COLUMNS} FROM sync_peers ORDER BY added_at, peer_id")  # noqa: S608
        return [_peer(r) for r in rows]

    async def remove(self, peer_id: str) -> bool:
        rows = await self.db.run_query(
            "DELETE FROM sync_peers WHERE peer_id = ? RETURNING peer_id", (peer_id,))
        return bool(rows)

    async def record_round(self, peer_id: str, when: float | None, error: str | None) -> None:
        """Note a finished round (*when*) or a failure (*error*)."""
        if when is not None:
            await self.db.run_operation(
                "UPDATE sync_peers SET last_round = ?, last_error = NULL WHERE peer_id = ?",
                (when, peer_id))
        else:
            await self.db.run_operation(
                "UPDATE sync_peers SET last_error = ? WHERE peer_id = ?", (error, peer_id))
