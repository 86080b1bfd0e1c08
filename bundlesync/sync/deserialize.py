"""Writing store versions into the app tables, parents first.

:class:`TableWriter` places rows of one table: a row whose foreign-key parent is
not in the app table yet *waits* (it stays in the store, marked ``dirty``, with
the reason in ``error``) and is retried by every later import, so a child that
arrives before its parent applies when the parent does. A parent known only as
a deletion does not block (the sending device had the same dangling reference).
A row the database refuses (a constraint) also stays dirty, with the database's
message; the rest still applies.

The import's DEQUEUING stage uses a writer directly for records it has just
merged (one JSON decode per record); :func:`deserialize` (the DESERIALIZING
stage) then places every row still dirty — children whose parent came later,
rows left from earlier imports — table by table in foreign-key order, and
self-referencing tables in rounds until no more rows can be placed.

Tracking triggers must be suppressed by the caller (:class:`~bundlesync.replica.tracking.suppressed`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Hashable, Iterator, Sequence
from itertools import chain
from operator import itemgetter
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bundlesync.format.records import RawText, decode_data
from bundlesync.replica.db import q
from bundlesync.profile import NEW, Profile, TableSpec, incoming_row_sql
from bundlesync.replica.store import BATCH, name_id, settle

__all__ = ["DeserializeResult", "TableWriter", "count_unplaced", "deserialize", "placing"]

K = TypeVar("K", bound=Hashable)

SEEN_PARENTS_MAX = 2_000
"""How many known-present parent ids a writer remembers per column (bounds memory). The hot parents
(users, classes, the facility) number in the hundreds; the rest are looked up per batch anyway. At
1M records 20,000 ids a column took ~9 MiB more peak memory for no measurable speed (docs/performance.md)."""

WAITING = "waiting for"
"""Prefix of the ``error`` of a row whose parent has not arrived."""


@dataclass
class DeserializeResult:
    """Counts of what was written, and of what still waits or was refused."""

    written: int = 0
    deleted: int = 0
    waiting: int = 0
    failed: int = 0
    by_model: dict[str, int] = field(default_factory=dict)


def _present(conn: sqlite3.Connection, sql: str, head: Sequence[object], ids: set[str]) -> set[str]:
    found: set[str] = set()
    pending = list(ids)
    for start in range(0, len(pending), 900):
        chunk = pending[start : start + 900]
        # Rows of one column: flattened in C.
        found.update(chain.from_iterable(conn.execute(sql.format(marks=", ".join("?" * len(chunk))),
                                                      [*head, *chunk]).fetchall()))
    return found


class TableWriter:
    """Places rows of one app table (upsert by primary key; delete)."""

    def __init__(self, conn: sqlite3.Connection, profile: Profile, table: TableSpec) -> None:
        self.conn, self.table = conn, table
        self.parents = dict(table.foreign_keys)
        if table.self_reference:
            self.parents[table.self_reference] = table.name
        self.parent_pk = {col: profile.table(parent).primary_key for col, parent in self.parents.items()}
        cols, pk = table.columns, q(table.primary_key)
        written = (*cols, *table.receive)
        updates = ", ".join(f"{q(c)} = excluded.{q(c)}" for c in written if c != table.primary_key)
        conflict = f"ON CONFLICT ({pk}) DO " + (f"UPDATE SET {updates}" if updates else "NOTHING")
        # Rows carry their partition as one more value where the statements use it.
        self.with_partition = bool(table.receive or table.lookups)
        if table.receive:
            # Received columns are computed from the incoming row, so the row is a one-row sub-select.
            new = q(NEW)
            picked = [f"{new}.{q(c)}" for c in cols] + [r.expression(NEW) for r in table.receive.values()]
            self.upsert = (f"INSERT INTO {q(table.name)} ({', '.join(q(c) for c in written)}) "
                           f"SELECT {', '.join(picked)} FROM {incoming_row_sql(table)} WHERE true {conflict}")
        else:
            self.upsert = (f"INSERT INTO {q(table.name)} ({', '.join(q(c) for c in cols)}) "
                           f"VALUES ({', '.join('?' * len(cols))}) {conflict}")
        # Where the partition needs a lookup, the claim is recomputed here, with the parents in place.
        self.recompute = (f"SELECT {table.partition_sql(NEW)} FROM {incoming_row_sql(table)}"
                          if table.lookups else None)
        self.delete = f"DELETE FROM {q(table.name)} WHERE {pk} = ?"
        # A row's values in column order, picked in C (a row lacking a column takes the slow path: None).
        self._pick: Callable[[dict[str, Any]], tuple[Any, ...]] = (
            itemgetter(*cols) if len(cols) > 1 else lambda r: (r[cols[0]],))
        # Parent ids already found in their app tables in this transaction (see forget()).
        self._seen: dict[str, set[str]] = {}

    def forget(self) -> None:
        """Forget the parents found so far: in another transaction the app may have deleted them."""
        self._seen.clear()

    def remove(self, ids: Sequence[str]) -> None:
        """Delete app rows (a deletion or a purge won)."""
        self.conn.executemany(self.delete, [(i,) for i in ids])

    def _blocked(self, rows: Sequence[tuple[K, dict[str, Any]]]) -> dict[K, str]:
        """Rows whose foreign-key parent is absent, with the reason."""
        blocked: dict[K, str] = {}
        for col, parent in self.parents.items():
            seen = self._seen.setdefault(col, set())
            wanted = {str(v) for _, r in rows if (v := r.get(col)) is not None} - seen
            if not wanted:
                continue
            pk = q(self.parent_pk[col])
            found = _present(self.conn, f"SELECT {pk} FROM {q(parent)} WHERE {pk} IN ({{marks}})", (), wanted)
            if len(seen) > SEEN_PARENTS_MAX:
                seen.clear()  # keep memory bounded; the cache only saves lookups
            seen.update(found)
            absent = wanted - found
            if absent:
                absent -= _present(
                    self.conn,
                    "SELECT s.id FROM bundlesync_versions s JOIN bundlesync_models m ON m.n = s.model "
                    "WHERE m.name = ? AND s.id IN ({marks}) AND (s.deleted OR s.purged)",
                    (parent,), absent,
                )
            for key, r in rows:
                value = r.get(col)
                if value is not None and str(value) in absent and key not in blocked:
                    blocked[key] = f"{WAITING} {parent} {value} ({col}): not received yet"
        return blocked

    def _misplaced(self, ready: Sequence[tuple[K, tuple[object, ...], str]]) -> dict[K, str]:
        """Rows whose claimed partition is not the one their data gives here (lookup partitions only)."""
        errors: dict[K, str] = {}
        if self.recompute is None:
            return errors
        for key, values, claimed in ready:
            actual = self.conn.execute(self.recompute, values).fetchone()[0]
            if actual is None:
                errors[key] = (f"{WAITING} the rows its partition is looked up from ({', '.join(self.table.lookups)}): "
                               "not found yet")
            elif actual != claimed:
                errors[key] = f"refused: it claims partition {claimed}, but its data gives {actual} here"
        return errors

    def place(self, rows: Sequence[tuple[K, dict[str, Any], str]]) -> dict[K, str]:
        """Upsert rows ``(key, row, partition)`` whose parents are present; return the others with the reason."""
        errors = self._blocked([(key, r) for key, r, _ in rows])
        cols, pick, with_partition = self.table.columns, self._pick, self.with_partition
        prepared: list[tuple[K, tuple[Any, ...], str]] = []
        for key, r, partition in rows:
            if key in errors:
                continue
            try:
                picked = pick(r)
            except KeyError:  # the sender's table lacks a column: NULL, as before
                picked = tuple(map(r.get, cols))
            prepared.append((key, picked + (partition,) if with_partition else picked, partition))
        errors.update(self._misplaced(prepared))
        ready = [(key, v) for key, v, _ in prepared if key not in errors]
        values = [v for _, v in ready]
        try:
            self.conn.executemany(self.upsert, values)
        except sqlite3.DatabaseError:
            # Find the rows the database refuses; each statement is atomic on its own.
            for (key, _), row_values in zip(ready, values):
                try:
                    self.conn.execute(self.upsert, row_values)
                except sqlite3.DatabaseError as exc:
                    errors[key] = f"refused by the database: {exc}"
        self._restore_raw_text(ready, errors)
        return errors

    def _restore_raw_text(self, ready: Sequence[tuple[K, tuple[Any, ...]]], errors: dict[K, str]) -> None:
        """Give TEXT that is not valid UTF-8 back its storage class: the upsert bound it as a BLOB."""
        if RawText not in set(map(type, chain.from_iterable(v for _, v in ready))):
            return  # the common case, found in C
        cols, pk = self.table.columns, self.table.primary_key
        at_pk = cols.index(pk)
        for key, row_values in ready:
            if RawText not in map(type, row_values) or key in errors:
                continue
            for col, value in zip(cols, row_values):
                if type(value) is RawText:
                    self.conn.execute(f"UPDATE {q(self.table.name)} SET {q(col)} = CAST(? AS TEXT) "
                                      f"WHERE {q(pk)} = ?", (bytes(value), row_values[at_pk]))


def _dirty_batches(conn: sqlite3.Connection, model: int, size: int) -> Iterator[list[tuple[int, str, str, int, int, str]]]:
    last = 0
    while batch := conn.execute(
        "SELECT s.rowid, s.id, s.data, s.deleted, s.purged, p.name FROM bundlesync_versions s "
        "JOIN bundlesync_partitions p ON p.n = s.part "
        f"WHERE s.model = ? AND s.dirty = 1 AND s.rowid > ? ORDER BY s.rowid LIMIT {int(size)}",
        (model, last),
    ).fetchall():
        last = batch[-1][0]
        yield batch


def _apply_batch(conn: sqlite3.Connection, writer: TableWriter, model: int,
                 batch: list[tuple[int, str, str, int, int, str]], result: DeserializeResult) -> int:
    removals = [pk for _, pk, _, deleted, purged, _ in batch if deleted or purged]
    writer.remove(removals)
    errors = writer.place([(rowid, decode_data(data), partition) for rowid, _, data, deleted, purged, partition in batch
                           if not (deleted or purged)])
    # Every dirty row of this table between the batch's first and last rowid is in the batch.
    conn.execute("UPDATE bundlesync_versions SET dirty = 0, error = NULL WHERE model = ? AND dirty = 1 "
                 "AND rowid BETWEEN ? AND ?", (model, batch[0][0], batch[-1][0]))
    conn.executemany("UPDATE bundlesync_versions SET dirty = 1, error = ? WHERE rowid = ?",
                     [(reason, rowid) for rowid, reason in errors.items()])
    settle(conn, writer.table, [(pk, data) for rowid, pk, data, deleted, purged, _ in batch
                                if not (deleted or purged or rowid in errors)], stored=True)
    placed = len(batch) - len(errors)
    result.deleted += len(removals)
    result.written += placed - len(removals)
    return placed


def count_unplaced(conn: sqlite3.Connection, result: DeserializeResult) -> None:
    """Fill in how many rows wait for a parent and how many the database refused."""
    row = conn.execute(
        f"SELECT count(*), sum(error LIKE '{WAITING}%') FROM bundlesync_versions WHERE dirty = 1"
    ).fetchone()
    result.waiting = int(row[1] or 0)
    result.failed = int(row[0]) - result.waiting


PASSES = 3
"""Most passes over the tables in one run (see :func:`placing`)."""


def placing(conn: sqlite3.Connection, profile: Profile, result: DeserializeResult,
            batch: int = BATCH) -> Iterator[None]:
    """Write every dirty store row into its app table, parents first, one ``batch`` per step.

    A generator: each ``next()`` places one batch, so the caller may commit between any
    two steps (an import does, to keep its write transactions short). What a writer
    learnt of present parents is forgotten after every step, since the app may delete a
    parent between two transactions. A row made dirty while the run goes on (a purged
    row the app wrote again, found by the serialization at the start of a transaction)
    is never attempted yet (``error`` is NULL), and gets one more pass.
    """
    for _ in range(PASSES):
        for table in profile.tables:
            model = name_id(conn, "model", table.name)
            if model is None:
                continue
            writer = TableWriter(conn, profile, table)
            before = result.written + result.deleted
            while True:
                placed = 0
                for rows in _dirty_batches(conn, model, batch):
                    placed += _apply_batch(conn, writer, model, rows, result)
                    yield
                    writer.forget()
                # Self-references: a later round may place children whose parent came later in rowid order.
                if not (table.self_reference and placed):
                    break
            if result.written + result.deleted > before:
                result.by_model[table.name] = (result.by_model.get(table.name, 0) + result.written + result.deleted
                                               - before)
        if not conn.execute("SELECT EXISTS (SELECT 1 FROM bundlesync_versions WHERE dirty = 1 AND error IS NULL)"
                            ).fetchone()[0]:
            break


def deserialize(conn: sqlite3.Connection, profile: Profile, result: DeserializeResult | None = None) -> DeserializeResult:
    """Write every dirty store row into its app table, parents first (in the caller's one transaction)."""
    result = result or DeserializeResult()
    for _ in placing(conn, profile, result):
        pass
    count_unplaced(conn, result)
    return result
