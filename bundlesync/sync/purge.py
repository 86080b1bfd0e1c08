"""Purge: erase one user's personal data for good (Morango's hard delete).

Every store record in the user's own partitions (those of the profile's ``user``
scope whose templates name the user: ``user-ro:U``, ``user-rw:U`` in the reference
profile, matched exactly at a ``:`` boundary)
gets a new *purged* version: data blanked to ``{}``, flagged so that it wins every
merge (:mod:`bundlesync.replica.merge`). The app rows are deleted, the conflict log
entries of those records are dropped, and the purge travels in the next bundle
like any other change. Because a purged version beats every other version, an
older bundle imported later cannot bring the data back, and a later local edit
of a purged record is never exported: serialization marks it, and the next import
erases the app row again.

:func:`plan_purge` checks a purge without writing anything, so the command line can
ask for confirmation first; a user id in whose partitions no record lies is refused.
"""

from __future__ import annotations

import datetime
import sqlite3
import string
from dataclasses import dataclass

from bundlesync.profile import Profile
from bundlesync.replica.db import q, write_transaction
from bundlesync.sync.deserialize import deserialize
from bundlesync.device import Device
from bundlesync.errors import StateError
from bundlesync.format.records import WALL_MAX_MS, data_hash
from bundlesync.partitions import covered, prefix_sql
from bundlesync.trust.scope import scope_filters
from bundlesync.replica.store import FROM_STORE, name_ids, next_counter, read_vector, serialize_changes, stored_vector
from bundlesync.replica.tracking import suppressed

__all__ = ["PurgePlan", "PurgeResult", "plan_purge", "purge_user", "user_partitions"]


@dataclass
class PurgeResult:
    """What a purge erased."""

    dataset_id: str
    user_id: str
    partitions: tuple[str, ...]
    records: int
    app_rows_deleted: int


@dataclass(frozen=True)
class PurgePlan:
    """A purge checked and ready: whose data, in which partitions, signed under which facility."""

    dataset_id: str
    facility_id: str
    user_id: str
    partitions: tuple[str, ...]


EMPTY_HASH = data_hash("{}")
"""The hash of a purged record's data (``{}``: nothing of the user's is kept)."""


def user_partitions(profile: Profile, dataset_id: str, user_id: str) -> tuple[str, ...]:
    """The partitions that belong to ``user_id`` alone: the ``user`` scope's templates that name the user.

    Chosen from the templates, never by looking for the id inside partition strings: a
    short or wrong id is a substring of many partitions (the dataset id, ``anonymous``).
    """
    template = profile.scopes.get("user")
    own = [t for t in (*template.read_write, *template.read, *template.write) if "${user_id}" in t] if template else []
    if not own:
        raise StateError(f"profile {profile.name} has no partitions of a single user, so nothing can be purged; "
                         "add a 'user' scope with ${user_id} templates to the profile")
    return tuple(dict.fromkeys(string.Template(t).substitute(dataset_id=dataset_id, user_id=user_id) for t in own))


def _holds_records(conn: sqlite3.Connection, profile: Profile, partitions: tuple[str, ...]) -> bool:
    """Whether any record lies in ``partitions``: in the store, or in an app row not serialized yet."""
    where, params = prefix_sql(partitions, column="p.name")
    if conn.execute(f"SELECT EXISTS (SELECT 1 FROM bundlesync_versions s JOIN bundlesync_partitions p "
                    f"ON p.n = s.part WHERE {where})", params).fetchone()[0]:
        return True
    for table in profile.tables:
        where, params = prefix_sql(partitions, column=f"({table.partition_sql('t')})")
        if conn.execute(
            f"SELECT EXISTS (SELECT 1 FROM bundlesync_changes c JOIN {q(table.name)} t "
            f"ON t.{q(table.primary_key)} = c.pk WHERE c.model = ? AND {where})", [table.name, *params],
        ).fetchone()[0]:
            return True
    return False


def plan_purge(device: Device, facility: str, user_id: str) -> PurgePlan:
    """Check a purge without changing anything: the user's partitions, that they hold data, that we may write them.

    Raises:
        StateError: No certificate, a certificate that may not write the user's data, or
            ``user_id`` is not a user of the facility (no record lies in their partitions).
    """
    conn, profile = device.conn, device.profile
    dataset_id, facility_id = device.resolve_facility(facility)
    chain = device.keys.device_chain(dataset_id)
    if chain is None:
        raise StateError(f"this device holds no certificate for facility {facility}; it cannot sign a purge: "
                         "run the purge on the facility's authority or a device with a full-facility certificate")
    partitions = user_partitions(profile, dataset_id, user_id)
    mine = scope_filters(profile, dataset_id, chain[0].scope)
    if not covered(partitions, mine.write):
        raise StateError(f"this device's certificate ({mine.scope}) may not write user {user_id}'s data, so it "
                         "cannot purge it: run the purge on a device with a full-facility certificate")
    if not _holds_records(conn, profile, partitions):
        raise StateError(f"user {user_id} is not a user of facility {facility_id}: no record lies in "
                         f"{', '.join(partitions)}; check the user id (the full id, not a prefix); nothing was purged")
    return PurgePlan(dataset_id, facility_id, user_id, partitions)


def purge_user(device: Device, facility: str, user_id: str, plan: PurgePlan | None = None) -> PurgeResult:
    """Purge ``user_id``'s personal data in the facility (one transaction); see :func:`plan_purge` for refusals."""
    conn, profile = device.conn, device.profile
    plan = plan or plan_purge(device, facility, user_id)
    dataset_id, partitions = plan.dataset_id, plan.partitions
    now_ms = int(datetime.datetime.now(datetime.timezone.utc).timestamp() * 1000)
    me = device.instance_id
    where, params = prefix_sql(partitions, column="p.name")
    with write_transaction(conn):
        serialize_changes(conn, profile)
        targets = conn.execute(
            f"SELECT s.model, m.name, s.id, s.hlc, s.vv, w.name, s.ctr FROM {FROM_STORE} WHERE NOT s.purged AND ({where})",
            params,
        ).fetchall()
        if not targets:
            return PurgeResult(dataset_id, user_id, partitions, 0, 0)
        counter = next_counter(conn)
        me_n = name_ids(conn, "inst", [me])[me]
        rows = []
        for model_n, _, record_id, hlc, vv_text, inst, ctr in targets:
            vv = read_vector(vv_text, inst, ctr)
            vv[me] = counter
            rows.append((max(now_ms << 16, hlc + 1), min(now_ms, WALL_MAX_MS), me_n, counter,
                         stored_vector(vv, me, counter), model_n, record_id))
        # The purge is a new edit: its wall-clock time is now, not that of the version it replaces.
        conn.executemany(
            "UPDATE bundlesync_versions SET data = '{}', hash = ?, deleted = 1, purged = 1, hlc = ?, wall = ?, "
            "inst = ?, ctr = ?, vv = ?, dirty = 1, error = NULL, bundle = NULL WHERE model = ? AND id = ?",
            [(EMPTY_HASH, *row) for row in rows],
        )
        conn.executemany("DELETE FROM bundlesync_conflicts WHERE model = ? AND record_id = ?",
                         [(model, record_id) for _, model, record_id, *_ in targets])
        with suppressed(conn):
            deleted = deserialize(conn, profile).deleted
    return PurgeResult(dataset_id, user_id, partitions, len(targets), deleted)
