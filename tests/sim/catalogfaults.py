"""Faults of the catalog's SQLite (tests/sim): a connection proxy that sees every COMMIT.

The engine's catalog (`snapfs/volume/catalog.py`) ends each transaction with
`db.execute("COMMIT")`. `FaultyConnection` stands in for its `db` and asks `fault()` at
each COMMIT what happens:

- None: it commits;
- "eio" / "enospc": the commit fails, SQLite rolls the transaction back, and the engine
  gets `sqlite3.OperationalError` (disk I/O error, database or disk is full);
- "crash-before" / "crash-after": the node dies at the commit, before it or just after it
  is durable: `on_crash()` makes that instant the crash (the world freezes everything),
  then `NodeCrashed` unwinds the engine's code from there.
"""

from __future__ import annotations

import sqlite3


class NodeCrashed(BaseException):  # not an error: the node is gone
    """The node died in the middle of engine code (at a catalog commit)."""


class FaultyConnection:
    def __init__(self, db: sqlite3.Connection, fault, on_crash) -> None:
        self._db = db
        self._fault = fault
        self._on_crash = on_crash

    def __getattr__(self, name: str):
        return getattr(self._db, name)

    def execute(self, sql: str, *args):
        if sql.strip().upper() != "COMMIT":
            return self._db.execute(sql, *args)
        fault = self._fault()
        if fault is None:
            return self._db.execute(sql, *args)
        if fault in ("eio", "enospc"):
            self._db.execute("ROLLBACK")
            what = "disk I/O error" if fault == "eio" else "database or disk is full"
            raise sqlite3.OperationalError(f"injected: {what}")
        if fault == "crash-after":
            self._db.execute(sql, *args)
        self._on_crash()
        raise NodeCrashed(f"the node crashed at a catalog commit ({fault})")
