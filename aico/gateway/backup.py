"""Backup and restore of a state directory (``aico-gateway backup DIR`` / ``restore DIR``).

A backup is consistent while a gateway runs and writes:

* ``registry.db`` (users, devices, revocations, the audit log, …) is copied with SQLite's
  online backup API (:meth:`sqlite3.Connection.backup`): one consistent snapshot, taken
  while readers and writers go on;
* the audit log's anchor (``audit-head.json``) is read *before* the snapshot and checked
  against it afterwards (the anchor's entry must be in the snapshot; else the snapshot is
  taken again), so the restored log verifies;
* every other file is copied as it is (the private keys are sealed at rest; the key
  files change only when an operator rotates them): ``keystore.json``, ``ca/``, ``tls/``,
  ``jwt/``, ``curve/``, ``initial-admin-password`` while it exists, and ``master-key``
  **only when that file is where the master secret lives** — with the secret in the
  platform keyring or ``$AICO_MASTER_PASSWORD`` the backup holds sealed keys without
  what opens them (keep that secret apart; ``docs/state.md``);
* ``backup-manifest.json`` lists every file with its size, mode and SHA-256.

Left out: ``ports.json``, the ``gateway.ipc`` socket, lock files and SQLite's ``-wal`` /
``-shm`` / ``-journal`` side files.

:func:`restore` checks the backup against its manifest, copies it into a new or empty
directory (a non-empty one only with ``force``), and verifies the copy: checksums,
``PRAGMA integrity_check`` and the audit chain of the registry.

Everything here blocks (files, SQLite): it runs in the CLI, never on a reactor thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aico.gateway.security.audit import read_anchor

__all__ = [
    "MANIFEST",
    "BackupError",
    "BackupReport",
    "RestoreReport",
    "backup",
    "restore",
    "verify_backup",
]

#: The manifest's file name inside a backup directory.
MANIFEST = "backup-manifest.json"
FORMAT = 1
REGISTRY = "registry.db"
AUDIT_ANCHOR = "audit-head.json"
MASTER_KEY = "master-key"
#: Files of a state directory that are not state (rebuilt at start, or transient).
_SKIP_NAMES = frozenset({"ports.json", "gateway.ipc", ".bootstrap.lock", MANIFEST})
_SKIP_SUFFIXES = ("-wal", "-shm", "-journal", ".tmp", ".lock")
#: Attempts at a snapshot that agrees with the audit anchor read before it.
_SNAPSHOT_ATTEMPTS = 5


class BackupError(Exception):
    """A backup or restore that cannot be made or does not verify (one line)."""


@dataclass(frozen=True)
class BackupReport:
    target: Path
    files: tuple[str, ...]
    #: Whether the backup holds ``master-key`` (the master secret itself).
    master_key_included: bool


@dataclass(frozen=True)
class RestoreReport:
    target: Path
    files: tuple[str, ...]
    audit_entries: int
    master_key_included: bool
    notes: tuple[str, ...] = field(default=())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _skipped(rel: Path) -> bool:
    return rel.name in _SKIP_NAMES or rel.name.endswith(_SKIP_SUFFIXES)


def _state_files(root: Path) -> Iterator[Path]:
    """Every regular file of the state directory worth keeping, relative, sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            if _skipped(rel) or rel.as_posix() == REGISTRY:
                continue
            if stat.S_ISREG(path.lstat().st_mode):
                yield rel


def _empty_or_missing(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def _make_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _read_anchor(path: Path) -> tuple[int, str] | None:
    try:
        return read_anchor(path)
    except (OSError, ValueError) as e:
        raise BackupError(f"{path}: unreadable audit anchor ({e})") from e


def _snapshot(source: Path, target: Path) -> None:
    """One consistent copy of the SQLite database *source* at *target* (online backup)."""
    target.unlink(missing_ok=True)
    src = sqlite3.connect(source, timeout=30)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
            # A self-contained file: no WAL beside it.
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
    finally:
        src.close()
    os.chmod(target, 0o600)


def _audit_entry(db: Path, seq: int) -> str | None:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT hash FROM audit_log WHERE seq = ?", (seq,)).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return None if row is None else str(row[0])


def backup(state_dir: Path, target: Path, *, version: str = "") -> BackupReport:
    """Copy the state directory *state_dir* into *target* (missing or empty), consistently
    while a gateway runs; write the manifest. Raises :class:`BackupError`."""
    if not (state_dir / REGISTRY).is_file():
        raise BackupError(f"{state_dir}: not a state directory (no {REGISTRY})")
    if not _empty_or_missing(target):
        raise BackupError(f"{target} exists and is not empty; give a new or empty directory")
    if target.resolve() == state_dir.resolve() or state_dir.resolve() in target.resolve().parents:
        raise BackupError(f"{target} is inside the state directory {state_dir}")
    _make_dir(target)
    # The anchor first, then the snapshot: the snapshot must hold the anchored entry.
    for _ in range(_SNAPSHOT_ATTEMPTS):
        anchor_bytes = _read_bytes(state_dir / AUDIT_ANCHOR)
        anchor = _read_anchor(state_dir / AUDIT_ANCHOR)
        _snapshot(state_dir / REGISTRY, target / REGISTRY)
        if anchor is None or _audit_entry(target / REGISTRY, anchor[0]) == anchor[1]:
            break
        time.sleep(0.05)  # an append between the two reads: its commit is moments away
    else:
        raise BackupError(f"{state_dir / REGISTRY}: the audit log keeps moving past its "
                          "anchor; try again")
    files: dict[str, dict[str, Any]] = {}
    for rel in _state_files(state_dir):
        source, dest = state_dir / rel, target / rel
        _make_dir(dest.parent)
        if rel.as_posix() == AUDIT_ANCHOR:
            if anchor_bytes is None:
                continue
            dest.write_bytes(anchor_bytes)  # the anchor the snapshot agrees with
        else:
            try:
                shutil.copyfile(source, dest)
            except FileNotFoundError:  # gone meanwhile (a retired JWT key forgotten)
                continue
        mode = stat.S_IMODE(source.stat().st_mode) if source.exists() else 0o600
        os.chmod(dest, mode)
        files[rel.as_posix()] = {"sha256": _sha256(dest), "size": dest.stat().st_size,
                                 "mode": f"{mode:04o}"}
    files[REGISTRY] = {"sha256": _sha256(target / REGISTRY),
                       "size": (target / REGISTRY).stat().st_size, "mode": "0600"}
    master = MASTER_KEY in files
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": str(state_dir.absolute()),
        "gateway_version": version,
        "master_key_included": master,
        "files": dict(sorted(files.items())),
    }
    manifest_path = target / MANIFEST
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.chmod(manifest_path, 0o600)
    return BackupReport(target, tuple(sorted(files)), master)


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _manifest(backup_dir: Path) -> dict[str, Any]:
    path = backup_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupError(f"{path}: missing; {backup_dir} is not a backup") from None
    except (OSError, ValueError) as e:
        raise BackupError(f"{path}: unreadable ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or not isinstance(manifest.get("files"), dict):
        raise BackupError(f"{path}: not a backup manifest of format {FORMAT}")
    for rel in manifest["files"]:
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts:
            raise BackupError(f"{path}: unsafe path {rel!r}")
    return manifest


def _check(directory: Path, files: dict[str, Any]) -> None:
    for rel, info in files.items():
        path = directory / rel
        if not path.is_file():
            raise BackupError(f"{path}: missing")
        if _sha256(path) != info.get("sha256"):
            raise BackupError(f"{path}: checksum does not match the manifest")


def verify_backup(backup_dir: Path) -> dict[str, Any]:
    """The manifest of *backup_dir*, after checking every file against it."""
    manifest = _manifest(backup_dir)
    _check(backup_dir, manifest["files"])
    return manifest


def _verify_registry(db: Path, anchor: Path) -> int:
    """``PRAGMA integrity_check`` and the audit chain; the number of audit entries."""
    from twisted.internet.task import Clock

    from aico.gateway.security.audit import AuditLog
    from aico.gateway.store import SyncDatabase, sync_result

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        result = conn.execute("PRAGMA integrity_check").fetchone()
    finally:
        conn.close()
    if not result or result[0] != "ok":
        raise BackupError(f"{db}: integrity check failed ({result[0] if result else '?'})")
    database = SyncDatabase(db)
    try:
        verdict = sync_result(AuditLog(database, Clock(), anchor_path=anchor).verify())
    finally:
        database.close()
    if not verdict.ok:
        raise BackupError(f"{db}: the audit log does not verify ({verdict.reason})")
    return int(verdict.checked)


def restore(backup_dir: Path, target: Path, *, force: bool = False) -> RestoreReport:
    """Restore *backup_dir* into the state directory *target* (new or empty; with
    *force*, an existing one: the backup's files replace theirs). Stop any gateway on
    *target* first. Raises :class:`BackupError`."""
    manifest = verify_backup(backup_dir)
    if not _empty_or_missing(target) and not force:
        raise BackupError(f"{target} exists and is not empty; restore into a new directory, "
                          "or give --force to overwrite it")
    _make_dir(target)
    for side in ("registry.db-wal", "registry.db-shm", "registry.db-journal", "ports.json"):
        (target / side).unlink(missing_ok=True)
    files: dict[str, Any] = manifest["files"]
    for rel, info in files.items():
        source, dest = backup_dir / rel, target / rel
        _make_dir(dest.parent)
        tmp = dest.with_name(dest.name + ".restore.tmp")
        shutil.copyfile(source, tmp)
        os.chmod(tmp, int(str(info.get("mode", "0600")), 8) & 0o700)
        os.replace(tmp, dest)
    _check(target, files)
    entries = _verify_registry(target / REGISTRY, target / AUDIT_ANCHOR)
    master = bool(manifest.get("master_key_included"))
    notes = () if master else (
        "the backup holds no master-key file: give the restored gateway its master secret "
        "through AICO_MASTER_PASSWORD, or store it in the platform keyring for the new "
        f"path (service 'aico-gateway', user {str(target.absolute())!r})",)
    return RestoreReport(target, tuple(sorted(files)), entries, master, notes)
