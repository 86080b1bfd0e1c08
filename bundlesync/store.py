"""The store: bundlesync's serialized copy of every syncable row, and the device identity.

``bundlesync_store`` holds one row per app record: its JSON data and its winning
version (see :mod:`bundlesync.merge`). *Serialization* (the SERIALIZING stage)
turns the change log the triggers filled into new versions stamped with this
device's instance id and a fresh counter; everything else (export, import,
status) reads and writes versions here, never app rows directly, except
:mod:`bundlesync.deserialize` which writes the store back into app tables.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .db import q
from .errors import StateError
from .merge import Version
from .profile import Profile, TableSpec

__all__ = [
    "BATCH",
    "SerializeResult",
    "decode_data",
    "encode_data",
    "ensure_identity",
    "fetch_versions",
    "instance_id",
    "next_counter",
    "serialize_changes",
    "upsert_versions",
]

BATCH = 5000
"""Rows per read/write batch: bounds memory and keeps statements short."""

_BYTES_TAG = "$bytes"


def _encode_default(value: object) -> object:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {_BYTES_TAG: base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"cannot serialize {type(value).__name__}")


def encode_data(columns: Sequence[str], values: Sequence[object]) -> str:
    """Row values -> the JSON text kept in the store and carried in bundles.

    Floats keep full precision (Python's shortest repr); BLOBs travel as
    ``{"$bytes": base64}``.
    """
    return json.dumps(
        dict(zip(columns, values)), ensure_ascii=False, separators=(",", ":"), default=_encode_default
    )


def decode_data(text: str) -> dict[str, Any]:
    """JSON text -> row dict, turning ``{"$bytes": …}`` back into bytes."""
    row: dict[str, Any] = json.loads(text)
    for key, value in row.items():
        if isinstance(value, dict) and len(value) == 1 and _BYTES_TAG in value:
            row[key] = base64.b64decode(value[_BYTES_TAG])
    return row


# --- identity -------------------------------------------------------------------------


def ensure_identity(conn: sqlite3.Connection) -> str:
    """Give this database an instance id and counter if it has none; return the id."""
    conn.execute(
        "INSERT INTO bundlesync_meta (key, value) VALUES ('instance_id', ?) ON CONFLICT (key) DO NOTHING",
        (uuid.uuid4().hex,),
    )
    conn.execute("INSERT INTO bundlesync_meta (key, value) VALUES ('counter', '0') ON CONFLICT (key) DO NOTHING")
    return instance_id(conn)


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

_VERSION_COLUMNS = "model, id, partition, data, deleted, purged, hlc, inst, ctr, vv"


def _row_to_version(row: Sequence[Any]) -> Version:
    return Version(
        model=row[0], id=row[1], partition=row[2], data=row[3], deleted=bool(row[4]), purged=bool(row[5]),
        hlc=row[6], inst=row[7], ctr=row[8], vv=json.loads(row[9]),
    )


def fetch_versions(conn: sqlite3.Connection, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Version]:
    """The stored versions of the given ``(model, id)`` keys that exist."""
    found: dict[tuple[str, str], Version] = {}
    pending = list(keys)
    for start in range(0, len(pending), 400):
        chunk = pending[start : start + 400]
        values = ", ".join(["(?, ?)"] * len(chunk))
        params = [x for key in chunk for x in key]
        for row in conn.execute(
            f"SELECT {_VERSION_COLUMNS} FROM bundlesync_store WHERE (model, id) IN (VALUES {values})", params
        ):
            version = _row_to_version(row)
            found[(version.model, version.id)] = version
    return found


_UPSERT = (
    "INSERT INTO bundlesync_store (model, id, partition, data, deleted, purged, hlc, inst, ctr, vv, dirty, error, bundle_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?) "
    "ON CONFLICT (model, id) DO UPDATE SET partition = excluded.partition, data = excluded.data, "
    "deleted = excluded.deleted, purged = excluded.purged, hlc = excluded.hlc, inst = excluded.inst, "
    "ctr = excluded.ctr, vv = excluded.vv, dirty = excluded.dirty, error = NULL, bundle_id = excluded.bundle_id"
)


def upsert_versions(
    conn: sqlite3.Connection, versions: Iterable[tuple[Version, bool]], bundle_id: str | None
) -> None:
    """Write versions; the flag says whether the app table must be updated (``dirty``)."""
    conn.executemany(
        _UPSERT,
        (
            (
                v.model, v.id, v.partition, v.data, int(v.deleted), int(v.purged), v.hlc, v.inst, v.ctr,
                json.dumps(v.vv, separators=(",", ":"), sort_keys=True), int(dirty), bundle_id,
            )
            for v, dirty in versions
        ),
    )


def update_vectors(conn: sqlite3.Connection, versions: Iterable[Version]) -> None:
    """Store merged version vectors of records whose data did not change."""
    conn.executemany(
        "UPDATE bundlesync_store SET vv = ? WHERE model = ? AND id = ?",
        ((json.dumps(v.vv, separators=(",", ":"), sort_keys=True), v.model, v.id) for v in versions),
    )


# --- serialization ---------------------------------------------------------------------


@dataclass
class SerializeResult:
    """What one serialization run produced."""

    counter: int | None = None
    versions: int = 0
    by_model: dict[str, int] = field(default_factory=dict)


def _changed_rows(conn: sqlite3.Connection, table: TableSpec) -> Iterator[list[Any]]:
    """Chunks of (change, app row, store row) for one table, by change sequence."""
    columns = ", ".join(f"t.{q(c)}" for c in table.columns)
    sql = (
        f"SELECT c.seq, c.pk, c.at_ms, t.{q(table.primary_key)} IS NOT NULL, {table.partition_sql('t')}, "
        f"s.partition, s.data, s.deleted, s.purged, s.hlc, s.vv, {columns} "
        f"FROM bundlesync_changes c "
        f"LEFT JOIN {q(table.name)} t ON t.{q(table.primary_key)} = c.pk "
        f"LEFT JOIN bundlesync_store s ON s.model = c.model AND s.id = c.pk "
        f"WHERE c.model = ? AND c.seq > ? ORDER BY c.seq LIMIT {BATCH}"
    )
    last = 0
    while True:
        rows = conn.execute(sql, (table.name, last)).fetchall()
        if not rows:
            return
        last = rows[-1][0]
        yield rows


def _keep_unknown_keys(stored: str, fresh: str, columns: Sequence[str]) -> str:
    """Carry over fields a newer profile sent that this device's app table lacks (forward compatibility)."""
    old = json.loads(stored)
    extra = {k: v for k, v in old.items() if k not in columns} if isinstance(old, dict) else {}
    if not extra:
        return fresh
    merged = json.loads(fresh)
    merged.update(extra)
    return json.dumps(merged, ensure_ascii=False, separators=(",", ":"))


def serialize_changes(conn: sqlite3.Connection, profile: Profile, *, hlc_floor: int = 0) -> SerializeResult:
    """Turn logged app changes into store versions (must run in a write transaction).

    Each run uses one new counter value for all versions it writes (none if
    nothing really changed). A version's ``hlc`` is its edit time in ms shifted
    left 16 bits, raised above the version it replaces so causality is never
    inverted by a slow clock.
    """
    me = instance_id(conn)
    result = SerializeResult()
    for table in profile.tables:
        for rows in _changed_rows(conn, table):
            writes: list[tuple[Version, bool]] = []
            redo: list[tuple[str, str]] = []
            for row in rows:
                _, pk, at_ms, present, partition, s_part, s_data, s_deleted, s_purged, s_hlc, s_vv = row[:11]
                exists = s_data is not None
                if exists and s_purged:
                    # A purge is final: the app row is erased again rather than revived.
                    if present:
                        redo.append((table.name, pk))
                    continue
                if present:
                    data = encode_data(table.columns, row[11:])
                    if exists and data != s_data:
                        data = _keep_unknown_keys(s_data, data, table.columns)
                    if exists and not s_deleted and s_data == data and s_part == partition:
                        continue
                    deleted = False
                elif exists and not s_deleted:
                    data, partition, deleted = s_data, s_part, True
                else:
                    continue
                if result.counter is None:
                    result.counter = next_counter(conn)
                vv = json.loads(s_vv) if exists else {}
                vv[me] = result.counter
                hlc = max(at_ms << 16, (s_hlc + 1) if exists else 0, hlc_floor)
                version = Version(table.name, pk, partition, data, deleted, False, hlc, me, result.counter, vv)
                writes.append((version, False))
            upsert_versions(conn, writes, None)
            conn.executemany("UPDATE bundlesync_store SET dirty = 1 WHERE model = ? AND id = ?", redo)
            result.versions += len(writes)
            if writes:
                result.by_model[table.name] = result.by_model.get(table.name, 0) + len(writes)
        conn.execute("DELETE FROM bundlesync_changes WHERE model = ?", (table.name,))
    return result


def pending_changes(conn: sqlite3.Connection) -> int:
    """How many app rows changed since the last serialization."""
    return int(conn.execute("SELECT count(*) FROM bundlesync_changes").fetchone()[0])


def counts_by(conn: sqlite3.Connection, sql: str, params: Mapping[str, object] | Sequence[object] = ()) -> dict[str, int]:
    """Helper for status: ``SELECT key, count … GROUP BY key`` as a dict."""
    return {str(k): int(v) for k, v in conn.execute(sql, params)}
