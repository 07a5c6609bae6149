"""The device registry and pairing windows, in the registry database.

:class:`DeviceStore` and :class:`PairingWindowStore` run over any
:class:`~aico.gateway.store.DatabaseLike`: the gateway's :class:`~aico.gateway.store.Database`
(queries on the database's thread) or, in the ``aico-gateway`` CLI, a
:class:`~aico.gateway.store.SyncDatabase` (take each result with
:func:`~aico.gateway.store.sync_result`).

A change made by another process (the CLI revokes a device, opens a pairing window) is
seen by a running gateway through :class:`ChangeWatcher`: SQLite's ``PRAGMA data_version``
changes whenever *another* connection commits, so one cheap query a few times a second
tells the gateway when to look again. Changes the gateway makes itself are announced by
the code that makes them.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from aico.gateway.devices.ca import device_id as device_id_of
from aico.gateway.store import DatabaseLike

__all__ = [
    "CODE_ALPHABET",
    "TRUST_LEVELS",
    "ChangeWatcher",
    "Device",
    "DeviceStore",
    "PairingWindow",
    "PairingWindowStore",
    "new_code",
]

#: A device is trusted for ordinary use, or also for administration.
TRUST_LEVELS = ("standard", "admin")

#: Pairing codes: digits and upper-case letters without look-alikes (0/O, 1/I/L).
CODE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"


def new_code(length: int = 8) -> str:
    """A short one-time pairing code, written ``ABCD-EFGH`` (40 bits at length 8)."""
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(length))
    return "-".join(raw[i:i + 4] for i in range(0, len(raw), 4))


def normalise_code(code: str) -> str:
    """What a person typed, as the code compares: upper case, no dashes or spaces."""
    return "".join(ch for ch in code.upper() if ch not in "- ")


@dataclass(frozen=True)
class Device:
    device_id: str
    name: str
    cert_pem: str
    trust: str
    capabilities: tuple[str, ...]
    paired_for: str | None
    paired_at: float
    last_seen: float | None
    revoked: bool
    revoked_at: float | None

    def public(self) -> dict[str, Any]:
        """The registry entry as the API and the CLI show it (no certificate)."""
        return {
            "device_id": self.device_id, "name": self.name, "trust": self.trust,
            "capabilities": list(self.capabilities), "paired_for": self.paired_for,
            "paired_at": self.paired_at, "last_seen": self.last_seen,
            "revoked": self.revoked, "revoked_at": self.revoked_at,
        }


_DEVICE_COLUMNS = ("device_id, name, cert_pem, trusted_admin, capabilities, paired_for, "
                   "created_at, last_seen, revoked, revoked_at")


def _device(row: tuple[Any, ...]) -> Device:
    return Device(
        device_id=row[0], name=row[1], cert_pem=row[2],
        trust="admin" if row[3] else "standard",
        capabilities=tuple(json.loads(row[4])), paired_for=row[5],
        paired_at=float(row[6]), last_seen=None if row[7] is None else float(row[7]),
        revoked=bool(row[8]), revoked_at=None if row[9] is None else float(row[9]),
    )


class DeviceStore:
    """Paired devices, over any :class:`DatabaseLike`."""

    def __init__(self, db: DatabaseLike, clock: IReactorTime | None = None) -> None:
        self.db = db
        self._now: Callable[[], float] = clock.seconds if clock is not None else time.time

    async def add(self, cert_pem: str, name: str, *, paired_for: str | None = None,
                  capabilities: tuple[str, ...] = (), trust: str = "standard") -> Device:
        """Register the device holding *cert_pem* (its ID is the certificate's)."""
        if trust not in TRUST_LEVELS:
            raise ValueError(f"trust must be one of {TRUST_LEVELS}")
        did = device_id_of(x509.load_pem_x509_certificate(cert_pem.encode("ascii")))
        now = self._now()
        await self.db.run_operation(
            "INSERT INTO devices (device_id, name, cert_pem, trusted_admin, capabilities, "
            "paired_for, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (did, name, cert_pem, int(trust == "admin"), json.dumps(list(capabilities)),
             paired_for, now),
        )
        device = await self.get(did)
        assert device is not None
        return device

    async def get(self, device_id: str) -> Device | None:
        rows = await self.db.run_query(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,))  # noqa: S608
        return _device(rows[0]) if rows else None

    async def list(self) -> list[Device]:
        rows = await self.db.run_query(
            f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY created_at, device_id")  # noqa: S608
        return [_device(r) for r in rows]

    async def revoked_ids(self) -> set[str]:
        rows = await self.db.run_query("SELECT device_id FROM devices WHERE revoked = 1")
        return {r[0] for r in rows}

    async def revoke(self, device_id: str) -> bool:
        """Revoke a device; False when there is no such device or it was revoked already."""
        rows = await self.db.run_query(
            "UPDATE devices SET revoked = 1, revoked_at = ? WHERE device_id = ? AND revoked = 0 "
            "RETURNING device_id", (self._now(), device_id))
        return bool(rows)

    async def rename(self, device_id: str, name: str) -> bool:
        rows = await self.db.run_query(
            "UPDATE devices SET name = ? WHERE device_id = ? RETURNING device_id",
            (name, device_id))
        return bool(rows)

    async def touch(self, device_id: str) -> None:
        """Note that the device was seen now."""
        await self.db.run_operation("UPDATE devices SET last_seen = ? WHERE device_id = ?",
                                    (self._now(), device_id))


@dataclass(frozen=True)
class PairingWindow:
    window_id: str
    code: str
    device_name: str | None
    paired_for: str | None
    opened_by: str
    opened_at: float
    expires_at: float
    failures: int
    #: ``open``, ``used`` (a device paired), ``closed`` (too many failures or by hand),
    #: or ``expired``.
    state: str
    device_id: str | None

    def is_open(self, now: float) -> bool:
        return self.state == "open" and now < self.expires_at


_WINDOW_COLUMNS = ("window_id, code, device_name, paired_for, opened_by, opened_at, "
                   "expires_at, failures, state, device_id")


def _window(row: tuple[Any, ...]) -> PairingWindow:
    return PairingWindow(row[0], row[1], row[2], row[3], row[4], float(row[5]), float(row[6]),
                         int(row[7]), row[8], row[9])


class PairingWindowStore:
    """Pairing windows: opened by an operator, used once, closed by failures or time."""

    def __init__(self, db: DatabaseLike, clock: IReactorTime | None = None) -> None:
        self.db = db
        self._now: Callable[[], float] = clock.seconds if clock is not None else time.time

    async def open(self, *, seconds: float, opened_by: str, device_name: str | None = None,
                   paired_for: str | None = None, code: str | None = None) -> PairingWindow:
        """Open a window for *seconds* with a new one-time code."""
        now = self._now()
        window_id = uuid.uuid4().hex
        await self.db.run_operation(
            f"INSERT INTO pairing_windows ({_WINDOW_COLUMNS}) "  # noqa: S608
            "VALUES (?, ?, ?, ?, ?, ?, ?, 0, 'open', NULL)",
            (window_id, normalise_code(code or new_code()), device_name, paired_for,
             opened_by, now, now + seconds))
        window = await self.get(window_id)
        assert window is not None
        return window

    async def get(self, window_id: str) -> PairingWindow | None:
        rows = await self.db.run_query(
            f"SELECT {_WINDOW_COLUMNS} FROM pairing_windows WHERE window_id = ?",  # noqa: S608
            (window_id,))
        return _window(rows[0]) if rows else None

    async def active(self) -> list[PairingWindow]:
        """Windows open now (expired ones are marked ``expired`` on the way)."""
        now = self._now()
        await self.db.run_operation(
            "UPDATE pairing_windows SET state = 'expired' WHERE state = 'open' AND expires_at <= ?",
            (now,))
        rows = await self.db.run_query(
            f"SELECT {_WINDOW_COLUMNS} FROM pairing_windows WHERE state = 'open' "  # noqa: S608
            "ORDER BY opened_at", ())
        return [_window(r) for r in rows]

    async def record_failure(self, window_id: str, max_failures: int) -> PairingWindow | None:
        """Count a failed attempt; the window closes at *max_failures*."""
        rows = await self.db.run_query(
            "UPDATE pairing_windows SET failures = failures + 1, "  # noqa: S608
            "state = CASE WHEN failures + 1 >= ? THEN 'closed' ELSE state END "
            f"WHERE window_id = ? AND state = 'open' RETURNING {_WINDOW_COLUMNS}",
            (max_failures, window_id))
        return _window(rows[0]) if rows else None

    async def use(self, window_id: str, device_id: str) -> bool:
        """Mark the window used by *device_id*; False unless it was open (single use)."""
        rows = await self.db.run_query(
            "UPDATE pairing_windows SET state = 'used', device_id = ? "
            "WHERE window_id = ? AND state = 'open' AND expires_at > ? RETURNING window_id",
            (device_id, window_id, self._now()))
        return bool(rows)

    async def close(self, window_id: str) -> bool:
        rows = await self.db.run_query(
            "UPDATE pairing_windows SET state = 'closed' WHERE window_id = ? AND state = 'open' "
            "RETURNING window_id", (window_id,))
        return bool(rows)


class ChangeWatcher:
    """Calls its listeners when another process committed to the registry database.

    :meth:`check` (run it from a :class:`aico.services.PeriodicJob`, e.g. every 0.25 s)
    reads ``PRAGMA data_version``, which SQLite changes when a commit by *another*
    connection becomes visible to this one; the first check only records the value.
    """

    log = Logger()

    def __init__(self, db: DatabaseLike) -> None:
        self.db = db
        self._version: int | None = None
        self._listeners: list[Callable[[], object]] = []

    def add_listener(self, listener: Callable[[], object]) -> None:
        self._listeners.append(listener)

    def check(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._check())

    async def _check(self) -> None:
        rows = await self.db.run_query("PRAGMA data_version")
        version = int(rows[0][0])
        changed = self._version is not None and version != self._version
        self._version = version
        if changed:
            for listener in list(self._listeners):
                try:
                    result = listener()
                    if isinstance(result, Deferred):
                        await result
                except Exception:
                    self.log.failure("a registry change listener failed")
