"""Writing a file atomically: the one helper every part of aico uses to put a file on disk.

:func:`write_atomic` writes to a temporary file next to the target, created with its
final mode and fsynced, then moves it into place in one step, so a reader (or a crash)
sees either the whole old file, the whole new file, or, for a new file, none.
It blocks on disk: call it before the reactor runs, from the CLI, or in a thread.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: str | Path, data: bytes, mode: int, *, overwrite: bool = True) -> None:
    """Write *data* to *path* with exactly *mode* (the umask does not apply), atomically.

    The bytes go to a temporary file in the same directory (``.NAME.XXXX.tmp``). It is
    private from the start and gets *mode* before any byte is written, so a secret is
    never readable by others, not even briefly. After an fsync it replaces *path*
    (``os.replace``); with ``overwrite=False`` it is hard-linked into place instead,
    which raises :class:`FileExistsError` if *path* exists and leaves that file alone.
    The temporary file is removed whatever happens.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
