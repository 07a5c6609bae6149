"""Test doubles shared by several test modules."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed

T = TypeVar("T")


class SyncSqlite:
    """A synchronous stand-in for ``aico.gateway.store.Database`` over a real sqlite file
    (or ``:memory:``): same three methods, answered at once."""

    def __init__(self, path: str = ":memory:") -> None:
        self.conn = sqlite3.connect(path)

    def run_query(self, sql: str, params: Any = ()) -> Deferred[list[tuple[Any, ...]]]:
        rows = self.conn.execute(sql, params).fetchall()
        self.conn.commit()
        return succeed(rows)

    def run_operation(self, sql: str, params: Any = ()) -> Deferred[None]:
        self.conn.execute(sql, params)
        self.conn.commit()
        return succeed(None)

    def run_interaction(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        cursor = self.conn.cursor()
        try:
            result = fn(cursor, *args)
        except Exception:
            self.conn.rollback()
            return fail()
        self.conn.commit()
        return succeed(result)

    def close(self) -> None:
        self.conn.close()
