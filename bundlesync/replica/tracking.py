"""Change tracking: triggers that log every write to a syncable table.

Triggers (not application code) do the tracking so that a write by *any* SQLite
client is seen (nothing is lost). Each trigger upserts ``(model, pk, at_ms)``
into ``bundlesync_changes``; serialization later turns those rows into store
versions. While an import applies incoming rows it puts a row into
``bundlesync_applying`` inside its transaction, and the triggers' ``WHEN`` clause
skips the logging, so imported rows are not mistaken for local edits. Other
connections never see that row: it is inserted and deleted inside one
transaction that holds the write lock.

Triggers can vanish (an app migration that rebuilds a table drops them) or fall out
of date; :mod:`bundlesync.replica.health` compares :func:`expected_triggers` with
:func:`installed_triggers` on every open and repairs the difference.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

from bundlesync.replica.db import q
from bundlesync.profile import Profile, TableSpec

__all__ = [
    "NOW_MS_SQL",
    "PRIOR_ID",
    "ensure_prior_table",
    "expected_triggers",
    "install_table_triggers",
    "installed_triggers",
    "prior_table",
    "prior_table_sql",
    "suppressed",
    "trigger_names",
]

NOW_MS_SQL = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
"""Unix time in milliseconds, computed by SQLite (the edit time of a change)."""

_QUIET = "NOT EXISTS (SELECT 1 FROM bundlesync_applying)"


def trigger_names(table: TableSpec) -> tuple[str, str, str]:
    """The insert, update and delete trigger names for one table."""
    return (
        f"bundlesync_{table.name}_ins",
        f"bundlesync_{table.name}_upd",
        f"bundlesync_{table.name}_del",
    )


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _log(model: str, pk_ref: str) -> str:
    return (
        f"INSERT INTO bundlesync_changes (model, pk, at_ms) VALUES ({_literal(model)}, {pk_ref}, {NOW_MS_SQL}) "
        "ON CONFLICT (model, pk) DO UPDATE SET at_ms = excluded.at_ms;"
    )


def prior_table(table: TableSpec) -> str:
    """The table that keeps an app row as it was before the app changed it, where the store relies on it."""
    return f"bundlesync_prior_{table.name}"


PRIOR_ID = "bundlesync_id"
"""The prior table's key column: the record id (the primary key as TEXT, as the store keeps it)."""


def prior_table_sql(table: TableSpec) -> str:
    """``CREATE TABLE`` of :func:`prior_table`: the profile's columns without types (values kept as they were)."""
    columns = "".join(f", {q(c)}" for c in table.columns)
    return f"CREATE TABLE {q(prior_table(table))} ({PRIOR_ID} TEXT PRIMARY KEY{columns}) WITHOUT ROWID"


def _keep_prior(table: TableSpec, row: str, source: str = "", where: str = "") -> str:
    """Copy an app row into its prior table, once, if the store keeps no data of its own for it.

    The store leaves out the data of a record whose app row encodes to it (``data`` NULL): before the
    app changes or deletes such a row, its values are kept here, so that the version stays exactly
    what it was until serialization replaces it (and a deletion can carry the data it deleted).
    """
    pk = f"{row}.{q(table.primary_key)}"
    values = "".join(f", {row}.{q(c)}" for c in table.columns)
    return (
        f"INSERT OR IGNORE INTO {q(prior_table(table))} ({PRIOR_ID}{''.join(f', {q(c)}' for c in table.columns)}) "
        f"SELECT {pk}{values}{source} WHERE {where}EXISTS (SELECT 1 FROM bundlesync_versions s "
        f"JOIN bundlesync_models m ON m.n = s.model WHERE m.name = {_literal(table.name)} "
        f"AND s.id = CAST({pk} AS TEXT) AND s.data IS NULL);"
    )


def _trigger_sql(table: TableSpec) -> Iterator[tuple[str, str]]:
    ins, upd, dele = trigger_names(table)
    t, pk = q(table.name), q(table.primary_key)
    yield ins, (
        f"CREATE TRIGGER {q(ins)} AFTER INSERT ON {t} WHEN {_QUIET} "
        f"BEGIN {_log(table.name, f'NEW.{pk}')} END"
    )
    # An update that changes the primary key is a delete of the old row plus an insert.
    yield upd, (
        f"CREATE TRIGGER {q(upd)} AFTER UPDATE ON {t} WHEN {_QUIET} "
        f"BEGIN {_keep_prior(table, 'OLD')} {_log(table.name, f'NEW.{pk}')} {_log(table.name, f'OLD.{pk}')} END"
    )
    yield dele, (
        f"CREATE TRIGGER {q(dele)} AFTER DELETE ON {t} WHEN {_QUIET} "
        f"BEGIN {_keep_prior(table, 'OLD')} {_log(table.name, f'OLD.{pk}')} END"
    )


def _unique_keys(conn: sqlite3.Connection, table: TableSpec) -> list[tuple[str, list[str]]]:
    """Plain UNIQUE indexes other than the primary key's: ``(index name, columns)``."""
    found = []
    for _, name, unique, origin, partial in conn.execute(f"PRAGMA index_list({q(table.name)})"):
        if not unique or partial or origin == "pk":
            continue
        columns = [col for _, cid, col in conn.execute(f"PRAGMA index_info({q(name)})")]
        if columns and all(c is not None for c in columns) and columns != [table.primary_key]:
            found.append((name, columns))
    return found


def _displacement_triggers(conn: sqlite3.Connection, table: TableSpec) -> Iterator[tuple[str, str]]:
    """BEFORE triggers that log the rows an ``OR REPLACE`` is about to remove.

    SQLite deletes a row that collides on a UNIQUE index without firing DELETE
    triggers (unless the writer enabled ``recursive_triggers``), so the colliding
    row is logged just before the write. If nothing is replaced after all,
    serialization finds that row unchanged and makes no version.
    """
    t, pk = q(table.name), q(table.primary_key)
    for index, columns in sorted(_unique_keys(conn, table)):
        for event in ("INSERT", "UPDATE"):
            name = f"bundlesync_{table.name}_{event[:3].lower()}_{index}"
            match = " AND ".join(f"{q(c)} = NEW.{q(c)}" for c in columns)
            keep = _keep_prior(table, "d", f" FROM {t} d", " AND ".join(f"d.{q(c)} = NEW.{q(c)}" for c in columns)
                               + f" AND d.{pk} IS NOT NEW.{pk} AND ")
            yield name, (
                f"CREATE TRIGGER {q(name)} BEFORE {event} ON {t} WHEN {_QUIET} BEGIN {keep} "
                f"INSERT INTO bundlesync_changes (model, pk, at_ms) SELECT {_literal(table.name)}, {pk}, {NOW_MS_SQL} "
                f"FROM {t} WHERE {match} AND {pk} IS NOT NEW.{pk} "
                "ON CONFLICT (model, pk) DO UPDATE SET at_ms = excluded.at_ms; END"
            )


def expected_triggers(conn: sqlite3.Connection, table: TableSpec) -> dict[str, str]:
    """Every tracking trigger ``table`` must carry now: name -> its SQL as ``sqlite_master`` keeps it.

    The displacement triggers follow the table's current UNIQUE indexes, so an index the
    app adds in an upgrade gets its trigger at the next check.
    """
    return dict([*_displacement_triggers(conn, table), *_trigger_sql(table)])


def installed_triggers(conn: sqlite3.Connection) -> dict[str, tuple[str, str]]:
    """bundlesync's triggers in the database: name -> (table it is on, SQL)."""
    return {
        name: (tbl, sql)
        for name, tbl, sql in conn.execute(
            "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'bundlesync\\_%' ESCAPE '\\'"
        )
    }


def install_table_triggers(conn: sqlite3.Connection, table: TableSpec) -> None:
    """(Re)create every tracking trigger of ``table`` as :func:`expected_triggers` says (in a write transaction).

    Its prior table is made first (the triggers write to it), or made again if the profile's columns
    changed: rows it kept are for the old columns' encoding, so serialization falls back to the store.
    """
    ensure_prior_table(conn, table)
    for name, sql in expected_triggers(conn, table).items():
        conn.execute(f"DROP TRIGGER IF EXISTS {q(name)}")
        conn.execute(sql)


def ensure_prior_table(conn: sqlite3.Connection, table: TableSpec) -> None:
    """Create :func:`prior_table` of ``table``, or recreate it if its columns are not the profile's."""
    name = prior_table(table)
    found = [r[1] for r in conn.execute(f"PRAGMA table_info({q(name)})")]
    if found == [PRIOR_ID, *table.columns]:
        return
    if found:
        conn.execute(f"DROP TABLE {q(name)}")
    conn.execute(prior_table_sql(table))


class suppressed:
    """Context manager: inside it (and inside a transaction), writes are not tracked."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("INSERT INTO bundlesync_applying (since) VALUES (datetime('now'))")

    def __exit__(self, *exc: object) -> None:
        if self._conn.in_transaction:
            self._conn.execute("DELETE FROM bundlesync_applying")
