"""Purge: erase one user's personal data for good (Morango's hard delete).

Every store record in the user's own partitions (those of the profile's ``user``
scope that name the user: ``user-ro:U``, ``user-rw:U`` in the reference profile)
gets a new *purged* version: data blanked to ``{}``, flagged so that it wins every
merge (:mod:`bundlesync.replica.merge`). The app rows are deleted, the conflict log
entries of those records are dropped, and the purge travels in the next bundle
like any other change. Because a purged version beats every other version, an
older bundle imported later cannot bring the data back, and a later local edit
of a purged record is undone rather than exported.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass

from bundlesync.replica.db import write_transaction
from bundlesync.sync.deserialize import deserialize
from bundlesync.device import Device
from bundlesync.errors import StateError
from bundlesync.partitions import covered, prefix_sql
from bundlesync.trust.scope import scope_filters
from bundlesync.replica.store import next_counter, serialize_changes
from bundlesync.replica.tracking import suppressed

__all__ = ["PurgeResult", "purge_user"]


@dataclass
class PurgeResult:
    """What a purge erased."""

    dataset_id: str
    user_id: str
    partitions: tuple[str, ...]
    records: int
    app_rows_deleted: int


def purge_user(device: Device, facility: str, user_id: str) -> PurgeResult:
    """Purge ``user_id``'s personal data in the facility (one transaction)."""
    conn, profile = device.conn, device.profile
    dataset_id, _ = device.resolve_facility(facility)
    chain = device.keys.device_chain(dataset_id)
    if chain is None:
        raise StateError(f"this device holds no certificate for facility {facility}; it cannot sign a purge")
    user_scope = scope_filters(profile, dataset_id, f"user:{user_id}")
    partitions = tuple(p for p in (*user_scope.read, *user_scope.write) if user_id in p)
    if not partitions:
        raise StateError(f"profile {profile.name} has no partitions of a single user; nothing can be purged")
    mine = scope_filters(profile, dataset_id, chain[0].scope)
    if not covered(partitions, mine.write):
        raise StateError(f"this device's certificate ({mine.scope}) may not write user {user_id}'s data, so it "
                         "cannot purge it: run the purge on a device with a full-facility certificate")
    now_ms = int(datetime.datetime.now(datetime.timezone.utc).timestamp() * 1000)
    me = device.instance_id
    where, params = prefix_sql(partitions)
    with write_transaction(conn):
        serialize_changes(conn, profile)
        targets = conn.execute(
            f"SELECT model, id, hlc, vv FROM bundlesync_store WHERE NOT purged AND ({where})", params
        ).fetchall()
        if not targets:
            return PurgeResult(dataset_id, user_id, partitions, 0, 0)
        counter = next_counter(conn)
        rows = []
        for model, record_id, hlc, vv_text in targets:
            vv = json.loads(vv_text)
            vv[me] = counter
            rows.append((max(now_ms << 16, hlc + 1), me, counter, json.dumps(vv, sort_keys=True, separators=(",", ":")),
                         model, record_id))
        conn.executemany(
            "UPDATE bundlesync_store SET data = '{}', deleted = 1, purged = 1, hlc = ?, inst = ?, ctr = ?, vv = ?, "
            "dirty = 1, error = NULL, bundle_id = NULL WHERE model = ? AND id = ?",
            rows,
        )
        conn.executemany("DELETE FROM bundlesync_conflicts WHERE model = ? AND record_id = ?",
                         [(model, record_id) for model, record_id, _, _ in targets])
        with suppressed(conn):
            deleted = deserialize(conn, profile).deleted
    return PurgeResult(dataset_id, user_id, partitions, len(targets), deleted)
