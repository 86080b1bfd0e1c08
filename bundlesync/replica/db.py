"""Opening the app database and bundlesync's own tables inside it.

bundlesync keeps its state next to the application's tables, in tables prefixed
``bundlesync_`` and never changes app columns. Their schema is a list of
named migrations (sqlite-utils ``Migrations``) so later versions can extend it.

Transactions: connections run in autocommit mode and every write goes through
:func:`write_transaction`, which takes SQLite's write lock up front
(``BEGIN IMMEDIATE``) so a sync never deadlocks half-way while upgrading a read
lock, and commits or rolls back as one unit.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.db import quote_identifier
from sqlite_utils.migrations import Migrations

from bundlesync.errors import BusyError, ConfigError, SyncError

__all__ = [
    "BUSY_TIMEOUT_S",
    "connect",
    "migrate",
    "q",
    "read_transaction",
    "write_transaction",
]

BUSY_TIMEOUT_S = 30.0
"""How long a sync waits for another program's write lock before giving up."""

q = quote_identifier

migrations = Migrations("bundlesync")


@migrations()
def m001_core(db: Database) -> None:
    """Identity, change log, store, knowledge (FSIC), conflicts, transfers, gaps."""
    _run_script(db.conn, """
        CREATE TABLE bundlesync_meta (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        -- One row per app row changed since the last serialization (filled by triggers).
        CREATE TABLE bundlesync_changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            model TEXT NOT NULL,
            pk TEXT NOT NULL,
            at_ms INTEGER NOT NULL,
            UNIQUE (model, pk)
        );
        -- While a row exists here, the tracking triggers stay silent (import is writing).
        CREATE TABLE bundlesync_applying (since TEXT NOT NULL);
        CREATE TABLE bundlesync_store (
            model TEXT NOT NULL,
            id TEXT NOT NULL,
            partition TEXT NOT NULL,
            data TEXT NOT NULL,
            deleted INTEGER NOT NULL DEFAULT 0,
            purged INTEGER NOT NULL DEFAULT 0,
            hlc INTEGER NOT NULL,
            inst TEXT NOT NULL,
            ctr INTEGER NOT NULL,
            vv TEXT NOT NULL,
            dirty INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            bundle_id TEXT,
            UNIQUE (model, id)
        );
        CREATE INDEX bundlesync_store_version ON bundlesync_store (inst, ctr);
        CREATE INDEX bundlesync_store_dirty ON bundlesync_store (model) WHERE dirty = 1;
        -- "For partitions under `partition` I hold everything `inst` wrote up to `ctr`."
        CREATE TABLE bundlesync_fsic (
            partition TEXT NOT NULL,
            inst TEXT NOT NULL,
            ctr INTEGER NOT NULL,
            PRIMARY KEY (partition, inst)
        );
        CREATE TABLE bundlesync_conflicts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            model TEXT NOT NULL,
            record_id TEXT NOT NULL,
            loser TEXT NOT NULL,
            winner_inst TEXT NOT NULL,
            winner_ctr INTEGER NOT NULL,
            bundle_id TEXT,
            detected_at TEXT NOT NULL
        );
        CREATE INDEX bundlesync_conflicts_record ON bundlesync_conflicts (model, record_id);
        CREATE TABLE bundlesync_transfers (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            bundle_id TEXT NOT NULL,
            direction TEXT NOT NULL CHECK (direction IN ('export', 'import')),
            dataset_id TEXT NOT NULL,
            filter TEXT NOT NULL,
            peer_instance TEXT NOT NULL,
            path TEXT NOT NULL,
            at TEXT NOT NULL,
            records INTEGER NOT NULL,
            stats TEXT NOT NULL,
            result_fsic TEXT NOT NULL,
            UNIQUE (bundle_id, direction)
        );
        CREATE TABLE bundlesync_gaps (
            dataset_id TEXT NOT NULL,
            inst TEXT NOT NULL,
            have INTEGER NOT NULL,
            need INTEGER NOT NULL,
            bundle_id TEXT NOT NULL,
            at TEXT NOT NULL,
            PRIMARY KEY (dataset_id, inst)
        );
        """)


@migrations()
def m002_indexes_for_streaming(db: Database) -> None:
    """Serialization reads changes per table; export reads versions per table and writer."""
    _run_script(db.conn, """
        CREATE INDEX bundlesync_changes_model ON bundlesync_changes (model, seq);
        DROP INDEX bundlesync_store_version;
        CREATE INDEX bundlesync_store_version ON bundlesync_store (model, inst, ctr);
        """)


@migrations()
def m003_repairs(db: Database) -> None:
    """What bundlesync found wrong with this database and repaired (shown by ``status``)."""
    _run_script(db.conn, """
        CREATE TABLE bundlesync_repairs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at TEXT NOT NULL,
            model TEXT NOT NULL,
            what TEXT NOT NULL,
            changes INTEGER NOT NULL
        )
        """)


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run ``;``-separated DDL inside the caller's transaction (``executescript`` would commit)."""
    for statement in script.split(";"):
        body = "\n".join(line for line in statement.splitlines() if not line.strip().startswith("--"))
        if body.strip():
            conn.execute(body)


def connect(path: Path) -> sqlite3.Connection:
    """Open the app database for bundlesync (autocommit; explicit transactions).

    Foreign-key enforcement is left off on this connection on purpose: bundlesync
    orders writes itself and keeps rows whose parent has not arrived yet in the
    store (they are retried), the way the sending device's data was written.
    """
    if not path.exists():
        raise ConfigError(f"app database {path} does not exist: check the path given to `bundlesync init --db`")
    try:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"cannot open app database {path}: {exc}; is it an SQLite file?") from exc
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    """Create or upgrade bundlesync's own tables (idempotent)."""
    try:
        migrations.apply(Database(conn, execute_plugins=False))
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"cannot create bundlesync tables: {exc}") from exc


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, begin: str) -> Iterator[sqlite3.Connection]:
    try:
        conn.execute(begin)
    except sqlite3.OperationalError as exc:
        raise BusyError(
            f"the database is busy ({exc}); another program holds its write lock: try again in a moment"
        ) from exc
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise SyncError(f"could not commit ({exc}); nothing was changed: try again") from exc


def write_transaction(conn: sqlite3.Connection) -> contextlib.AbstractContextManager[sqlite3.Connection]:
    """One atomic write: ``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception."""
    return _transaction(conn, "BEGIN IMMEDIATE")


def read_transaction(conn: sqlite3.Connection) -> contextlib.AbstractContextManager[sqlite3.Connection]:
    """A consistent snapshot for reading many statements (``BEGIN`` … ``COMMIT``)."""
    return _transaction(conn, "BEGIN")
