"""The export's line spool: its lines are the store's own lines, byte for byte, and it stands aside when it must."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PROFILE, Pair, make_db, run_cli

from bundlesync.device import Device
from bundlesync.errors import EnvError
from bundlesync.format import container
from bundlesync.format.records import COUNTER_MAX, HLC_MAX, WALL_MAX_MS, Version
from bundlesync.profile import Profile, bind_profile, load_profile
from bundlesync.replica import db
from bundlesync.replica.pacing import Pacer
from bundlesync.replica.store import (Write, current_counter, ensure_identity, reconcile_table, serialize_changes,
                                      upsert_versions)
from bundlesync.replica.tracking import install_table_triggers
from bundlesync.sync.exporter import outgoing_lines
from bundlesync.sync.spool import LineSpool

# Names JSON spells as they are, and names it must escape (quotes, backslashes, control and non-ASCII characters).
_NAME_CHARS = st.characters(exclude_categories=["Cs"], max_codepoint=0x1F700)
_NAMES = st.one_of(st.text("abcdef0123456789", min_size=1, max_size=12),
                   st.text(_NAME_CHARS, min_size=1, max_size=12))
_COUNTERS = st.integers(1, COUNTER_MAX)


def _store(tmp: Path) -> tuple[sqlite3.Connection, Profile]:
    path = tmp / "s.db"
    make_db(path, schema_only=True)
    conn = sqlite3.connect(path, isolation_level=None)
    db.migrate(conn)
    profile = bind_profile(load_profile(PROFILE), conn)
    for table in profile.tables:
        install_table_triggers(conn, table)
    return conn, profile


def _spool(tmp: Path, conn: sqlite3.Connection, instance: str, prefixes: list[str]) -> LineSpool:
    return LineSpool(tmp, instance=instance, prefixes=prefixes, basis={},
                     sql_value=lambda sql, args: conn.execute(sql, args).fetchone()[0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(versions=st.lists(st.tuples(
    _NAMES, _NAMES, _NAMES, st.dictionaries(_NAMES, _COUNTERS, max_size=3), _COUNTERS, st.integers(0, HLC_MAX),
    st.one_of(st.none(), st.integers(0, WALL_MAX_MS)), st.booleans(), st.booleans(),
    st.sampled_from(['{}', '{"a":1}', '{"t":"\\u00e9\\n\\"q\\""}'])), min_size=1, max_size=8))
def test_spooled_lines_are_the_lines_the_store_gives(
    tmp_path_factory: pytest.TempPathFactory,
    versions: list[tuple[str, str, str, dict[str, int], int, int, int | None, bool, bool, str]],
) -> None:
    tmp = tmp_path_factory.mktemp("spool")
    conn, profile = _store(tmp)
    model = profile.tables[0].name
    writes: list[Write] = []
    seen: set[str] = set()
    for record_id, part, inst, others, ctr, hlc, wall, deleted, purged, data in versions:
        if record_id in seen:
            continue
        seen.add(record_id)
        partition = f"D:{part}"
        vv = {**others, inst: ctr}
        upsert_versions(conn, [(Version(model, record_id, partition, data, deleted, purged, hlc, inst, ctr, vv,
                                        wall), False)], None)
        writes.append((model, record_id, partition, data, int(deleted), int(purged), hlc, inst, ctr, vv, 0, None,
                       wall, False))
    stored = sorted(line for batch in outgoing_lines(conn, profile, ["D"], {}, {}) for line in batch)
    spool = _spool(tmp, conn, "me", ["D"])
    spool.add(model, writes, [])
    spool.finish()
    spooled = sorted(line for batch in spool.lines(model) for line in batch)
    spool.close()
    conn.close()
    assert spooled == stored


def _edit(conn: sqlite3.Connection, table: str, pk: str, column: str, value: object) -> None:
    conn.execute(f'UPDATE "{table}" SET "{column}" = ? WHERE id = ?', (value, pk))


def test_a_version_replaced_in_the_same_export_is_left_out_and_the_store_holds_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    make_db(path, users=3, logs=20)
    conn = sqlite3.connect(path, isolation_level=None)
    db.migrate(conn)
    profile = bind_profile(load_profile(PROFILE), conn)
    for table in profile.tables:
        install_table_triggers(conn, table)
    me = ensure_identity(conn)
    for table in profile.tables:
        reconcile_table(conn, table)
    user = conn.execute("SELECT id FROM kolibriauth_facilityuser ORDER BY id LIMIT 1").fetchone()[0]
    spool = _spool(tmp_path, conn, me, [""])
    pacer = Pacer(conn)
    with pacer.transaction():
        serialize_changes(conn, profile, on_batch=spool.add)
    first = current_counter(conn)
    _edit(conn, "kolibriauth_facilityuser", user, "full_name", "Edited between two transactions")
    with pacer.transaction():
        serialize_changes(conn, profile, on_batch=spool.add)
    spool.finish()
    assert spool.first == first and current_counter(conn) == first + 1
    users = [line for batch in spool.lines("kolibriauth_facilityuser") for line in batch]
    mine = [line for line in users if f'"id":"{user}"'.encode() in line]
    assert len(mine) == 1 and b"Edited between two transactions" in mine[0] and f'"c":{first + 1}'.encode() in mine[0]
    assert spool.holds("kolibriauth_facilityuser", int(conn.execute(
        "SELECT count(*) FROM bundlesync_store WHERE model = 'kolibriauth_facilityuser' AND inst = ?",
        (me,)).fetchone()[0]))
    # A version of this writer the export did not make (relayed back to a restored database): not the spool's.
    upsert_versions(conn, [(Version("kolibriauth_facilityuser", "relayed", "x", "{}", False, False, 1, me,
                                    first + 1, {me: first + 1}), False)], None)
    stored = int(conn.execute("SELECT count(*) FROM bundlesync_store WHERE model = 'kolibriauth_facilityuser' "
                              "AND inst = ?", (me,)).fetchone()[0])
    assert not spool.holds("kolibriauth_facilityuser", stored)
    spool.close()
    conn.close()


def _record_lines(bundle: Path, home: Path) -> list[bytes]:
    with Device.open(home) as dev:
        info = container.read_info(bundle)
        plain = container.decrypt_payload(info, home / "plain", dev.keys.encryption_secret())
        try:
            return sorted(line for batch in container.iter_record_batches(plain) for line in batch)
        finally:
            plain.path.unlink()


def test_an_export_sends_the_same_lines_from_the_spool_as_from_the_store(pair: Pair) -> None:
    """The first export takes its lines from the spool; ``--full`` right after, with nothing new, from the store."""
    conn = sqlite3.connect(pair.a_db, isolation_level=None)
    with conn:  # data with characters JSON escapes
        conn.execute("UPDATE kolibriauth_facilityuser SET full_name = 'Zoë \"Q\" \\ tab\t' WHERE id = "
                     "(SELECT min(id) FROM kolibriauth_facilityuser)")
    conn.close()
    first = Path(run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb)).last_line)
    again_dir = pair.usb.parent / "again"
    again_dir.mkdir()
    again = Path(run_cli(pair.a, "export", "--facility", pair.facility, "--full", "--out", str(again_dir)).last_line)
    spooled, stored = _record_lines(first, pair.a), _record_lines(again, pair.a)
    assert len(spooled) > 200 and spooled == stored


def test_a_spool_that_cannot_be_kept_says_where_and_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(EnvError, match=r"cannot keep the export's record lines in .*missing \(No such file or "
                                       r"directory\): free space on the disk"):
        LineSpool(tmp_path / "missing", instance="me", prefixes=["D"], basis={}, sql_value=lambda sql, args: b"")
