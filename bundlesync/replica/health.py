"""Can the change log be trusted? The tracking triggers, checked against the profile on every open.

Tracking lives in triggers on the app's tables, and the app can take them away without
asking: Django's SQLite migrations rebuild a table (create ``new__T``, copy, drop ``T``,
rename), and the triggers go with the dropped table. The profile file can also change
under an initialised device (a table added or removed). Either way the change log would
silently stop telling the truth.

:func:`check_tracking` compares, in one read of ``sqlite_master``, the triggers every
profile table must carry now (:func:`~bundlesync.replica.tracking.expected_triggers`)
with the installed ones; on a healthy device it writes nothing. :func:`ensure_tracking`
repairs what it finds in one write transaction:

- a profile table whose triggers are missing or differ: they are reinstalled and the
  table is reconciled with the store (:func:`~bundlesync.replica.store.reconcile_table`),
  so every insert, update and delete made meanwhile is logged and nothing is lost; a
  table new to the profile is the same case with an empty store (its rows are queued);
- a table no longer in the profile: its triggers are dropped and its pending changes
  discarded (they could never be serialized);
- a trigger bundlesync no longer wants (a UNIQUE index the app dropped): dropped.

Each repair is kept in ``bundlesync_repairs``, which ``bundlesync status`` shows.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
from dataclasses import dataclass, field

from bundlesync.profile import Profile
from bundlesync.replica.db import q, write_transaction
from bundlesync.replica.store import compact_store, reconcile_table
from bundlesync.replica.tracking import expected_triggers, install_table_triggers, installed_triggers, trigger_names

__all__ = ["ADDED", "MISSING", "REMOVED", "STALE", "Drift", "Repair", "check_tracking", "ensure_tracking",
           "recent_repairs", "record_repair"]

MISSING, STALE, ADDED, REMOVED = "missing", "stale", "added", "removed"
"""Why a table's tracking was repaired."""

_TRACKED = "tracked_tables"
"""``bundlesync_meta`` key: the JSON list of tables whose changes the triggers log."""


@dataclass
class Drift:
    """What :func:`check_tracking` found wrong (empty: nothing)."""

    broken: dict[str, str] = field(default_factory=dict)  # profile table -> MISSING | STALE | ADDED
    removed: list[str] = field(default_factory=list)  # tables tracked before, not in the profile now
    unwanted: list[str] = field(default_factory=list)  # trigger names to drop
    tracked_now: list[str] = field(default_factory=list)  # the profile's tables, for the meta row
    note_tables: bool = False  # the meta row must be (re)written

    def __bool__(self) -> bool:
        return bool(self.broken or self.removed or self.unwanted or self.note_tables)


@dataclass(frozen=True)
class Repair:
    """One repair: which table, what was wrong and done, how many changes it logged or dropped."""

    at: str
    table: str
    what: str
    changes: int


def _tracked(conn: sqlite3.Connection) -> set[str] | None:
    row = conn.execute("SELECT value FROM bundlesync_meta WHERE key = ?", (_TRACKED,)).fetchone()
    return set(json.loads(row[0])) if row else None


def _models_with_changes(conn: sqlite3.Connection) -> set[str]:
    """Distinct models in the change log, by index skip-scan (cost follows their number, not the log's size)."""
    found: set[str] = set()
    row = conn.execute("SELECT min(model) FROM bundlesync_changes").fetchone()
    while row is not None and row[0] is not None:
        found.add(row[0])
        row = conn.execute("SELECT min(model) FROM bundlesync_changes WHERE model > ?", (row[0],)).fetchone()
    return found


def check_tracking(conn: sqlite3.Connection, profile: Profile) -> Drift:
    """Compare the installed triggers with those the profile needs now (reads only)."""
    installed = installed_triggers(conn)
    tracked = _tracked(conn)
    names = [t.name for t in profile.tables]
    drift = Drift(tracked_now=names, note_tables=tracked != set(names))
    # A database set up before the tracked tables were noted: the tables that carry our triggers.
    previously = tracked if tracked is not None else {tbl for tbl, _ in installed.values()}
    wanted: dict[str, str] = {}
    for table in profile.tables:
        expected = expected_triggers(conn, table)
        wanted.update(expected)
        if all(installed.get(name) == (table.name, sql) for name, sql in expected.items()):
            continue
        if table.name not in previously:
            drift.broken[table.name] = ADDED
        elif any(name not in installed for name in trigger_names(table)):
            drift.broken[table.name] = MISSING
        else:
            drift.broken[table.name] = STALE
    drift.unwanted = sorted(name for name, (tbl, sql) in installed.items() if wanted.get(name) != sql)
    gone = previously - set(names)
    if tracked is None:
        gone |= _models_with_changes(conn) - set(names)
    drift.removed = sorted(gone)
    return drift


def record_repair(conn: sqlite3.Connection, table: str, what: str, changes: int) -> Repair:
    """Keep one repair in ``bundlesync_repairs`` (inside the caller's write transaction)."""
    at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    conn.execute("INSERT INTO bundlesync_repairs (at, model, what, changes) VALUES (?, ?, ?, ?)",
                 (at, table, what, changes))
    return Repair(at, table, what, changes)


def _repair(conn: sqlite3.Connection, profile: Profile, drift: Drift, *, record: bool) -> list[Repair]:
    done: list[Repair] = []
    for name in drift.unwanted:
        conn.execute(f"DROP TRIGGER IF EXISTS {q(name)}")
    for name in drift.removed:
        dropped = conn.execute("DELETE FROM bundlesync_changes WHERE model = ?", (name,)).rowcount
        if record:
            done.append(record_repair(conn, name, REMOVED, max(dropped, 0)))
    for table in profile.tables:
        why = drift.broken.get(table.name)
        if why is None:
            continue
        install_table_triggers(conn, table)
        logged = reconcile_table(conn, table)
        if record:
            done.append(record_repair(conn, table.name, why, logged))
    conn.execute(
        "INSERT INTO bundlesync_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (_TRACKED, json.dumps(sorted(drift.tracked_now))),
    )
    return done


def ensure_tracking(conn: sqlite3.Connection, profile: Profile, *, record: bool = True) -> list[Repair]:
    """Check tracking and repair it if needed; returns the repairs made (none on a healthy device).

    The check runs again under the write lock, so two runs that both found a problem
    repair it once. ``record=False`` (a database's first ``init``) keeps no repair rows.
    """
    upgraded = _compaction_pending(conn)
    if not upgraded and not check_tracking(conn, profile):
        return []
    with write_transaction(conn):
        drift = check_tracking(conn, profile)
        # A store upgraded from the shape that kept every record's data: its triggers are reinstalled (the new
        # ones keep prior rows) without noting a repair, then the data its app rows hold is left out.
        done = _repair(conn, profile, drift, record=record and not upgraded) if drift else []
        if upgraded and _compaction_pending(conn):
            compact_store(conn, profile)
            conn.execute("DELETE FROM bundlesync_meta WHERE key = ?", (_COMPACT,))
        return done


_COMPACT = "compact_store"
"""``bundlesync_meta`` key set by the store's reshaping migration: records' data not yet left to app rows."""


def _compaction_pending(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM bundlesync_meta WHERE key = ?", (_COMPACT,)).fetchone() is not None


def describe(repair: Repair) -> str:
    """A repair as one sentence for people (``status``, warnings)."""
    if repair.what == REMOVED:
        return (f"table {repair.table} left the profile: its tracking was removed and {repair.changes} pending "
                f"change(s) dropped ({repair.at})")
    if repair.what == ADDED:
        return (f"table {repair.table} joined the profile: tracking installed and {repair.changes} existing row(s) "
                f"queued for export ({repair.at})")
    if repair.what in (MISSING, STALE):
        cause = ("missing (table rebuilt by an app upgrade?)" if repair.what == MISSING
                 else "incomplete or out of date (an index or the table changed?)")
        return (f"tracking of {repair.table} was {cause}: reinstalled {repair.at}; {repair.changes} change(s) made "
                "meanwhile recovered by comparing the table with the store")
    return f"{repair.what} ({repair.at})"


def recent_repairs(conn: sqlite3.Connection, limit: int = 10) -> list[Repair]:
    """The latest repairs, newest first."""
    return [Repair(at, model, what, changes) for at, model, what, changes in conn.execute(
        "SELECT at, model, what, changes FROM bundlesync_repairs ORDER BY id DESC LIMIT ?", (limit,))]
