"""The store: bundlesync's serialized copy of every syncable row, and the device identity.

``bundlesync_versions`` holds one row per app record: its winning version (see
:mod:`bundlesync.replica.merge`) with small integer ids for the names it repeats (table,
partition, writer, bundle: the name tables), its version vector only where it is not the
default ``{writer: counter}``, and its data JSON only where the app row does not give it (a
row waiting or refused, a deletion or purge, fields this app table lacks). Elsewhere ``data``
is NULL: the data is the app row's encoding, or, once the app changed the row, the prior row
the tracking triggers kept (:func:`~bundlesync.replica.tracking.prior_table`); ``hash`` (of the
data JSON, every record) tells edits from no-op updates and held lines from new ones. The
view ``bundlesync_store`` spells the names out. *Serialization* (the SERIALIZING stage)
turns the change log the triggers filled into new versions stamped with this
device's instance id and a fresh counter; everything else (export, import,
status) reads and writes versions here, never app rows directly, except
:mod:`bundlesync.sync.deserialize` which writes the store back into app tables.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from bundlesync.replica.db import fetch_all, q
from bundlesync.errors import ProfileError, StateError
from bundlesync.format.records import Version
from bundlesync.format.records import (HLC_MAX, MAX_DATA_BYTES, WALL_MAX_MS, RawText, data_hash, encode_data,
                                       head_sql)
from bundlesync.replica.tracking import PRIOR_ID, prior_table
from bundlesync.profile import Profile, TableSpec

__all__ = [
    "BATCH",
    "SerializeResult",
    "compact_store",
    "ensure_identity",
    "fetch_versions",
    "held_rows",
    "held_warning",
    "holds_model",
    "instance_id",
    "last_change",
    "new_identity",
    "log_conflicts",
    "loser_json",
    "mark_waiting",
    "name_id",
    "name_ids",
    "next_counter",
    "read_records",
    "read_vector",
    "reconcile_table",
    "record_transfer",
    "serialize_changes",
    "StoredLine",
    "stored_lines",
    "stored_vector",
    "upsert_versions",
    "Write",
    "Written",
]

BATCH = 5000
"""Rows per read/write batch: bounds memory and keeps statements short."""

STEP = 500
"""Changes serialized between two looks at the clock when the transaction must stay short (``until``)."""

_NOW_MS = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
"""Unix time in milliseconds, computed by SQLite (the time a change is logged)."""

# --- identity -------------------------------------------------------------------------


def ensure_identity(conn: sqlite3.Connection) -> str:
    """Give this database an instance id and counter if it has none; return the id."""
    conn.execute(
        "INSERT INTO bundlesync_meta (key, value) VALUES ('instance_id', ?) ON CONFLICT (key) DO NOTHING",
        (uuid.uuid4().hex,),
    )
    conn.execute("INSERT INTO bundlesync_meta (key, value) VALUES ('counter', '0') ON CONFLICT (key) DO NOTHING")
    return instance_id(conn)


def new_identity(conn: sqlite3.Connection) -> tuple[str, str]:
    """Give this database a new instance id whose counter starts from 0; return ``(old, new)``.

    For a database copied from another device or restored from an older backup: its
    next versions must not reuse a counter the old identity already used elsewhere.
    Stored versions keep their writer ids (the old identity did write them), pending
    changes serialize under the new id, and the export history is forgotten so the
    first export under the new id does not assume receivers hold what the old one sent.
    Must run inside a write transaction.
    """
    old = instance_id(conn)
    new = uuid.uuid4().hex
    conn.execute("UPDATE bundlesync_meta SET value = ? WHERE key = 'instance_id'", (new,))
    conn.execute("UPDATE bundlesync_meta SET value = '0' WHERE key = 'counter'")
    conn.execute("DELETE FROM bundlesync_transfers WHERE direction = 'export'")
    return old, new


def instance_id(conn: sqlite3.Connection) -> str:
    """This database's instance id."""
    row = conn.execute("SELECT value FROM bundlesync_meta WHERE key = 'instance_id'").fetchone()
    if row is None:
        raise StateError("this database has no bundlesync identity: run `bundlesync init` first")
    return str(row[0])


def current_counter(conn: sqlite3.Connection) -> int:
    """The last counter value this instance used."""
    row = conn.execute("SELECT value FROM bundlesync_meta WHERE key = 'counter'").fetchone()
    return int(row[0]) if row else 0


def next_counter(conn: sqlite3.Connection) -> int:
    """Take a new counter value for this instance and note that it holds its own writes up to it."""
    conn.execute("UPDATE bundlesync_meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'counter'")
    counter = current_counter(conn)
    conn.execute(
        "INSERT INTO bundlesync_fsic (partition, inst, ctr) VALUES ('', ?, ?) "
        "ON CONFLICT (partition, inst) DO UPDATE SET ctr = max(ctr, excluded.ctr)",
        (instance_id(conn), counter),
    )
    return counter


# --- reading and writing versions ---------------------------------------------------

_NAME_TABLES: Final = {"model": "bundlesync_models", "part": "bundlesync_partitions", "inst": "bundlesync_writers",
                       "bundle": "bundlesync_bundles"}
"""The store's name tables: it keeps a small integer id for each name it repeats."""

FROM_STORE: Final = ("bundlesync_versions s JOIN bundlesync_models m ON m.n = s.model "
                     "JOIN bundlesync_partitions p ON p.n = s.part JOIN bundlesync_writers w ON w.n = s.inst")
"""The store with its names, as bundlesync's statements read it (``s`` the row, ``m``/``p``/``w`` names)."""

HEAD_SQL: Final = f"CAST({head_sql('m.name', 's.id', 'p.name', 'w.name')} AS BLOB)"
"""A store row's record head (JSON, UTF-8) over :data:`FROM_STORE`."""


def app_data_sql(table: TableSpec, record_id: str, when: str = "") -> tuple[str, str]:
    """Columns and joins that give a record's data where the store leaves it to the app row.

    The data is the prior row's encoding if the app changed the row since (the prior table keeps
    it as it was), else the app row's. ``record_id``: the SQL of the record's id; ``when``: a
    condition that must hold for the rows to be looked up at all (e.g. ``s.data IS NULL``).
    Read the selected values with :func:`app_data`.
    """
    pk = q(table.primary_key)
    when = f"{when} AND " if when else ""
    # Only whether a prior row exists: it is rare, and its values are read on their own (prior_data).
    columns = f"pr.{PRIOR_ID} IS NOT NULL, t.{pk} IS NOT NULL" + "".join(f", t.{q(c)}" for c in table.columns)
    joins = (f"LEFT JOIN {q(prior_table(table))} pr ON {when}pr.{PRIOR_ID} = {record_id} "
             f"LEFT JOIN {q(table.name)} t ON {when}t.{pk} = {record_id}")
    return columns, joins


def app_data(conn: sqlite3.Connection, table: TableSpec, record_id: str, values: Sequence[Any]) -> str | None:
    """The data JSON from the values :func:`app_data_sql` selected (None: neither row exists)."""
    if values[0]:
        return prior_data(conn, table, record_id)
    if values[1]:
        return encode_data(table.columns, values[2:])
    return None


def prior_data(conn: sqlite3.Connection, table: TableSpec, record_id: str) -> str | None:
    """The data JSON of the row the prior table keeps for a record (None: it keeps none)."""
    rows = fetch_all(conn, f"SELECT {', '.join(q(c) for c in table.columns)} FROM {q(prior_table(table))} "
                           f"WHERE {PRIOR_ID} = ?", (record_id,))
    return encode_data(table.columns, rows[0]) if rows else None


def _lookup_names(conn: sqlite3.Connection, table: str, names: Sequence[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for start in range(0, len(names), 900):
        chunk = names[start : start + 900]
        found.update(conn.execute(f"SELECT name, n FROM {table} WHERE name IN ({', '.join('?' * len(chunk))})",
                                  chunk).fetchall())
    return found


def name_ids(conn: sqlite3.Connection, kind: str, names: Iterable[str]) -> dict[str, int]:
    """The ids of ``names`` in one of the store's name tables (``model``, ``part``, ``inst``, ``bundle``),
    adding the names it lacks (inside a write transaction). Names are never removed, so an id stays valid."""
    table = _NAME_TABLES[kind]
    wanted = list(dict.fromkeys(names))
    found = _lookup_names(conn, table, wanted)
    missing = [n for n in wanted if n not in found]
    if missing:
        conn.executemany(f"INSERT INTO {table} (name) VALUES (?) ON CONFLICT (name) DO NOTHING", [(n,) for n in missing])
        found.update(_lookup_names(conn, table, missing))
    return found


def name_id(conn: sqlite3.Connection, kind: str, name: str) -> int | None:
    """The id of ``name`` in one of the store's name tables, None if the store never used it."""
    row = conn.execute(f"SELECT n FROM {_NAME_TABLES[kind]} WHERE name = ?", (name,)).fetchone()
    return None if row is None else int(row[0])


def stored_vector(vv: Mapping[str, int], inst: str, ctr: int) -> str | None:
    """A version vector as the store keeps it: NULL (None) for the default ``{inst: ctr}``, else its text.

    Only writer ids of ASCII letters and digits (every instance id bundlesync makes) are left out, so
    that SQLite's ``json_object(inst, ctr)`` spells the default exactly as :func:`_vector_text` would.
    """
    if len(vv) == 1 and vv.get(inst) == ctr and inst.isascii() and inst.isalnum():
        return None
    return _vector_text(vv)


def read_vector(text: str | None, inst: str, ctr: int) -> dict[str, int]:
    """A stored version vector back (NULL: the default ``{inst: ctr}``)."""
    return {inst: ctr} if text is None else dict(json.loads(text))


_VERSION_COLUMNS = "s.id, p.name, s.data, s.deleted, s.purged, s.hlc, w.name, s.ctr, s.vv, s.wall"


def _row_to_version(conn: sqlite3.Connection, model: str, row: Sequence[Any], table: TableSpec | None) -> Version:
    data = row[2]
    if data is None:
        # Left to the app row; a record whose rows are both gone (tracking was off) has lost its data.
        data = (app_data(conn, table, row[0], row[10:]) if table is not None else None) or "{}"
    return Version(
        model=model, id=row[0], partition=row[1], data=data, deleted=bool(row[3]), purged=bool(row[4]),
        hlc=row[5], inst=row[6], ctr=row[7], vv=read_vector(row[8], row[6], row[7]), wall=row[9],
    )


def _rows_by_key(conn: sqlite3.Connection, columns: str, keys: Iterable[tuple[str, str]],
                 joins: str = "") -> Iterator[tuple[str, tuple[Any, ...]]]:
    """``(model, row)`` of the store rows of the given ``(model, id)`` keys that exist; ``columns`` are selected
    over :data:`FROM_STORE`.

    Looked up per model with ``id IN (…)`` so the ``(model, id)`` index is used
    (a row-value ``IN (VALUES …)`` makes SQLite scan the whole store).
    """
    by_model: dict[str, list[str]] = {}
    for model, record_id in keys:
        by_model.setdefault(model, []).append(record_id)
    for model, ids in by_model.items():
        model_n = name_id(conn, "model", model)
        if model_n is None:
            continue
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            marks = ", ".join("?" * len(chunk))
            for row in fetch_all(
                conn, f"SELECT {columns} FROM {FROM_STORE} {joins} WHERE s.model = ? AND s.id IN ({marks})",
                [model_n, *chunk]
            ):
                yield model, row


def fetch_versions(conn: sqlite3.Connection, keys: Iterable[tuple[str, str]],
                   profile: Profile | None = None) -> dict[tuple[str, str], Version]:
    """The stored versions of the given ``(model, id)`` keys that exist.

    A version whose data the store leaves to the app row gets it from there (the profile's tables);
    without ``profile``, or for a table it lacks, such data reads as ``{}``.
    """
    tables = {t.name: t for t in profile.tables} if profile is not None else {}
    by_model: dict[str, list[tuple[str, str]]] = {}
    for key in keys:
        by_model.setdefault(key[0], []).append(key)
    found: dict[tuple[str, str], Version] = {}
    for model, model_keys in by_model.items():
        table = tables.get(model)
        if table is None:
            rows = _rows_by_key(conn, _VERSION_COLUMNS, model_keys)
        else:
            columns, joins = app_data_sql(table, "s.id", "s.data IS NULL")
            rows = _rows_by_key(conn, f"{_VERSION_COLUMNS}, {columns}", model_keys, joins)
        for _, row in rows:
            version = _row_to_version(conn, model, row, table)
            found[(version.model, version.id)] = version
    return found


StoredLine = tuple[bytes, int, str, int, int]
"""A stored record as :func:`stored_lines` gives it: its line's head, ``hlc``, partition, purged flag and the hash
of its data."""


def stored_lines(conn: sqlite3.Connection, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], StoredLine]:
    """What this store would export for the given ``(model, id)`` keys, where it holds them (see :func:`same_line`).

    A line received byte for byte as this store would write it carries nothing new (same
    version, vector, flags and data), so import can pass it by without parsing or decoding it.
    """
    return {(model, record_id): (head, hlc, partition, purged, digest)
            for model, (record_id, head, hlc, partition, purged, digest)
            in _rows_by_key(conn, f"s.id, {HEAD_SQL}, s.hlc, p.name, s.purged, s.hash", keys)}


def same_line(stored: StoredLine, line: bytes) -> bool:
    """Whether ``line`` is the line this store would export for a record (its head byte for byte, its data by hash)."""
    head = stored[0]
    size = len(head)
    return (line.startswith(head) and line[size : size + 1] == b"\t" and line[-1:] == b"\n"
            and data_hash(line[size + 1 : -1]) == stored[4])


_UPSERT = (
    "INSERT INTO bundlesync_versions (model, id, part, data, hash, deleted, purged, hlc, inst, ctr, vv, dirty, error, "
    "bundle, wall) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?) "
    "ON CONFLICT (model, id) DO UPDATE SET part = excluded.part, data = excluded.data, hash = excluded.hash, "
    "deleted = excluded.deleted, purged = excluded.purged, hlc = excluded.hlc, inst = excluded.inst, "
    "ctr = excluded.ctr, vv = excluded.vv, dirty = excluded.dirty, error = NULL, bundle = excluded.bundle, "
    "wall = excluded.wall"
)

Write = tuple[str, str, str, str, int, int, int, str, int, Mapping[str, int], int, "str | None", "int | None", bool]
"""A version to write, with its names: model, id, partition, data, deleted, purged, hlc, writer, counter,
vector, dirty, bundle id, wall, and whether the app row encodes to the data (then the store leaves it out)."""


def _write(conn: sqlite3.Connection, rows: Sequence[Write]) -> None:
    """Upsert versions given with their names (ids looked up, or added, per call)."""
    if not rows:
        return
    models = name_ids(conn, "model", (r[0] for r in rows))
    parts = name_ids(conn, "part", (r[2] for r in rows))
    insts = name_ids(conn, "inst", (r[7] for r in rows))
    bundles = name_ids(conn, "bundle", (r[11] for r in rows if r[11] is not None))
    conn.executemany(_UPSERT, [
        (models[m], i, parts[p], None if app_holds else data, data_hash(data), deleted, purged, hlc, insts[inst], ctr,
         stored_vector(vv, inst, ctr), dirty, None if bundle is None else bundles[bundle], wall)
        for m, i, p, data, deleted, purged, hlc, inst, ctr, vv, dirty, bundle, wall, app_holds in rows])


def upsert_versions(
    conn: sqlite3.Connection, versions: Iterable[tuple[Version, bool]], bundle_id: str | None, *,
    to_app: bool = False,
) -> None:
    """Write versions; the flag says whether the app table must be updated (``dirty``).

    ``to_app``: the caller writes the app rows of these versions next, in this transaction, and then
    calls :func:`settle` (``stored=False``) for those written and :func:`mark_waiting` for the others,
    so their data is written without it (each store row is written once at its final size: a row that
    shrank afterwards would leave its page mostly empty).
    """
    _write(conn, [(v.model, v.id, v.partition, v.data, int(v.deleted), int(v.purged), v.hlc, v.inst, v.ctr, v.vv,
                   int(dirty), bundle_id, v.wall, to_app and not (v.deleted or v.purged)) for v, dirty in versions])


def settle(conn: sqlite3.Connection, table: TableSpec, written: Iterable[tuple[str, str]], *, stored: bool) -> int:
    """After an import wrote records ``(id, data)`` to their app rows: the store keeps the data only where a row
    does not encode to it (the app table changed a value on the way in: a type affinity, a column it lacks).

    ``stored``: whether the store holds their data now (it is left out where the row gives it) or was
    written without it (:func:`upsert_versions` ``to_app``: it is put back where the row does not give
    it). Tracking must be suppressed. Returns how many records the store leaves to their app rows.
    """
    want = dict(written)
    if not want:
        return 0
    model_n = name_id(conn, "model", table.name)
    pk, columns = q(table.primary_key), table.columns
    select = f"SELECT t.{pk}, " + ", ".join(f"t.{q(c)}" for c in columns) + f" FROM {q(table.name)} t WHERE t.{pk} IN "
    ids = list(want)
    same: list[str] = []
    for start in range(0, len(ids), 900):
        chunk = ids[start : start + 900]
        for row in fetch_all(conn, select + f"({', '.join('?' * len(chunk))})", chunk):
            key = row[0] if type(row[0]) is str else str(row[0])
            if want.get(key) == encode_data(columns, row[1:]):
                same.append(key)
    prior = q(prior_table(table))
    if conn.execute(f"SELECT EXISTS (SELECT 1 FROM {prior})").fetchone()[0]:
        # Left to the app row from now on: a row kept for an earlier version must not stand for this one.
        conn.executemany(f"DELETE FROM {prior} WHERE {PRIOR_ID} = ?", [(key,) for key in same])
    if stored:
        conn.executemany("UPDATE bundlesync_versions SET data = NULL WHERE model = ? AND id = ? AND dirty = 0",
                         [(model_n, key) for key in same])
    else:
        for key in same:
            del want[key]
        conn.executemany("UPDATE bundlesync_versions SET data = ? WHERE model = ? AND id = ?",
                         [(data, model_n, key) for key, data in want.items()])
    return len(same)


def update_vectors(conn: sqlite3.Connection, versions: Iterable[Version]) -> None:
    """Store merged version vectors of records whose data did not change."""
    pending = list(versions)
    if not pending:
        return
    models = name_ids(conn, "model", (v.model for v in pending))
    conn.executemany(
        "UPDATE bundlesync_versions SET vv = ? WHERE model = ? AND id = ?",
        ((stored_vector(v.vv, v.inst, v.ctr), models[v.model], v.id) for v in pending),
    )


def read_records(conn: sqlite3.Connection, profile: Profile, where: str = "1",
                 params: Sequence[object] = ()) -> list[dict[str, Any]]:
    """Rows of the ``bundlesync_store`` view matching ``where``, each record's data spelled out (for people and tests).

    The view shows ``data`` NULL where the store leaves it to the app row; here it is read from there.
    """
    cursor = conn.execute(f"SELECT * FROM bundlesync_store WHERE {where}", params)
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, row)) for row in cursor.fetchall()]
    missing = [(r["model"], r["id"]) for r in rows if r["data"] is None]
    if missing:
        found = fetch_versions(conn, missing, profile)
        for r in rows:
            if r["data"] is None:
                r["data"] = found[(r["model"], r["id"])].data
    return rows


def holds_model(conn: sqlite3.Connection, model: str) -> bool:
    """Whether the store holds any record of table ``model``."""
    model_n = name_id(conn, "model", model)
    return model_n is not None and bool(conn.execute(
        "SELECT EXISTS (SELECT 1 FROM bundlesync_versions WHERE model = ?)", (model_n,)).fetchone()[0])


def mark_waiting(conn: sqlite3.Connection, rows: Sequence[tuple[str, str, str, str]]) -> None:
    """Mark records ``(reason, model, id, data)`` as not written to their app table yet (``dirty``), with the reason
    (and their data, which the store keeps while the app row does not hold it)."""
    if rows:
        models = name_ids(conn, "model", (m for _, m, _, _ in rows))
        conn.executemany("UPDATE bundlesync_versions SET dirty = 1, error = ?, data = ? WHERE model = ? AND id = ?",
                         [(reason, data, models[m], i) for reason, m, i, data in rows])


# --- serialization ---------------------------------------------------------------------


@dataclass
class SerializeResult:
    """What one serialization run produced."""

    counter: int | None = None
    versions: int = 0
    held: int = 0
    clamped: int = 0
    """Edits whose clock reading was outside 0..WALL_MAX_MS and was brought into range."""
    by_model: dict[str, int] = field(default_factory=dict)
    done: bool = True
    """False when the run stopped early (``until``): changes are left for the next run."""

    def add(self, other: SerializeResult) -> None:
        """Count another run's work in this one (a serialization done in several transactions)."""
        self.counter = other.counter if other.counter is not None else self.counter
        self.versions += other.versions
        self.held += other.held
        self.clamped += other.clamped
        for model, n in other.by_model.items():
            self.by_model[model] = self.by_model.get(model, 0) + n
        self.done = other.done


def last_change(conn: sqlite3.Connection) -> int:
    """The sequence number of the latest logged change (0: none yet)."""
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM bundlesync_changes").fetchone()[0])


def _changed_rows(conn: sqlite3.Connection, table: TableSpec, model_n: int, up_to: int,
                  batch: int) -> Iterator[list[Any]]:
    """Chunks of (change, app row, stored version) for one table, in change order, up to change ``up_to``."""
    pk = q(table.primary_key)
    columns = ", ".join(f"t.{q(c)}" for c in table.columns)
    sql = (
        f"SELECT c.seq, c.pk, c.at_ms, t.{pk} IS NOT NULL, {table.partition_sql('t')}, "
        "p.name, s.data, s.deleted, s.purged, s.hlc, s.vv, s.dirty, w.name, s.ctr, b.name, s.rowid IS NOT NULL, "
        f"s.hash, pr.{PRIOR_ID} IS NOT NULL, {columns} "
        f"FROM bundlesync_changes c LEFT JOIN {q(table.name)} t ON t.{pk} = c.pk "
        f"LEFT JOIN {q(prior_table(table))} pr ON pr.{PRIOR_ID} = c.pk "
        "LEFT JOIN bundlesync_versions s ON s.model = ? AND s.id = c.pk "
        "LEFT JOIN bundlesync_partitions p ON p.n = s.part LEFT JOIN bundlesync_writers w ON w.n = s.inst "
        "LEFT JOIN bundlesync_bundles b ON b.n = s.bundle "
        f"WHERE c.model = ? AND c.seq > ? AND c.seq <= ? ORDER BY c.seq LIMIT {int(batch)}"
    )
    last = 0
    while rows := fetch_all(conn, sql, (model_n, table.name, last, up_to)):
        last = rows[-1][0]
        yield rows


def _why_held(table: TableSpec, pk: object, partition: object, data: str | None) -> str | None:
    """Why a changed row cannot become a record (None: it can)."""
    if isinstance(pk, RawText):
        return f"its primary key {table.primary_key} is not valid UTF-8 text (bytes {pk.hex()}); correct it in the app"
    if isinstance(pk, bytes):
        return (f"its primary key {table.primary_key} is a BLOB (bytes {pk.hex()}), which no record id can be; "
                "correct it in the app")
    if isinstance(partition, RawText):
        return "a column its partition is made of is not valid UTF-8 text; correct it in the app"
    if data is not None and len(data) > MAX_DATA_BYTES // 4:  # cheap test first: a character is 1-4 bytes
        size = len(data.encode("utf-8", "surrogatepass"))
        if size > MAX_DATA_BYTES:
            return (f"its data is {size} bytes as JSON, over the {MAX_DATA_BYTES} byte limit of a record; "
                    "make its largest values smaller in the app")
    return None


def _shown_pk(pk: object) -> str:
    return f"x'{pk.hex()}'" if isinstance(pk, bytes) else str(pk)


def held_warning(conn: sqlite3.Connection) -> str | None:
    """One line naming the rows held back (None if there are none), for export and import to print."""
    total, first = held_rows(conn, 1)
    if not total:
        return None
    row = first[0]
    return (f"warning: {total} row(s) held back because they cannot travel in a bundle, e.g. {row['model']} "
            f"{row['id']}: {row['reason']} (the rest was synced; see `bundlesync status`)")


def held_rows(conn: sqlite3.Connection, limit: int | None = None) -> tuple[int, list[dict[str, str]]]:
    """How many rows are held back, and the first ``limit`` of them (model, pk, reason, since)."""
    total = int(conn.execute("SELECT count(*) FROM bundlesync_held").fetchone()[0])
    sql = "SELECT model, pk, reason, at FROM bundlesync_held ORDER BY model, at" + (f" LIMIT {int(limit)}" if limit else "")
    rows = [{"model": m, "id": _shown_pk(pk), "reason": r, "since": at} for m, pk, r, at in conn.execute(sql)]
    return total, rows


def _keep_unknown_keys(stored: str, fresh: str, columns: Sequence[str]) -> str:
    """Carry over fields a newer profile sent that this device's app table lacks (forward compatibility)."""
    try:
        old = _decode(stored)  # msgspec first: this runs for every edited row
    except msgspec.MsgspecError:
        old = json.loads(stored)  # what msgspec refuses (NaN literals, numbers out of range), json reads as before
    extra = {k: v for k, v in old.items() if k not in columns} if isinstance(old, dict) else {}
    if not extra:
        return fresh
    merged = json.loads(fresh)
    merged.update(extra)
    return json.dumps(merged, ensure_ascii=False, separators=(",", ":"))


def loser_json(inst: str, ctr: int, hlc: int, deleted: bool, partition: str, data: str) -> str:
    """How a losing version is kept in ``bundlesync_conflicts``."""
    return json.dumps({"inst": inst, "ctr": ctr, "hlc": hlc, "deleted": deleted, "partition": partition,
                       "data": json.loads(data)}, separators=(",", ":"), ensure_ascii=False)


def log_conflicts(conn: sqlite3.Connection, entries: Iterable[tuple[object, ...]]) -> None:
    """Keep losing versions: ``(model, id, loser_json, winner_inst, winner_ctr, bundle_id, detected_at)``."""
    conn.executemany(
        "INSERT INTO bundlesync_conflicts (model, record_id, loser, winner_inst, winner_ctr, bundle_id, detected_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        entries,
    )


def _vector_text(vv: Mapping[str, int]) -> str:
    """A version vector as stored: compact JSON, keys sorted, non-ASCII escaped (``json.dumps``' text)."""
    try:
        text = _encode_sorted(vv, order="sorted")
    except (TypeError, ValueError, OverflowError, msgspec.MsgspecError):
        text = b"\x80"  # not ASCII: take the reference below
    # msgspec writes what json.dumps writes for printable ASCII keys and 64-bit counters (instance ids
    # are hex); anything else (DEL, which json.dumps escapes and msgspec does not, included) takes the
    # reference encoder, so stored vectors never change their text.
    if text.isascii() and b"\x7f" not in text:
        return text.decode("ascii")
    return json.dumps(vv, separators=(",", ":"), sort_keys=True)


_encode_sorted = msgspec.json.encode
_decode = msgspec.json.decode


def _lost_data(table: TableSpec, partition: str) -> str:
    """The data of a deletion whose app row vanished while tracking was off, with the store leaving its data to it.

    The row's values are gone; the values its partition is made of are not, and with them the
    deletion still proves its partition to receivers (``{}`` where the partition needs a lookup).
    """
    row = table.row_for_partition(partition)
    if row is None:
        return "{}"
    names = [c for c in table.columns if c in row]
    return encode_data(names, [row[c] for c in names])


def _no_partition(table: TableSpec, pk: object) -> str:
    why = (f"its lookup ({', '.join(table.lookups)}) finds no row" if table.lookups
           else f"every template of {list(table.partitions)} uses a NULL column")
    return (f"table {table.name!r} row {pk}: no partition, {why}; fix the row (or the profile) "
            "and export again")


Written = Callable[[str, Sequence[Write], Sequence[tuple[str, int]]], None]
"""Told, after each batch a serialization writes: the table, its new versions, and ``(id, counter)`` of the
versions of this device they replaced."""


def serialize_changes(conn: sqlite3.Connection, profile: Profile, *, until: Callable[[], bool] | None = None,
                      up_to: int | None = None, batch: int | None = None,
                      on_batch: Written | None = None) -> SerializeResult:
    """Turn logged app changes into store versions (must run in a write transaction).

    One new counter value serves every version this run writes. A version's
    ``hlc`` is its edit time in ms shifted left 16 bits, raised above the version
    it replaces so causality is never inverted by a slow clock. Changed rows
    are compared with their stored version: an update that changed nothing
    makes no version.

    ``up_to``: only changes logged up to that sequence number (:func:`last_change`).
    ``until``: asked after each ``batch`` of changes (:data:`STEP` by default then); when it says so the run stops
    there (``done`` is False) and the rest stays logged for the next run, which takes
    its own counter in its own transaction. Each change leaves the log in the transaction
    that turns it into a version, so an edit the app makes in between is logged afresh and
    never lost. ``on_batch``: told each batch written (in the transaction, which may still roll back).
    """
    result = SerializeResult()
    up_to = 2**63 - 1 if up_to is None else up_to
    batch = batch or (BATCH if until is None else STEP)
    if not conn.execute("SELECT EXISTS (SELECT 1 FROM bundlesync_changes WHERE seq <= ?)", (up_to,)).fetchone()[0]:
        return result
    me = instance_id(conn)
    counter = result.counter = next_counter(conn)
    fresh_vv = {me: counter}
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lost: list[tuple[object, ...]] = []
    released: list[tuple[object, ...]] = []
    for table in profile.tables:
        name, columns = table.name, table.columns
        model_n = name_ids(conn, "model", [name])[name]
        forget_prior = f"DELETE FROM {q(prior_table(table))} WHERE {PRIOR_ID} = ?"
        written = 0
        # Rows held back earlier are let go as soon as a later change of theirs serializes.
        any_held = conn.execute("SELECT EXISTS (SELECT 1 FROM bundlesync_held WHERE model = ?)", (name,)).fetchone()[0]
        for rows in _changed_rows(conn, table, model_n, up_to, batch):
            writes: list[Write] = []
            replaced: list[tuple[str, int]] = []
            redo: list[tuple[int, str]] = []
            held: list[tuple[object, ...]] = []
            # Prior rows (the app row as the stored version has it) of changes that are done with here; a change
            # held back keeps its prior row, since its stored version stays.
            priors: list[tuple[str]] = []
            for row in rows:
                _, pk, at_ms, present, partition, s_part, s_data, s_deleted, s_purged, s_hlc, s_vv = row[:11]
                s_dirty, s_inst, s_ctr, s_bundle, stored, s_hash, had_prior = row[11:18]
                if present and partition is None:
                    raise ProfileError(_no_partition(table, pk))
                fresh = data = encode_data(columns, row[18:]) if present else None
                reason = _why_held(table, pk, partition, data) if present or isinstance(pk, bytes) else None
                if reason is not None:
                    # It cannot travel in a bundle: peers keep its last good version; the rest goes on.
                    held.append((name, pk, reason, now))
                    continue
                if had_prior:
                    priors.append((pk,))
                if stored and s_data is None and not present:
                    # The store left the data to the app row, which is gone now: the prior table kept it.
                    s_data = (prior_data(conn, table, pk) if had_prior else None) or _lost_data(table, s_part)
                if any_held:
                    released.append((name, pk))
                # The edit time is the device clock's reading; one far outside real time is kept in range.
                if not 0 <= at_ms <= WALL_MAX_MS:
                    result.clamped += 1
                    at_ms = min(max(at_ms, 0), WALL_MAX_MS)
                if not stored:  # not in the store yet
                    if present:
                        assert data is not None
                        writes.append((name, pk, partition, data, 0, 0, at_ms << 16, me, counter, fresh_vv, 0, None,
                                       at_ms, True))
                    continue
                if s_purged:
                    # A purge is final: the app row is erased again rather than revived.
                    if present:
                        redo.append((model_n, pk))
                    continue
                if present:
                    assert data is not None
                    if s_data is None:  # the store left the data to the app row: its hash tells an edit
                        unchanged = data_hash(data) == s_hash
                    else:
                        if data != s_data:
                            data = _keep_unknown_keys(s_data, data, columns)
                        unchanged = s_data == data
                    if not s_deleted and unchanged and s_part == partition:
                        continue
                    deleted = 0
                elif not s_deleted:
                    data, partition, deleted = s_data, s_part, 1
                else:
                    continue
                if s_dirty:
                    # The stored version never reached the app table (it waits for a parent or was refused),
                    # so this edit did not see it: it loses to the edit, and is kept where operators look.
                    lost.append((name, pk, loser_json(s_inst, s_ctr, s_hlc, bool(s_deleted), s_part, s_data or "{}"),
                                 me, counter, s_bundle, now))
                hlc = max(at_ms << 16, s_hlc + 1)
                if hlc > HLC_MAX:
                    # Only a record that arrived with a clock at the very limit gets here; no version can follow
                    # it, so the edit waits where operators look instead of making records peers would refuse.
                    held.append((name, pk, f"its stored clock {s_hlc} is at the limit ({HLC_MAX}), so no later "
                                 "version can be stamped; see `bundlesync status` for the device with a wrong clock",
                                 now))
                    if had_prior:
                        priors.pop()
                    continue
                vv = read_vector(s_vv, s_inst, s_ctr)
                vv[me] = counter
                if s_inst == me:
                    replaced.append((pk, s_ctr))
                writes.append((name, pk, partition, data, deleted, 0, hlc, me, counter, vv, 0, None, at_ms,
                               data == fresh))
            conn.executemany(forget_prior, priors)
            _write(conn, writes)
            if on_batch is not None:
                on_batch(name, writes, replaced)
            conn.executemany("UPDATE bundlesync_versions SET dirty = 1, error = NULL WHERE model = ? AND id = ?", redo)
            conn.executemany("DELETE FROM bundlesync_held WHERE model = ? AND pk = ?", released)
            conn.executemany("INSERT INTO bundlesync_held (model, pk, reason, at) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT (model, pk) DO UPDATE SET reason = excluded.reason, at = excluded.at", held)
            released.clear()
            result.held += len(held)
            log_conflicts(conn, lost)
            lost.clear()
            written += len(writes)
            # Exactly this batch's changes: in this transaction no other change of the table lies in that range.
            conn.execute("DELETE FROM bundlesync_changes WHERE model = ? AND seq >= ? AND seq <= ?",
                         (name, rows[0][0], rows[-1][0]))
            if until is not None and until():
                result.done = False
                break
        if written:
            result.by_model[name] = written
            result.versions += written
        if not result.done:
            break
    return result


def reconcile_table(conn: sqlite3.Connection, table: TableSpec) -> int:
    """Log, as changes, every difference between an app table and the store; return how many.

    For a table whose tracking triggers were missing for a while (the app rebuilt it),
    this finds every edit made meanwhile: app rows the store lacks or holds with other
    data or partition (inserts, updates), and live store records whose app row is gone
    (deletes). Store records that wait to be written (``dirty``) are left alone on both
    sides: the app never saw them. Rows are read in primary-key batches, so memory stays
    flat whatever the table's size; the deletions are found by one set-based statement.
    Must run inside a write transaction.
    """
    name, columns, pk = table.name, table.columns, q(table.primary_key)
    model_n = name_id(conn, "model", name)
    select = (
        f"SELECT t.{pk}, {table.partition_sql('t')}, s.data, p.name, s.deleted, s.purged, s.dirty, s.rowid IS NOT NULL, "
        "s.hash, "
        + ", ".join(f"t.{q(c)}" for c in columns)
        + f" FROM {q(name)} t LEFT JOIN bundlesync_versions s ON s.model = ? AND s.id = t.{pk} "
        "LEFT JOIN bundlesync_partitions p ON p.n = s.part "
    )
    log = (f"INSERT INTO bundlesync_changes (model, pk, at_ms) VALUES (?, ?, {_NOW_MS}) "
           "ON CONFLICT (model, pk) DO UPDATE SET at_ms = excluded.at_ms")
    logged = 0
    # fetch_all: a value that is not valid UTF-8 must not stop the comparison (it comes back as RawText).
    rows = fetch_all(conn, select + f"WHERE t.{pk} IS NOT NULL ORDER BY t.{pk} LIMIT {BATCH}", (model_n,))
    while rows:
        changed = []
        for row in rows:
            record_id, partition, s_data, s_part, s_deleted, s_purged, s_dirty, stored, s_hash = row[:9]
            if stored:
                if s_dirty:
                    continue
                if not s_deleted and not s_purged:
                    data = encode_data(columns, row[9:])
                    if s_data is None:  # the store left the data to the app row: its hash tells an edit
                        unchanged = data_hash(data) == s_hash
                    else:
                        if data != s_data:
                            data = _keep_unknown_keys(s_data, data, columns)
                        unchanged = data == s_data
                    if unchanged and partition == s_part:
                        continue
            changed.append((name, record_id))
        conn.executemany(log, changed)
        logged += len(changed)
        # CAST: a RawText key is bound as a BLOB, which would compare above every TEXT key.
        rows = fetch_all(conn, select + f"WHERE t.{pk} > CAST(? AS TEXT) ORDER BY t.{pk} LIMIT {BATCH}",
                         (model_n, rows[-1][0]))
    if model_n is None:
        return logged
    gone = conn.execute(
        f"INSERT INTO bundlesync_changes (model, pk, at_ms) SELECT ?, s.id, {_NOW_MS} FROM bundlesync_versions s "
        "WHERE s.model = ? AND NOT s.deleted AND NOT s.purged AND NOT s.dirty "
        f"AND NOT EXISTS (SELECT 1 FROM {q(name)} t WHERE t.{pk} = s.id) "
        "ON CONFLICT (model, pk) DO NOTHING",
        (name, model_n),
    )
    return logged + max(gone.rowcount, 0)


def compact_store(conn: sqlite3.Connection, profile: Profile) -> int:
    """Leave out the stored data of every record whose app row encodes to it; return how many.

    For a store that kept every record's data (a device upgraded from that shape). Records that wait
    for their app row (``dirty``), deletions and rows with a pending change keep theirs. The table is
    then written anew, so that its rows sit in full pages (rows shrunk in place would leave their pages
    mostly empty; the pages freed are reused as the store grows). Must run inside a write transaction,
    with the tracking triggers (which keep prior rows) in place.
    """
    conn.execute("CREATE TEMP TABLE bundlesync_settled (r INTEGER PRIMARY KEY)")
    compacted = 0
    for table in profile.tables:
        model_n = name_id(conn, "model", table.name)
        if model_n is None:
            continue
        pk, columns = q(table.primary_key), table.columns
        sql = (f"SELECT s.rowid, s.data, " + ", ".join(f"t.{q(c)}" for c in columns) + " FROM bundlesync_versions s "
               f"JOIN {q(table.name)} t ON t.{pk} = s.id WHERE s.model = ? AND s.rowid > ? AND s.data IS NOT NULL "
               "AND NOT s.dirty AND NOT s.deleted AND NOT s.purged "
               "AND NOT EXISTS (SELECT 1 FROM bundlesync_changes c WHERE c.model = ? AND c.pk = s.id) "
               f"ORDER BY s.rowid LIMIT {BATCH}")
        last = -(2**63)
        while rows := fetch_all(conn, sql, (model_n, last, table.name)):
            last = rows[-1][0]
            same = [(rowid,) for rowid, data, *values in rows if encode_data(columns, values) == data]
            conn.executemany("INSERT INTO temp.bundlesync_settled (r) VALUES (?)", same)
            compacted += len(same)
    names = [r[1] for r in conn.execute("PRAGMA table_info(bundlesync_versions)")]
    listed = ", ".join(names)
    picked = ", ".join("CASE WHEN s.rowid IN (SELECT r FROM temp.bundlesync_settled) THEN NULL ELSE s.data END AS data"
                       if n == "data" else f"s.{n} AS {n}" for n in names)
    conn.execute(f"CREATE TEMP TABLE bundlesync_copy AS SELECT s.rowid AS r, {picked} FROM bundlesync_versions s")
    conn.execute("DELETE FROM bundlesync_versions")
    conn.execute(f"INSERT INTO bundlesync_versions (rowid, {listed}) SELECT r, {listed} FROM temp.bundlesync_copy "
                 "ORDER BY r")
    conn.execute("DROP TABLE temp.bundlesync_copy")
    conn.execute("DROP TABLE temp.bundlesync_settled")
    return compacted


def record_transfer(conn: sqlite3.Connection, *, bundle_id: str, direction: str, dataset_id: str,
                    prefixes: Sequence[str], peer_instance: str, path: str, at: str, records: int,
                    stats: Mapping[str, object], result_fsic: Mapping[str, object]) -> None:
    """Note an export or import in ``bundlesync_transfers`` (status, bases, re-import detection)."""
    conn.execute(
        "INSERT INTO bundlesync_transfers (bundle_id, direction, dataset_id, filter, peer_instance, path, at, "
        "records, stats, result_fsic) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (bundle_id, direction, dataset_id, "\n".join(prefixes), peer_instance, path, at, records,
         json.dumps(stats), json.dumps(dict(result_fsic))),
    )


def pending_changes(conn: sqlite3.Connection) -> int:
    """How many app rows changed since the last serialization."""
    return int(conn.execute("SELECT count(*) FROM bundlesync_changes").fetchone()[0])
