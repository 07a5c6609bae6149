"""The append-only, hash-chained audit log of security events (docs/security.md § Audit log).

Each row of ``audit_log`` holds ``hash = sha256(prev_hash || canonical_json([seq, ts,
event, actor, detail]))`` in hex, where ``prev_hash`` is the previous row's ``hash``
(64 zeros for ``seq = 1``) and canonical JSON is UTF-8, sorted keys, no whitespace.
Appends are serialised (one at a time in this process; the explicit ``seq`` primary
key makes a concurrent writer in another process fail instead of forking the chain).

:meth:`AuditLog.verify` walks the whole table and reports the first row that breaks the
chain: an edited row (its hash no longer matches), a removed row (a gap in ``seq``,
or a ``prev_hash`` that does not match), reordered rows (the hash covers ``seq`` and
the previous hash). Limits, by design of a self-contained chain:

* removing the *newest* rows leaves a valid shorter chain; it is detected only
  against the head (last ``seq`` and ``hash``) that this process remembers, and, with
  ``anchor_path``, against the head written to that file after every append;
* someone who can rewrite the database *and* the anchor file can rebuild a valid
  chain; for that, ship the head hash elsewhere (logs, a remote system) regularly.

Callers never pass secrets in ``detail``: :func:`check_no_secrets` refuses keys named
like passwords, tokens, secrets, keys or cookies, and values that look like JWTs.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import re
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from aico.files import write_atomic
from aico.gateway.store import DatabaseLike

T = TypeVar("T")

GENESIS_HASH = "0" * 64
MAX_LIST = 1000

# Key names that must never reach the audit log, matched on the lower-cased key with
# "-" and " " read as "_": names that *end* in a secret's name (``password``,
# ``new_password``, ``access_token``, ``client_secret``, ``api_key``, ...), so that
# counters and flags such as ``tokens_revoked`` or ``password_changed`` stay allowed.
_SECRET_KEY = re.compile(
    r"(^|_)(pass(word|wd|phrase)?|pw|secret|token|credentials?|authorization|cookie|otp|pin"
    r"|pairing_?code|(api|private|secret|session|signing)_?key|session_?id|csrf)$"
    r"|^pass(word|wd|phrase)_(hash|value|plain)"
)
_JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*\.")


class AuditSecretError(ValueError):
    """``detail`` holds something that looks like a secret; nothing was written."""


class AuditError(Exception):
    """The audit log could not be written."""


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    ts: float
    event: str
    actor: str
    detail: Mapping[str, Any]
    prev_hash: str
    hash: str

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "event": self.event,
            "actor": self.actor,
            "detail": dict(self.detail),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    #: Rows checked (all of them when ok).
    checked: int
    #: The first row (by seq) that breaks the chain, None when ok or when only the
    #: head is missing (truncation).
    first_bad_seq: int | None = None
    reason: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
        }


def check_no_secrets(detail: Any, path: str = "detail") -> None:
    """Raise :class:`AuditSecretError` if *detail* has a secret-like key or a JWT-like value."""
    if isinstance(detail, Mapping):
        for key, value in detail.items():
            if not isinstance(key, str):
                raise AuditSecretError(f"{path}: keys must be strings")
            norm = key.lower().replace("-", "_").replace(" ", "_")
            if _SECRET_KEY.search(norm):
                raise AuditSecretError(f"{path}.{key}: looks like a secret; not logged")
            check_no_secrets(value, f"{path}.{key}")
    elif isinstance(detail, list | tuple):
        for i, value in enumerate(detail):
            check_no_secrets(value, f"{path}[{i}]")
    elif isinstance(detail, str) and _JWT_LIKE.search(detail):
        raise AuditSecretError(f"{path}: looks like a token; not logged")


def canonical_json(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def entry_hash(prev_hash: str, seq: int, ts: float, event: str, actor: str, detail: Any) -> str:
    body = canonical_json([seq, ts, event, actor, detail]).encode("utf-8")
    return hashlib.sha256(prev_hash.encode("ascii") + body).hexdigest()


class AuditLog:
    """Append, list and verify the audit chain in the ``audit_log`` table.

    *db* holds the registry schema (:data:`aico.gateway.store.MIGRATIONS`, whose
    triggers refuse to change or delete a row); this class creates no table.
    """

    log = Logger()

    def __init__(
        self,
        db: DatabaseLike,
        clock: IReactorTime,
        anchor_path: str | Path | None = None,
    ) -> None:
        self._db = db
        self._clock = clock
        self._lock = DeferredLock()
        self._anchor = Path(anchor_path) if anchor_path is not None else None
        #: (seq, hash) of the newest entry this process wrote or saw.
        self.head: tuple[int, str] | None = None

    # ------------------------------------------------------------------ append

    def append(
        self, event: str, actor: str, detail: Mapping[str, Any] | None = None
    ) -> Deferred[AuditEntry]:
        """Add one entry; refuses secret-looking ``detail`` (:class:`AuditSecretError`)."""
        try:
            if not event or not actor:
                raise ValueError("event and actor must not be empty")
            check_no_secrets(dict(detail or {}))
            # Round-trip through JSON: what is hashed is exactly what is stored.
            stored: dict[str, Any] = json.loads(canonical_json(dict(detail or {})))
        except (TypeError, ValueError) as e:
            d: Deferred[AuditEntry] = Deferred()
            d.errback(e if isinstance(e, ValueError) else ValueError(f"detail: {e}"))
            return d
        return self._lock.run(self._append, event, actor, stored)

    async def _append(self, event: str, actor: str, detail: dict[str, Any]) -> AuditEntry:
        ts = self._clock.seconds()
        entry = await self._db.run_interaction(
            _append_interaction, ts, event, actor, detail, self._anchor
        )
        self.head = (entry.seq, entry.hash)
        return entry

    # ------------------------------------------------------------------ read

    def list(
        self, limit: int = 100, after_seq: int | None = None
    ) -> Deferred[builtins.list[AuditEntry]]:
        """Entries in ``seq`` order after *after_seq* (from the first when None).

        For the newest entries first (the admin listing), use :meth:`latest`.
        """
        limit = max(1, min(limit, MAX_LIST))
        return Deferred.fromCoroutine(self._list(limit, after_seq or 0))

    async def _list(self, limit: int, after: int) -> builtins.list[AuditEntry]:
        rows = await self._db.run_query(
            "SELECT seq, ts, event, actor, detail, prev_hash, hash FROM audit_log "
            "WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        )
        return [_row_entry(r) for r in rows]

    def latest(self, limit: int = 100) -> Deferred[builtins.list[AuditEntry]]:
        """The newest *limit* entries, newest first (for the admin listing)."""
        limit = max(1, min(limit, MAX_LIST))
        return Deferred.fromCoroutine(self._latest(limit))

    async def _latest(self, limit: int) -> builtins.list[AuditEntry]:
        rows = await self._db.run_query(
            "SELECT seq, ts, event, actor, detail, prev_hash, hash FROM audit_log "
            "ORDER BY seq DESC LIMIT ?",
            (limit,),
        )
        return [_row_entry(r) for r in rows]

    # ------------------------------------------------------------------ verify

    def verify(self) -> Deferred[VerifyResult]:
        """Walk the whole chain (in the database's thread) and check the head."""
        return self._lock.run(self._verify)

    async def _verify(self) -> VerifyResult:
        result = await self._db.run_interaction(_verify_interaction, self.head, self._anchor)
        if not result.ok:
            self.log.warn(
                "audit chain verification failed at seq {seq}: {reason}",
                seq=result.first_bad_seq,
                reason=result.reason,
            )
        return result


# ---------------------------------------------------------------------- in the DB thread


def _row_entry(row: Sequence[Any]) -> AuditEntry:
    seq, ts, event, actor, detail, prev_hash, h = row
    try:
        parsed = json.loads(detail)
    except ValueError:
        parsed = {"_unparseable": True}
    return AuditEntry(int(seq), float(ts), str(event), str(actor), parsed, str(prev_hash), str(h))


def _append_interaction(
    cursor: Any,
    ts: float,
    event: str,
    actor: str,
    detail: dict[str, Any],
    anchor: Path | None,
) -> AuditEntry:
    cursor.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
    last = cursor.fetchone()
    seq, prev = (1, GENESIS_HASH) if last is None else (int(last[0]) + 1, str(last[1]))
    h = entry_hash(prev, seq, ts, event, actor, detail)
    try:
        cursor.execute(
            "INSERT INTO audit_log (seq, ts, event, actor, detail, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, ts, event, actor, canonical_json(detail), prev, h),
        )
    except sqlite3.IntegrityError as e:
        raise AuditError(f"audit_log: seq {seq} already taken (concurrent writer?)") from e
    if anchor is not None:
        _write_anchor(anchor, seq, h)
    return AuditEntry(seq, ts, event, actor, detail, prev, h)


def _write_anchor(path: Path, seq: int, h: str) -> None:
    write_atomic(path, json.dumps({"seq": seq, "hash": h}).encode("ascii"), 0o600)


def read_anchor(path: Path) -> tuple[int, str] | None:
    """The ``(seq, hash)`` an anchor file holds; ``None`` when there is none. Raises
    ``ValueError`` (or ``OSError``) for a file that cannot be read as an anchor."""
    try:
        raw = json.loads(path.read_text(encoding="ascii"))
    except FileNotFoundError:
        return None
    try:
        return int(raw["seq"]), str(raw["hash"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"not an audit anchor: {e}") from e


def _read_anchor(path: Path) -> tuple[int, str] | None:
    """:func:`read_anchor`, an unreadable anchor counting as a mismatch (``-1``)."""
    try:
        return read_anchor(path)
    except (OSError, ValueError):
        return (-1, "")


def _verify_interaction(
    cursor: Any, head: tuple[int, str] | None, anchor: Path | None
) -> VerifyResult:
    cursor.execute(
        "SELECT seq, ts, event, actor, detail, prev_hash, hash FROM audit_log ORDER BY seq"
    )
    prev = GENESIS_HASH
    expected_seq = 1
    checked = 0
    hashes: dict[int, str] = {}
    heads = [h for h in (head, _read_anchor(anchor) if anchor is not None else None) if h]
    wanted = {seq for seq, _ in heads}
    while True:
        rows = cursor.fetchmany(500)
        if not rows:
            break
        for seq, ts, event, actor, detail_text, prev_hash, h in rows:
            if seq != expected_seq:
                return VerifyResult(
                    False, checked, expected_seq, f"seq {expected_seq} missing (found {seq})"
                )
            if prev_hash != prev:
                return VerifyResult(False, checked, seq, "prev_hash does not match the chain")
            try:
                detail = json.loads(detail_text)
            except ValueError:
                return VerifyResult(False, checked, seq, "detail is not JSON")
            if entry_hash(prev, seq, ts, event, actor, detail) != h:
                return VerifyResult(False, checked, seq, "hash does not match the content")
            if seq in wanted:
                hashes[seq] = h
            prev = h
            expected_seq += 1
            checked += 1
    last_seq = expected_seq - 1
    for seq, h in heads:
        if seq < 0:
            return VerifyResult(False, checked, None, "anchor file is unreadable")
        if seq > last_seq:
            return VerifyResult(
                False, checked, last_seq + 1, f"log truncated: entries after {last_seq} missing"
            )
        if hashes.get(seq) != h:
            return VerifyResult(False, checked, seq, "entry differs from the recorded head")
    return VerifyResult(True, checked)
