"""Export: from tracked app changes to a verified bundle file in the output folder.

Stages (DESIGN "How the stages map onto files"):

INITIALIZING   resolve the facility, load the certificate chain, fix the filter and the basis.
SERIALIZING    turn logged app changes into store versions with a new counter (one write txn).
QUEUING        in one read snapshot, compute the result FSIC and stream the versions the
               receiver lacks (above the basis, inside the filter) into the bundle writer.
TRANSFERRING   finish the file (fsync + rename), then read it back and verify it completely.
CLEANUP        record the transfer; remove temporaries.

Changes committed after SERIALIZING stay in the change log for the next export.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from . import bundle as container
from . import fsic as fsic_mod
from .db import read_transaction, write_transaction
from .device import Device
from .crypto import verify
from .errors import StateError, SyncError
from .manifest import Manifest
from .scope import covered, scope_filters
from .store import current_counter, serialize_changes

__all__ = ["ExportResult", "choose_basis", "export_bundle", "outgoing_lines"]

ProgressFn = Callable[[str, int], None]


@dataclass
class ExportResult:
    """What an export did; ``path`` is None when there was nothing to send."""

    path: Path | None
    bundle_id: str
    dataset_id: str
    filter: tuple[str, ...]
    records: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    serialized: int = 0
    basis: dict[str, int] = field(default_factory=dict)
    basis_source: str = "none"
    result: dict[str, int] = field(default_factory=dict)
    size: int = 0


def _prefix_sql(prefixes: Sequence[str]) -> tuple[str, list[object]]:
    clauses = " OR ".join("substr(partition, 1, ?) = ?" for _ in prefixes)
    params: list[object] = [x for p in prefixes for x in (len(p), p)]
    return f"({clauses})", params


def _instances(conn: sqlite3.Connection) -> Iterator[str]:
    """Distinct writers in the store, by index skip-scan (cost follows their number)."""
    row = conn.execute("SELECT min(inst) FROM bundlesync_store").fetchone()
    while row is not None and row[0] is not None:
        yield row[0]
        row = conn.execute("SELECT min(inst) FROM bundlesync_store WHERE inst > ?", (row[0],)).fetchone()


_LINE_SQL = (
    "SELECT CAST(json_object('m', model, 'id', id, 'p', partition, 'h', hlc, 'i', inst, 'c', ctr, "
    "'v', json(vv), 'f', deleted + 2 * purged) || char(9) || data || char(10) AS BLOB), model "
    "FROM bundlesync_store WHERE inst = ? AND ctr > ? AND {prefixes}"
)


def outgoing_lines(
    conn: sqlite3.Connection, prefixes: Sequence[str], basis: Mapping[str, int], counts: dict[str, int]
) -> Iterator[list[bytes]]:
    """Batches of record lines for every version above ``basis`` inside the filter."""
    where, params = _prefix_sql(prefixes)
    sql = _LINE_SQL.format(prefixes=where)
    for inst in list(_instances(conn)):
        cursor = conn.execute(sql, [inst, basis.get(inst, 0), *params])
        while rows := cursor.fetchmany(2000):
            for _, model in rows:
                counts[model] = counts.get(model, 0) + 1
            yield [line for line, _ in rows]


def choose_basis(device: Device, dataset_id: str, prefixes: Sequence[str], *, full: bool) -> tuple[dict[str, int], str]:
    """What the receiver is assumed to hold already, and why.

    ``--full``: nothing. Otherwise the result of this device's last export for the
    same facility and filter (the receiver reports a gap if it missed that one).
    """
    if full:
        return {}, "full"
    row = device.conn.execute(
        "SELECT result_fsic, bundle_id FROM bundlesync_transfers WHERE direction = 'export' AND dataset_id = ? "
        "AND filter = ? ORDER BY id DESC LIMIT 1",
        (dataset_id, "\n".join(prefixes)),
    ).fetchone()
    if row is None:
        return {}, "first export"
    return json.loads(row[0]), f"since last export {row[1]}"


def export_bundle(
    device: Device,
    facility: str,
    out_dir: Path,
    *,
    full: bool = False,
    user: str | None = None,
    basis_override: tuple[dict[str, int], str] | None = None,
    progress: ProgressFn | None = None,
    now: datetime.datetime | None = None,
) -> ExportResult:
    """Export what the receiver lacks as one signed bundle in ``out_dir``."""
    conn, profile = device.conn, device.profile
    dataset_id, facility_id = device.resolve_facility(facility)
    chain = device.keyring.device_chain(dataset_id)
    if chain is None:
        raise StateError(
            f"this device holds no certificate for facility {facility}: run `bundlesync facility provision` "
            "on the facility's authority, or `bundlesync cert request` here and `cert install` the grant"
        )
    mine = scope_filters(profile, dataset_id, chain[0].scope)
    if user is not None:
        prefixes = scope_filters(profile, dataset_id, f"user:{user}").read
        if not covered(prefixes, mine.read):
            raise StateError(f"this device's certificate ({mine.scope}) may not read user {user}'s data")
    elif chain[0].scope == "full":
        prefixes = mine.read
    else:
        prefixes = mine.write  # a single-user device only sends what it may sign for
    if not out_dir.is_dir():
        raise StateError(f"output folder {out_dir} does not exist: create it or mount the drive")

    with write_transaction(conn):
        serialized = serialize_changes(conn, profile)
    basis, source = basis_override if basis_override is not None else choose_basis(device, dataset_id, prefixes, full=full)

    bundle_id = uuid.uuid4().hex
    me = device.instance_id
    created = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    result = ExportResult(None, bundle_id, dataset_id, tuple(prefixes), serialized=serialized.versions,
                          basis=dict(basis), basis_source=source)
    key = device.keyring.device_key()
    with read_transaction(conn):
        offered = fsic_mod.offered(fsic_mod.read_rows(conn), prefixes)
        counter = current_counter(conn)
        manifest = Manifest(
            bundle_id=bundle_id, created_at=created, generator=f"bundlesync/{__version__}",
            profile_name=profile.name, profile_version=profile.version, profile_digest=profile.digest,
            dataset_id=dataset_id, facility_id=facility_id, filter=tuple(prefixes),
            sender_instance=me, sender_counter=counter, chain=tuple(c.to_dict() for c in chain),
            basis_fsic=dict(basis), result_fsic=offered,
        )
        name = f"bundle-{dataset_id[:8]}-{me[:8]}-{counter:06d}-{bundle_id[:8]}.bsync"
        counts: dict[str, int] = {}
        with container.BundleWriter(out_dir, name, manifest.to_dict(), lambda d: key.sign("bundle", d)) as writer:
            for lines in outgoing_lines(conn, prefixes, basis, counts):
                writer.write_records(lines)
                if progress:
                    progress("queuing", writer.records)
            if writer.records == 0:
                writer.abort()
                result.result = offered
                return result
            path = writer.finish({"counts": counts})
    result.records, result.counts, result.result = sum(counts.values()), counts, offered
    try:
        _read_back(path, chain[0].subject_key, result.records)
        with write_transaction(conn):
            _record(conn, result, me, path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    result.path, result.size = path, path.stat().st_size
    return result


def _read_back(path: Path, public_key: bytes, expected: int) -> None:
    """TRANSFERRING: re-read what reached the medium, as an importer will."""
    info = container.read_info(path)
    container.verify_digest(info)
    verify(public_key, "bundle", info.digest, info.signature)
    seen = sum(len(batch) for batch in container.iter_record_batches(info))
    if seen != expected:
        raise SyncError(f"bundle {path.name} read back {seen} records, wrote {expected}: the medium may be faulty")


def _record(conn: sqlite3.Connection, result: ExportResult, me: str, path: Path) -> None:
    stats: dict[str, Any] = {"counts": result.counts, "basis": result.basis, "basis_source": result.basis_source}
    conn.execute(
        "INSERT INTO bundlesync_transfers (bundle_id, direction, dataset_id, filter, peer_instance, path, at, records, stats, result_fsic) "
        "VALUES (?, 'export', ?, ?, ?, ?, strftime('%Y-%m-%dT%H:%M:%SZ', 'now'), ?, ?, ?)",
        (result.bundle_id, result.dataset_id, "\n".join(result.filter), me, str(path), result.records,
         json.dumps(stats), json.dumps(result.result)),
    )
