"""The export's line spool: its lines are the store's own lines, byte for byte, and it stands aside when it must."""

from __future__ import annotations

import atexit
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PROFILE, Pair, make_db, run_cli

from bundlesync.device import Device
from bundlesync.errors import EnvError
from bundlesync.plugins.hooks import FacilityDataSyncHook
from bundlesync.plugins.loader import LoadedPlugin, PluginSet
from bundlesync.plugins.operations import LocalOperation, SyncContext
from bundlesync.format import container
from bundlesync.format.records import COUNTER_MAX, HLC_MAX, WALL_MAX_MS, Version
from bundlesync.profile import Profile, bind_profile, load_profile
from bundlesync.replica import db
from bundlesync.replica.pacing import Pacer
from bundlesync.replica.store import (Write, current_counter, ensure_identity, reconcile_table, serialize_changes,
                                      upsert_versions)
from bundlesync.replica.tracking import install_table_triggers
from bundlesync.sync.exporter import export_bundle, outgoing_lines
from bundlesync.sync.spool import LineSpool

# Names JSON spells as they are, and names it must escape (quotes, backslashes, control and non-ASCII characters).
_NAME_CHARS = st.characters(exclude_categories=["Cs"], max_codepoint=0x1F700)
_NAMES = st.one_of(st.text("abcdef0123456789", min_size=1, max_size=12),
                   st.text(_NAME_CHARS, min_size=1, max_size=12))
_COUNTERS = st.integers(1, COUNTER_MAX)


_EMPTY_STORES: dict[str, Path] = {}


def _store(tmp: Path) -> tuple[sqlite3.Connection, Profile]:
    """A copy of an empty app database with bundlesync's store and triggers (made once per test process)."""
    if "path" not in _EMPTY_STORES:
        template = Path(tempfile.mkdtemp(prefix="bundlesync-spool-test-")) / "empty.db"
        atexit.register(shutil.rmtree, template.parent, True)
        make_db(template, schema_only=True)
        conn = sqlite3.connect(template, isolation_level=None)
        db.migrate(conn)
        for table in bind_profile(load_profile(PROFILE), conn).tables:
            install_table_triggers(conn, table)
        conn.close()
        _EMPTY_STORES["path"] = template
    path = tmp / "s.db"
    shutil.copyfile(_EMPTY_STORES["path"], path)
    conn = sqlite3.connect(path, isolation_level=None)
    return conn, bind_profile(load_profile(PROFILE), conn)


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
    try:
        pacer = Pacer(conn)
        with pacer.transaction():
            serialize_changes(conn, profile, on_batch=spool.add)
        first = current_counter(conn)
        _edit(conn, "kolibriauth_facilityuser", user, "full_name", "Edited between two transactions")
        with pacer.transaction():
            serialize_changes(conn, profile, on_batch=spool.add)
        spool.finish()
        assert spool.first == first and current_counter(conn) == first + 1

        def stored_versions() -> int:
            return int(conn.execute("SELECT count(*) FROM bundlesync_store WHERE model = 'kolibriauth_facilityuser' "
                                    "AND inst = ?", (me,)).fetchone()[0])

        assert spool.holds("kolibriauth_facilityuser", stored_versions())
        # A version of this writer the export did not make (relayed back to a restored database): not the spool's.
        upsert_versions(conn, [(Version("kolibriauth_facilityuser", "relayed", "x", "{}", False, False, 1, me,
                                        first + 1, {me: first + 1}), False)], None)
        assert not spool.holds("kolibriauth_facilityuser", stored_versions())
        users = [line for batch in spool.lines("kolibriauth_facilityuser") for line in batch]
        mine = [line for line in users if f'"id":"{user}"'.encode() in line]
        assert len(mine) == 1 and b"Edited between two transactions" in mine[0]
        assert f'"c":{first + 1}'.encode() in mine[0]
        # A table's lines are given once: after that the store stands for them.
        assert not spool.holds("kolibriauth_facilityuser", stored_versions() - 1)
    finally:
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


class _EditAndSerialize(LocalOperation):
    """A QUEUING operation that edits an app row and makes a version of it at once."""

    def handle_initial(self, context: SyncContext) -> None:
        conn = context.connection
        conn.execute("UPDATE kolibriauth_facilityuser SET full_name = 'edited while queuing' "
                     "WHERE id = (SELECT min(id) FROM kolibriauth_facilityuser)")
        serialize_changes(conn, context.profile)


class _QueuingHook(FacilityDataSyncHook):
    queuing_operations = [_EditAndSerialize()]


def test_versions_written_after_the_serialization_make_the_export_read_the_store(pair: Pair) -> None:
    """A plugin operation of the QUEUING stage replaced a spooled version: the bundle carries the store's."""
    plugins = PluginSet([LoadedPlugin("edit", None, "test", (_QueuingHook(),))])
    with Device.open(pair.a) as dev:
        result = export_bundle(dev, pair.facility, pair.usb, plugins=plugins)
        assert result.path is not None
        store = sorted(line for batch in outgoing_lines(dev.conn, dev.profile, result.filter, result.basis, {})
                       for line in batch)
    sent = _record_lines(result.path, pair.a)
    assert [line for line in sent if b"edited while queuing" in line]
    assert sent == store


def test_a_row_whose_primary_key_is_a_blob_is_held_back_not_sent_under_a_made_up_id(pair: Pair) -> None:
    conn = sqlite3.connect(pair.a_db, isolation_level=None)
    cursor = conn.execute("SELECT * FROM kolibriauth_facilityuser LIMIT 1")
    columns = [d[0] for d in cursor.description]
    values = list(cursor.fetchone())
    values[columns.index("id")], values[columns.index("username")] = b"abc", "blobby"
    conn.execute(f"INSERT INTO kolibriauth_facilityuser ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                 values)
    conn.close()
    out = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb))
    assert "held back" in out.err or "held back" in out.out
    sent = _record_lines(Path(out.last_line), pair.a)
    assert len(sent) > 200 and not [line for line in sent if b"blobby" in line or b"b'abc'" in line]
    status = run_cli(pair.a, "status")
    assert "is a BLOB (bytes 616263)" in status.out, status.out
