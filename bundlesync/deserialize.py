"""Writing store versions back into the app tables (the DESERIALIZING stage).

Store rows marked ``dirty`` are written table by table in foreign-key order
(parents first). A row whose foreign-key parent is not in the app table yet
*waits*: it stays dirty with a message in ``error`` and is retried by every later
import, so a child that arrives before its parent applies when the parent does.
A parent that is known only as a deletion does not block (the sender had the
same dangling reference). Self-referencing tables are applied in rounds until no
more rows can be placed, so parents go first whatever their order in the bundle.
A row the database refuses (a constraint) also stays dirty with the database's
message; the rest still applies.

Tracking triggers must be suppressed by the caller (:class:`~bundlesync.tracking.suppressed`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .db import q
from .profile import Profile, TableSpec
from .store import BATCH, decode_data

__all__ = ["DeserializeResult", "deserialize"]


@dataclass
class DeserializeResult:
    """Counts of what the stage did."""

    written: int = 0
    deleted: int = 0
    waiting: int = 0
    failed: int = 0
    by_model: dict[str, int] = field(default_factory=dict)


def _existing(conn: sqlite3.Connection, table: str, pk: str, ids: set[str]) -> set[str]:
    found: set[str] = set()
    pending = list(ids)
    for start in range(0, len(pending), 900):
        chunk = pending[start : start + 900]
        marks = ", ".join("?" * len(chunk))
        found.update(r[0] for r in conn.execute(f"SELECT {q(pk)} FROM {q(table)} WHERE {q(pk)} IN ({marks})", chunk))
    return found


def _tombstones(conn: sqlite3.Connection, model: str, ids: set[str]) -> set[str]:
    found: set[str] = set()
    pending = list(ids)
    for start in range(0, len(pending), 900):
        chunk = pending[start : start + 900]
        marks = ", ".join("?" * len(chunk))
        found.update(
            r[0]
            for r in conn.execute(
                f"SELECT id FROM bundlesync_store WHERE model = ? AND id IN ({marks}) AND (deleted OR purged)",
                [model, *chunk],
            )
        )
    return found


class _TableWriter:
    """Applies one table's dirty store rows."""

    def __init__(self, conn: sqlite3.Connection, profile: Profile, table: TableSpec) -> None:
        self.conn = conn
        self.table = table
        self.parents = dict(table.foreign_keys)
        if table.self_reference:
            self.parents[table.self_reference] = table.name
        self.parent_pk = {col: profile.table(parent).primary_key for col, parent in self.parents.items()}
        cols = table.columns
        updates = ", ".join(f"{q(c)} = excluded.{q(c)}" for c in cols if c != table.primary_key)
        self.upsert = (
            f"INSERT INTO {q(table.name)} ({', '.join(q(c) for c in cols)}) VALUES ({', '.join('?' * len(cols))}) "
            f"ON CONFLICT ({q(table.primary_key)}) DO "
            + (f"UPDATE SET {updates}" if updates else "NOTHING")
        )
        self.delete = f"DELETE FROM {q(table.name)} WHERE {q(table.primary_key)} = ?"

    def _blocked(self, rows: list[tuple[int, dict[str, Any]]]) -> dict[int, str]:
        """Rows whose foreign-key parent is absent, with the reason."""
        blocked: dict[int, str] = {}
        for col, parent in self.parents.items():
            wanted = {str(r[col]) for _, r in rows if r.get(col) is not None}
            if not wanted:
                continue
            ok = _existing(self.conn, parent, self.parent_pk[col], wanted)
            absent = wanted - ok
            if absent:
                absent -= _tombstones(self.conn, parent, absent)
            for rowid, r in rows:
                value = r.get(col)
                if value is not None and str(value) in absent and rowid not in blocked:
                    blocked[rowid] = f"waiting for {parent} {value} ({col}): not received yet"
        return blocked

    def apply(self, batch: Sequence[tuple[int, str, str, int, int]], result: DeserializeResult) -> int:
        """Apply one batch of ``(rowid, id, data, deleted, purged)``; return rows placed."""
        done: list[tuple[int]] = []
        errors: list[tuple[str, int]] = []
        removals = [(rowid, pk) for rowid, pk, _, deleted, purged in batch if deleted or purged]
        if removals:
            self.conn.executemany(self.delete, [(pk,) for _, pk in removals])
            done.extend((rowid,) for rowid, _ in removals)
            result.deleted += len(removals)
        rows = [(rowid, decode_data(data)) for rowid, _, data, deleted, purged in batch if not (deleted or purged)]
        blocked = self._blocked(rows)
        errors.extend((reason, rowid) for rowid, reason in blocked.items())
        ready = [(rowid, r) for rowid, r in rows if rowid not in blocked]
        cols = self.table.columns
        values = [tuple(r.get(c) for c in cols) for _, r in ready]
        try:
            self.conn.executemany(self.upsert, values)
            done.extend((rowid,) for rowid, _ in ready)
        except sqlite3.DatabaseError:
            # Find the rows the database refuses; each statement is atomic on its own.
            for (rowid, _), row_values in zip(ready, values):
                try:
                    self.conn.execute(self.upsert, row_values)
                    done.append((rowid,))
                except sqlite3.DatabaseError as exc:
                    errors.append((f"refused by the database: {exc}", rowid))
        placed = len(done) - len(removals)
        result.written += placed
        self.conn.executemany("UPDATE bundlesync_store SET dirty = 0, error = NULL WHERE rowid = ?", done)
        self.conn.executemany("UPDATE bundlesync_store SET error = ? WHERE rowid = ?", errors)
        return len(done)


def _dirty_batches(conn: sqlite3.Connection, model: str) -> Any:
    last = 0
    while True:
        batch = conn.execute(
            "SELECT rowid, id, data, deleted, purged FROM bundlesync_store "
            f"WHERE model = ? AND dirty = 1 AND rowid > ? ORDER BY rowid LIMIT {BATCH}",
            (model, last),
        ).fetchall()
        if not batch:
            return
        last = batch[-1][0]
        yield batch


def deserialize(conn: sqlite3.Connection, profile: Profile) -> DeserializeResult:
    """Write every dirty store row into its app table, parents first."""
    result = DeserializeResult()
    for table in profile.tables:
        writer = _TableWriter(conn, profile, table)
        before = result.written + result.deleted
        while True:
            placed = sum(writer.apply(batch, result) for batch in _dirty_batches(conn, table.name))
            # Self-references: a later round may place children whose parent came later in rowid order.
            if not (table.self_reference and placed):
                break
        if result.written + result.deleted > before:
            result.by_model[table.name] = result.written + result.deleted - before
    row = conn.execute(
        "SELECT count(*), sum(error LIKE 'waiting for%') FROM bundlesync_store WHERE dirty = 1"
    ).fetchone()
    result.waiting = int(row[1] or 0)
    result.failed = int(row[0]) - result.waiting
    return result
