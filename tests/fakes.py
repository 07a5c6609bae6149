"""Test doubles shared by several test modules.

The synchronous SQLite double is production code now: :class:`aico.gateway.store.SyncDatabase`
(it runs the real migrations, triggers and indexes included). ``SyncSqlite`` stays as its
old name for code written against this module.
"""

from __future__ import annotations

from aico.gateway.store import SyncDatabase

SyncSqlite = SyncDatabase

__all__ = ["SyncSqlite"]
