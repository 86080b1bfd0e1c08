"""Opening the app database and bundlesync's own tables inside it.

bundlesync keeps its state next to the application's tables, in tables prefixed
``bundlesync_`` and never changes app columns. Their schema is a list of
named migrations (sqlite-utils ``Migrations``) so later versions can extend it; which
of them ran is noted in ``bundlesync_migrations`` (sqlite-utils' default, an
un-prefixed ``_sqlite_migrations``, would add a table of ours under the app's name
space; homes made before are moved over by :func:`migrate`).

Transactions: connections run in autocommit mode and every write goes through
:func:`write_transaction`, which takes SQLite's write lock up front
(``BEGIN IMMEDIATE``) so a sync never deadlocks half-way while upgrading a read
lock, and commits or rolls back as one unit.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bundlesync.errors import BusyError, ConfigError, SyncError
from bundlesync.format.records import data_hash, lenient_text

if TYPE_CHECKING:
    from sqlite_utils import Database
    from sqlite_utils.migrations import Migrations

__all__ = [
    "BUSY_TIMEOUT_S",
    "connect",
    "fetch_all",
    "is_busy",
    "migrate",
    "q",
    "read_transaction",
    "write_transaction",
]

BUSY_TIMEOUT_S = 30.0
"""How long a sync waits for another program's write lock before giving up."""

def q(identifier: str) -> str:
    """An SQL identifier in double quotes, inner quotes doubled (as sqlite-utils quotes them)."""
    return '"{}"'.format(identifier.replace('"', '""'))


MIGRATIONS_TABLE = "bundlesync_migrations"
_LEGACY_TABLE = "_sqlite_migrations"
MIGRATION_SET = "bundlesync"

_STEPS: list[Callable[[Database], None]] = []
"""bundlesync's migrations, in order (applied by sqlite-utils, loaded only when one is pending)."""


def _migration(step: Callable[[Database], None]) -> Callable[[Database], None]:
    _STEPS.append(step)
    return step


def _migration_set() -> Migrations:
    """The sqlite-utils migration set of :data:`_STEPS`, noted in a table (and index) of our own name space."""
    from sqlite_utils.migrations import Migrations

    class _Migrations(Migrations):
        migrations_table = MIGRATIONS_TABLE

        def ensure_migrations_table(self, db: Database) -> None:
            """Create the table with the layout sqlite-utils expects, and its unique index under our prefix."""
            db.conn.execute(f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (id INTEGER PRIMARY KEY, "
                            "migration_set TEXT, name TEXT, applied_at TEXT)")
            db.conn.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS {MIGRATIONS_TABLE}_set_name "
                            f"ON {MIGRATIONS_TABLE} (migration_set, name)")

    migrations = _Migrations(MIGRATION_SET)
    for step in _STEPS:
        migrations()(step)
    return migrations


@_migration
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


@_migration
def m002_indexes_for_streaming(db: Database) -> None:
    """Serialization reads changes per table; export reads versions per table and writer."""
    _run_script(db.conn, """
        CREATE INDEX bundlesync_changes_model ON bundlesync_changes (model, seq);
        DROP INDEX bundlesync_store_version;
        CREATE INDEX bundlesync_store_version ON bundlesync_store (model, inst, ctr);
        """)


@_migration
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


@_migration
def m004_knowledge_of_peers_and_pending(db: Database) -> None:
    """What peers are known to hold (from their bundles and receipts); knowledge waiting on a gap."""
    _run_script(db.conn, """
        -- One row per peer device this one has heard from: its scope and where it was last heard.
        CREATE TABLE bundlesync_peers (
            dataset_id TEXT NOT NULL,
            peer TEXT NOT NULL,
            scope TEXT NOT NULL,
            read TEXT NOT NULL,
            source TEXT NOT NULL,
            at TEXT NOT NULL,
            PRIMARY KEY (dataset_id, peer)
        );
        -- "Peer `peer` holds, under `partition`, everything `inst` wrote up to `ctr`" (a lower bound).
        CREATE TABLE bundlesync_peer_fsic (
            dataset_id TEXT NOT NULL,
            peer TEXT NOT NULL,
            partition TEXT NOT NULL,
            inst TEXT NOT NULL,
            ctr INTEGER NOT NULL,
            PRIMARY KEY (dataset_id, peer, partition, inst)
        );
        -- A bundle imported over a gap: once `needs` (JSON [[partition, ctr], ...] of `inst`) are
        -- held, this device holds `inst` up to `ctr` under `partition`, because that bundle carried the rest.
        CREATE TABLE bundlesync_pending (
            dataset_id TEXT NOT NULL,
            partition TEXT NOT NULL,
            inst TEXT NOT NULL,
            ctr INTEGER NOT NULL,
            needs TEXT NOT NULL,
            bundle_id TEXT NOT NULL,
            PRIMARY KEY (partition, inst, ctr, needs)
        );
        """)


@_migration
def m005_held_rows(db: Database) -> None:
    """App rows serialization holds back because they cannot travel in a bundle, with the reason."""
    _run_script(db.conn, """
        CREATE TABLE bundlesync_held (
            model TEXT NOT NULL,
            pk NOT NULL,
            reason TEXT NOT NULL,
            at TEXT NOT NULL,
            PRIMARY KEY (model, pk)
        )
        """)


@_migration
def m006_edit_wall_clock(db: Database) -> None:
    """The wall-clock time of the edit that made each version (NULL: older versions, ``hlc >> 16``)."""
    db.conn.execute("ALTER TABLE bundlesync_store ADD COLUMN wall INTEGER")


STORE_VIEW_SQL = """
    CREATE VIEW bundlesync_store AS
    SELECT m.name AS model, s.id AS id, p.name AS partition, s.data AS data, s.hash AS hash,
           s.deleted AS deleted, s.purged AS purged, s.hlc AS hlc, w.name AS inst, s.ctr AS ctr,
           coalesce(s.vv, json_object(w.name, s.ctr)) AS vv, s.dirty AS dirty, s.error AS error,
           b.name AS bundle_id, s.wall AS wall
    FROM bundlesync_versions s
    JOIN bundlesync_models m ON m.n = s.model
    JOIN bundlesync_partitions p ON p.n = s.part
    JOIN bundlesync_writers w ON w.n = s.inst
    LEFT JOIN bundlesync_bundles b ON b.n = s.bundle
"""
"""The store with its names spelled out, for reading by people, ``status`` and tests (bundlesync's
own statements read ``bundlesync_versions`` and the name tables directly)."""


@_migration
def m007_compact_store(db: Database) -> None:
    """The store keeps small integer ids for its repeated names, and a version vector only where it is not
    the default ``{writer: counter}``; ``bundlesync_store`` becomes a view that spells the names out.

    Existing rows are copied in rowid order with their rowids (the export's order within a counter), every
    one keeping its data; which of them the store may leave to their app rows is found with the profile
    when the device is next opened (``compact_store`` in ``bundlesync_meta``, see the health check).
    """
    db.conn.create_function("bundlesync_data_hash", 1, data_hash, deterministic=True)
    _run_script(db.conn, """
        CREATE TABLE bundlesync_models (n INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
        CREATE TABLE bundlesync_partitions (n INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
        CREATE TABLE bundlesync_writers (n INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
        CREATE TABLE bundlesync_bundles (n INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
        -- One row per record: its winning version. `vv` NULL: the default {writer: counter}. `data` NULL:
        -- the app row's encoding is the data (`hash` is the 64-bit hash of the data JSON either way).
        CREATE TABLE bundlesync_versions (
            model INTEGER NOT NULL,
            id TEXT NOT NULL,
            part INTEGER NOT NULL,
            inst INTEGER NOT NULL,
            ctr INTEGER NOT NULL,
            hlc INTEGER NOT NULL,
            wall INTEGER,
            deleted INTEGER NOT NULL DEFAULT 0,
            purged INTEGER NOT NULL DEFAULT 0,
            dirty INTEGER NOT NULL DEFAULT 0,
            bundle INTEGER,
            vv TEXT,
            hash INTEGER,
            error TEXT,
            data TEXT,
            UNIQUE (model, id)
        );
        INSERT INTO bundlesync_models (name) SELECT DISTINCT model FROM bundlesync_store ORDER BY model;
        INSERT INTO bundlesync_partitions (name) SELECT DISTINCT partition FROM bundlesync_store ORDER BY partition;
        INSERT INTO bundlesync_writers (name) SELECT DISTINCT inst FROM bundlesync_store ORDER BY inst;
        INSERT INTO bundlesync_bundles (name) SELECT DISTINCT bundle_id FROM bundlesync_store
            WHERE bundle_id IS NOT NULL ORDER BY bundle_id;
        INSERT INTO bundlesync_versions (rowid, model, id, part, inst, ctr, hlc, wall, deleted, purged, dirty,
                                         bundle, vv, hash, error, data)
            SELECT s.rowid, m.n, s.id, p.n, w.n, s.ctr, s.hlc, s.wall, s.deleted, s.purged, s.dirty, b.n,
                   CASE WHEN s.inst NOT GLOB '*[^0-9A-Za-z]*' AND s.inst <> ''
                             AND s.vv = '{"' || s.inst || '":' || s.ctr || '}' THEN NULL ELSE s.vv END,
                   bundlesync_data_hash(s.data), s.error, s.data
            FROM bundlesync_store s
            JOIN bundlesync_models m ON m.name = s.model
            JOIN bundlesync_partitions p ON p.name = s.partition
            JOIN bundlesync_writers w ON w.name = s.inst
            LEFT JOIN bundlesync_bundles b ON b.name = s.bundle_id
            ORDER BY s.rowid;
        DROP TABLE bundlesync_store;
        CREATE INDEX bundlesync_versions_version ON bundlesync_versions (model, inst, ctr);
        CREATE INDEX bundlesync_versions_dirty ON bundlesync_versions (model) WHERE dirty = 1;
        INSERT INTO bundlesync_meta (key, value) SELECT 'compact_store', '1'
            WHERE EXISTS (SELECT 1 FROM bundlesync_versions)
        """)
    _run_script(db.conn, STORE_VIEW_SQL)


def fetch_all(conn: sqlite3.Connection, sql: str, params: Sequence[object]) -> list[Any]:
    """``conn.execute(sql, params).fetchall()``, but TEXT that is not valid UTF-8 does not fail it.

    SQLite stores whatever bytes a program gives it as TEXT; Python refuses to decode
    invalid UTF-8. Only when that happens is the query run again with a text factory that
    returns such values as :class:`~bundlesync.format.records.RawText` (the fast path keeps
    the C decoder).
    """
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "decode" not in str(exc):
            raise
    conn.text_factory = lenient_text
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.text_factory = str


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run ``;``-separated DDL inside the caller's transaction (``executescript`` would commit)."""
    for statement in script.split(";"):
        body = "\n".join(line for line in statement.splitlines() if not line.strip().startswith("--"))
        if body.strip():
            conn.execute(body)


def is_busy(exc: sqlite3.Error) -> bool:
    """Whether SQLite refused because another connection holds a lock (not a damaged file)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return bool(code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED))
    return "locked" in str(exc) or "busy" in str(exc)


def connect(path: Path, *, busy_timeout: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """Open the app database for bundlesync (autocommit; explicit transactions).

    ``busy_timeout`` is how long any statement waits for another program's lock;
    past it the caller gets :class:`BusyError` (exit 8), not a "damaged file" error.

    Foreign-key enforcement is left off on this connection on purpose: bundlesync
    orders writes itself and keeps rows whose parent has not arrived yet in the
    store (they are retried), the way the sending device's data was written.
    """
    if not path.exists():
        raise ConfigError(f"app database {path} does not exist: check the path given to `bundlesync init --db`")
    try:
        conn = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None)
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"cannot open app database {path}: {exc}; check the path and its permissions") from exc
    try:
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        conn.close()
        if is_busy(exc):
            raise BusyError(
                f"app database {path} is locked by another program ({exc}) for more than {busy_timeout:g} s: "
                "try again when it is idle, or pass --wait SECONDS"
            ) from exc
        raise ConfigError(f"cannot open app database {path}: {exc}; is it an SQLite file?") from exc
    return conn


def _adopt_legacy_records(conn: sqlite3.Connection, database: Database, migrations: Migrations) -> None:
    """Move bundlesync's rows out of ``_sqlite_migrations`` (older homes); drop it if nothing else uses it."""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (_LEGACY_TABLE,)).fetchone()
    if not exists:
        return
    with write_transaction(conn):
        migrations.ensure_migrations_table(database)
        conn.execute(
            f"INSERT INTO {MIGRATIONS_TABLE} (migration_set, name, applied_at) "
            f"SELECT migration_set, name, applied_at FROM {_LEGACY_TABLE} WHERE migration_set = ? ORDER BY rowid "
            "ON CONFLICT (migration_set, name) DO NOTHING", (migrations.name,))
        conn.execute(f"DELETE FROM {_LEGACY_TABLE} WHERE migration_set = ?", (migrations.name,))
        if not conn.execute(f"SELECT EXISTS (SELECT 1 FROM {_LEGACY_TABLE})").fetchone()[0]:
            conn.execute(f"DROP TABLE {_LEGACY_TABLE}")  # its index goes with it


def _up_to_date(conn: sqlite3.Connection) -> bool:
    """Whether every migration is noted as applied and no older record of them waits to be moved."""
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (_LEGACY_TABLE,)).fetchone():
            return False
        applied = {row[0] for row in conn.execute(
            f"SELECT name FROM {MIGRATIONS_TABLE} WHERE migration_set = ?", (MIGRATION_SET,))}
    except sqlite3.DatabaseError:  # no table yet, or a problem the full path below reports properly
        return False
    return all(step.__name__ in applied for step in _STEPS)


def migrate(conn: sqlite3.Connection) -> None:
    """Create or upgrade bundlesync's own tables (idempotent)."""
    if _up_to_date(conn):
        return  # the common case, without loading sqlite-utils (start-up time of every command)
    from sqlite_utils import Database

    database = Database(conn, execute_plugins=False)
    try:
        migrations = _migration_set()
        _adopt_legacy_records(conn, database, migrations)
        migrations.apply(database)
    except sqlite3.DatabaseError as exc:
        if is_busy(exc):
            raise BusyError(f"cannot update bundlesync tables: the database is locked by another program ({exc}): "
                            "try again when it is idle, or pass --wait SECONDS") from exc
        raise ConfigError(f"cannot create bundlesync tables: {exc}; check that the database is writable") from exc


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
        if is_busy(exc):
            raise BusyError(f"could not commit: another program holds the database ({exc}); nothing was changed: "
                            "try again in a moment") from exc
        raise SyncError(f"could not commit ({exc}); nothing was changed: try again") from exc


def write_transaction(conn: sqlite3.Connection) -> contextlib.AbstractContextManager[sqlite3.Connection]:
    """One atomic write: ``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception."""
    return _transaction(conn, "BEGIN IMMEDIATE")


def read_transaction(conn: sqlite3.Connection) -> contextlib.AbstractContextManager[sqlite3.Connection]:
    """A consistent snapshot for reading many statements (``BEGIN`` … ``COMMIT``)."""
    return _transaction(conn, "BEGIN")
