"""``aico.files.write_atomic``: the one atomic file writer (CA files, JWT keys, the audit anchor)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from unittest import mock

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from aico.files import write_atomic
from aico.gateway.security.audit import AuditLog
from aico.gateway.store import SyncDatabase


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class WriteAtomicTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.path = self.dir / "file"
        old = os.umask(0o077)  # the mode is exact, whatever the umask
        self.addCleanup(os.umask, old)

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if p.name != "file")

    def test_new_file_has_the_content_and_exactly_the_mode(self) -> None:
        write_atomic(self.path, b"public", 0o644)
        self.assertEqual((self.path.read_bytes(), _mode(self.path)), (b"public", 0o644))
        write_atomic(self.path, b"secret", 0o600)
        self.assertEqual((self.path.read_bytes(), _mode(self.path)), (b"secret", 0o600))
        self.assertEqual(self.leftovers(), [])

    def test_without_overwrite_an_existing_file_is_refused_and_kept(self) -> None:
        write_atomic(self.path, b"first", 0o600, overwrite=False)
        self.assertRaises(FileExistsError, write_atomic, self.path, b"second", 0o600, overwrite=False)
        self.assertEqual(self.path.read_bytes(), b"first")
        self.assertEqual(self.leftovers(), [])

    def test_data_is_fsynced_before_it_is_moved_into_place(self) -> None:
        calls: list[str] = []
        real_fsync, real_replace = os.fsync, os.replace
        with mock.patch("os.fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1]), \
             mock.patch("os.replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1]):
            write_atomic(self.path, b"x", 0o600)
        self.assertEqual(calls, ["fsync", "replace"])

    def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(self) -> None:
        write_atomic(self.path, b"old", 0o600)
        with mock.patch("os.replace", side_effect=OSError("disk full")):
            self.assertRaises(OSError, write_atomic, self.path, b"new", 0o600)
        self.assertEqual(self.path.read_bytes(), b"old")
        self.assertEqual(self.leftovers(), [])


class AuditAnchorTests(SynchronousTestCase):
    def test_anchor_is_written_atomically_0600_with_the_head(self) -> None:
        db = SyncDatabase()
        self.addCleanup(db.close)
        anchor = Path(self.mktemp())
        audit = AuditLog(db, Clock(), anchor_path=anchor)
        entry = self.successResultOf(audit.append("login", "alice", {}))
        self.assertEqual(json.loads(anchor.read_text()), {"seq": 1, "hash": entry.hash})
        self.assertEqual(_mode(anchor), 0o600)
        self.assertEqual([p.name for p in anchor.parent.iterdir()], [anchor.name])
