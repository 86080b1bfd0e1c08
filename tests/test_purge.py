"""Purge, driven in-process: who may purge, what a purge writes, and what it leaves alone.

The command line's purge is tested end to end in ``test_promises.py`` and ``test_cli_paths.py``;
these tests call :func:`bundlesync.sync.purge.plan_purge` and
:func:`bundlesync.sync.purge.purge_user` directly, fast enough for mutation testing
(``scripts/mutation.sh``) to run them for every mutant, and precise about every field of
every version a purge writes.
"""

from __future__ import annotations

import json
from dataclasses import replace
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import PROFILE, make_db
from sim import World

from bundlesync.device import Device, init_device
from bundlesync.errors import StateError
from bundlesync.format import container
from bundlesync.format.records import Version, parse_record
from bundlesync.partitions import within
from bundlesync.replica.db import write_transaction
from bundlesync.replica.store import fetch_versions, serialize_changes
from bundlesync.sync.purge import PurgeResult, plan_purge, purge_user, user_partitions

LOGS = "logger_contentsessionlog"
USERS = "kolibriauth_facilityuser"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """An authority (device 0, full facility) and a learner device (device 1) for the busiest user."""
    w = World.create(tmp_path, 2, users=4, logs=30, seed=7, learners=1)
    try:
        yield w
    finally:
        w.close()


def _all_versions(dev: Device) -> dict[tuple[str, str], Version]:
    keys = [(m, i) for m, i in dev.conn.execute("SELECT model, id FROM bundlesync_store")]
    return fetch_versions(dev.conn, keys, dev.profile)


def _serialized(dev: Device) -> dict[tuple[str, str], Version]:
    with write_transaction(dev.conn):
        serialize_changes(dev.conn, dev.profile)
    return _all_versions(dev)


def _app_row_count(world: World) -> int:
    return sum(len(rows) for rows in world.app_rows(0).values())


def _other_user(world: World, user: str) -> str:
    return str(world.one(0, f"SELECT user_id FROM {LOGS} WHERE user_id IS NOT NULL AND user_id != ? "
                            "ORDER BY user_id LIMIT 1", (user,)))


def test_a_purge_writes_one_new_version_over_every_record_of_the_user_and_nothing_else(world: World) -> None:
    a, user = world.devices[0], world.users[1]
    dataset, _ = a.resolve_facility(world.facility)
    own = user_partitions(a.profile, dataset, user)
    before = _serialized(a)
    mine = {k: v for k, v in before.items() if within(v.partition, own)}
    assert mine and len(mine) < len(before)
    # A conflict-log entry of one of the user's records and one of another record.
    theirs_key = next(k for k in before if k not in mine)
    mine_key = next(iter(mine))
    for model, rid in (mine_key, theirs_key):
        a.conn.execute("INSERT INTO bundlesync_conflicts (model, record_id, loser, winner_inst, winner_ctr, "
                       "bundle_id, detected_at) VALUES (?, ?, '{}', 'x', 1, NULL, '2026-01-01T00:00:00Z')",
                       (model, rid))
    a.conn.commit()
    rows_before = _app_row_count(world)
    # One of the user's versions carries a clock ahead of this machine's (another device's clock
    # ran fast): the purge must still be stamped above it.
    ahead_key = next(k for k in mine if k[0] == LOGS)
    ahead_hlc = (int(time.time() * 1000) + 3_600_000) << 16
    a.conn.execute("UPDATE bundlesync_versions SET hlc = ? WHERE model = (SELECT n FROM bundlesync_models "
                   "WHERE name = ?) AND id = ?", (ahead_hlc, *ahead_key))
    a.conn.commit()
    mine[ahead_key] = _all_versions(a)[ahead_key]
    start_ms = int(time.time() * 1000)

    result = purge_user(a, world.facility, user)

    assert (result.records, result.app_rows_deleted, result.user_id) == (len(mine), len(mine), user)
    assert _app_row_count(world) == rows_before - len(mine)
    assert result.partitions == own and result.dataset_id == dataset
    after = _all_versions(a)
    counter = {v.ctr for k, v in after.items() if k in mine}
    assert len(counter) == 1  # one edit, one counter value
    for key, old in mine.items():
        new = after[key]
        assert (new.data, new.deleted, new.purged, new.inst) == ("{}", True, True, a.instance_id)
        assert new.partition == old.partition
        end_ms = int(time.time() * 1000)
        if key == ahead_key:
            assert new.hlc == ahead_hlc + 1  # the next clock value after the one it replaces
        else:
            assert start_ms << 16 <= new.hlc < (end_ms + 1) << 16 and new.hlc > old.hlc
        assert new.wall is not None and start_ms <= new.wall <= int(time.time() * 1000)
        assert new.vv == {**old.vv, a.instance_id: new.ctr}
    for key, old in before.items():
        if key not in mine:
            assert after[key] == old
    assert world.one(0, f"SELECT count(*) FROM {LOGS} WHERE user_id = ?", (user,)) == 0
    assert world.one(0, f"SELECT count(*) FROM {USERS} WHERE id = ?", (user,)) == 0
    logged = {(m, r) for m, r in a.conn.execute("SELECT model, record_id FROM bundlesync_conflicts")}
    assert logged == {theirs_key}
    # The purge is this device's newest write: its knowledge of itself reaches the new counter.
    assert world.one(0, "SELECT ctr FROM bundlesync_fsic WHERE partition = '' AND inst = ?",
                     (a.instance_id,)) == counter.pop()
    # A second purge finds nothing left to erase and changes nothing.
    again = purge_user(a, world.facility, user)
    assert again == PurgeResult(dataset, user, own, 0, 0)
    assert _all_versions(a) == after
    # The purge travels as canonical record lines: compact version vectors with sorted keys.
    bundle = world.export(0, world.root / "drive")
    assert bundle is not None
    purged_lines = [line for line in container.iter_records(container.read_info(bundle))
                    if (parse_record(line).model, parse_record(line).id) in mine]
    assert len(purged_lines) == len(mine)
    for line in purged_lines:
        head = line.split(b"\t", 1)[0]
        vv = json.loads(head)["v"]
        assert b'"v":' + json.dumps(vv, sort_keys=True, separators=(",", ":")).encode() + b"," in head


def test_a_purge_stays_inside_the_users_partitions_even_for_an_id_that_prefixes_another(world: World) -> None:
    a, user = world.devices[0], world.users[1]
    other = _other_user(world, user)
    _serialized(a)
    result = purge_user(a, world.facility, user)
    assert result.records > 0
    kept = world.one(0, f"SELECT count(*) FROM {LOGS} WHERE user_id = ?", (other,))
    assert isinstance(kept, int) and kept > 0
    assert world.one(0, f"SELECT count(*) FROM {USERS} WHERE id = ?", (other,)) == 1
    # A prefix of a real id names no user: refused, nothing written.
    with pytest.raises(StateError, match="is not a user of facility"):
        plan_purge(a, world.facility, other[:8])


def test_a_purge_is_refused_to_a_single_user_certificate_even_for_its_own_user(world: World) -> None:
    learner, user = world.devices[1], world.users[1]
    world.deliver(world.export(0, world.root / "drive"), 1)  # type: ignore[arg-type]
    held = len(_all_versions(learner))
    assert held > 0
    with pytest.raises(StateError, match=r"certificate \(user:.*\) may not write user .* cannot purge"):
        plan_purge(learner, world.facility, user)
    with pytest.raises(StateError, match="may not write"):
        purge_user(learner, world.facility, user)
    assert not any(v.purged for v in _all_versions(learner).values())


def test_a_purge_is_refused_without_a_certificate_and_for_an_unknown_user(world: World, tmp_path: Path) -> None:
    db = tmp_path / "lone.sqlite3"
    facility = make_db(db, users=2, logs=5, seed=2)
    init_device(tmp_path / "lone", db, PROFILE)
    with Device.open(tmp_path / "lone") as lone:
        user = str(lone.conn.execute(f"SELECT id FROM {USERS} LIMIT 1").fetchone()[0])
        with pytest.raises(StateError, match="holds no certificate for facility .*: run the purge on the facility's "
                                             "authority or a device with a full-facility certificate$"):
            plan_purge(lone, facility, user)
    a = world.devices[0]
    dataset, facility_id = a.resolve_facility(world.facility)
    lies = ", ".join(user_partitions(a.profile, dataset, "nobody"))
    with pytest.raises(StateError, match=rf"^user nobody is not a user of facility {facility_id}: no record lies in "
                                         rf"{lies}; check the user id \(the full id, not a prefix\); nothing was purged$"):
        plan_purge(a, world.facility, "nobody")


def test_a_user_known_only_from_unserialized_app_rows_can_be_purged(world: World) -> None:
    """A user added since the last serialization holds records: the plan sees them in the change log."""
    a = world.devices[0]
    _serialized(a)
    new_user = "f" * 32
    conn = sqlite3.connect(world.dbs[0])
    conn.execute(f"INSERT INTO {USERS} (id, username, full_name, password, date_joined, birth_year, gender, "
                 "id_number, facility_id, dataset_id, extra_fields) SELECT ?, 'late', 'Late Learner', password, "
                 f"date_joined, birth_year, gender, id_number, facility_id, dataset_id, extra_fields FROM {USERS} "
                 "LIMIT 1", (new_user,))
    conn.commit()
    conn.close()
    plan = plan_purge(a, world.facility, new_user)
    assert plan.user_id == new_user and all(new_user in p for p in plan.partitions)
    assert (plan.dataset_id, plan.facility_id) == a.resolve_facility(world.facility)
    result = purge_user(a, world.facility, new_user, plan)
    assert (result.records, result.app_rows_deleted) == (1, 1)
    assert world.one(0, f"SELECT count(*) FROM {USERS} WHERE id = ?", (new_user,)) == 0


def test_a_profile_without_single_user_partitions_cannot_purge(world: World) -> None:
    a = world.devices[0]
    profile = replace(a.profile, scopes={k: v for k, v in a.profile.scopes.items() if k != "user"})
    with pytest.raises(StateError, match="has no partitions of a single user, so nothing can be purged; add a 'user' "
                                         r"scope with \$\{user_id\} templates to the profile$"):
        user_partitions(profile, "d" * 32, world.users[1])


def test_a_local_edit_of_a_purged_record_is_never_exported_and_is_erased_at_the_next_import(world: World) -> None:
    a, user = world.devices[0], world.users[1]
    first = world.export(0, world.root / "drive")
    assert first is not None
    world.deliver(first, 1)
    world.sql(1, f"UPDATE {LOGS} SET progress = 0.25 WHERE user_id = ?", (user,))  # the learner keeps working
    purge_user(a, world.facility, user)
    purged = {k: v for k, v in _all_versions(a).items() if v.purged}
    # The app writes the user back (a restore from an old backup, say) and edits another's log.
    conn = sqlite3.connect(world.dbs[0])
    conn.execute(f"INSERT INTO {USERS} (id, username, full_name, password, date_joined, birth_year, gender, "
                 "id_number, facility_id, dataset_id, extra_fields) SELECT ?, 'back', 'Back Again', password, "
                 f"date_joined, birth_year, gender, id_number, facility_id, dataset_id, extra_fields FROM {USERS} "
                 "LIMIT 1", (user,))
    conn.execute(f"UPDATE {LOGS} SET progress = 0.5 WHERE user_id = ?", (_other_user(world, user),))
    conn.commit()
    conn.close()
    bundle = world.export(0, world.root / "drive")
    assert bundle is not None
    after = _all_versions(a)
    assert {k: v for k, v in after.items() if v.purged} == purged  # no new version of a purged record
    sent = [parse_record(line) for line in container.iter_records(container.read_info(bundle))]
    assert [v for v in sent if v.inst == a.instance_id and not v.purged and v.model == LOGS] != []  # the other edit
    assert all(v.purged for v in sent if v.id == user)
    assert world.one(0, "SELECT count(*) FROM bundlesync_changes") == 0
    # The next import erases the restored row again; the learner's late edits of its purged logs lose too.
    late = world.export(1, world.root / "drive1")
    assert late is not None
    world.deliver(late, 0)
    assert world.one(0, f"SELECT count(*) FROM {USERS} WHERE id = ?", (user,)) == 0
    assert world.one(0, f"SELECT count(*) FROM {LOGS} WHERE user_id = ?", (user,)) == 0
    final = {k: v for k, v in _all_versions(a).items() if v.purged}
    assert final.keys() == purged.keys()
    for key, version in purged.items():  # the purge still wins; the learner's edits join its history only
        assert replace(final[key], vv=version.vv) == version and final[key].vv.items() >= version.vv.items()


def test_a_purge_keeps_the_history_of_records_another_device_wrote(world: World) -> None:
    """A record the learner's device created (vector ``{learner: 1}``) keeps that entry beside the purge's."""
    a, user = world.devices[0], world.users[1]
    first = world.export(0, world.root / "drive")
    assert first is not None
    world.deliver(first, 1)
    new_log = "c" * 32
    world.sql(1, f"INSERT INTO {LOGS} SELECT ?, user_id, content_id, channel_id, start_timestamp, end_timestamp, "
                 f"time_spent, progress, kind, extra_fields, dataset_id FROM {LOGS} WHERE user_id = ? LIMIT 1",
              (new_log, user))
    late = world.export(1, world.root / "drive1")
    assert late is not None
    world.deliver(late, 0)
    learner = world.devices[1].instance_id
    created = _all_versions(a)[(LOGS, new_log)]
    assert created.inst == learner and created.vv == {learner: created.ctr}
    purge_user(a, world.facility, user)
    purged = _all_versions(a)[(LOGS, new_log)]
    assert purged.purged and purged.vv == {learner: created.ctr, a.instance_id: purged.ctr}


def test_a_purge_keeps_every_writer_in_the_vector_it_replaces(tmp_path: Path) -> None:
    """A's purge over a record B created and the learner edited: all three writers stay in its vector."""
    w = World.create(tmp_path / "w3", 3, users=4, logs=30, seed=7, learners=1)
    try:
        a, b, user = w.devices[0], w.devices[1], w.users[2]
        start = w.export(0, tmp_path / "d0")
        assert start is not None
        w.deliver(start, 1), w.deliver(start, 2)
        new_log = "d" * 32
        w.sql(1, f"INSERT INTO {LOGS} SELECT ?, user_id, content_id, channel_id, start_timestamp, end_timestamp, "
                 f"time_spent, progress, kind, extra_fields, dataset_id FROM {LOGS} WHERE user_id = ? LIMIT 1",
              (new_log, user))
        from_b = w.export(1, tmp_path / "d1")
        assert from_b is not None
        w.deliver(from_b, 2)
        w.sql(2, f"UPDATE {LOGS} SET progress = 0.125 WHERE id = ?", (new_log,))
        from_learner = w.export(2, tmp_path / "d2")
        assert from_learner is not None
        w.deliver(from_b, 0), w.deliver(from_learner, 0)
        edited = _all_versions(a)[(LOGS, new_log)]
        assert set(edited.vv) == {b.instance_id, w.devices[2].instance_id}
        purge_user(a, w.facility, user)
        purged = _all_versions(a)[(LOGS, new_log)]
        assert purged.purged and purged.vv == {**edited.vv, a.instance_id: purged.ctr}
    finally:
        w.close()
