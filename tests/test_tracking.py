"""Change tracking: every way any SQLite client can write a row is seen; imports are not."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from pathlib import Path

from conftest import PROFILE, make_db, store_rows

from bundlesync.replica.db import q, write_transaction
from bundlesync.device import Device, init_device
from bundlesync.profile import TableSpec
from bundlesync.replica.store import serialize_changes
from bundlesync.replica.tracking import (
    PRIOR_ID,
    expected_triggers,
    install_table_triggers,
    installed_triggers,
    prior_table,
    suppressed,
)


def _device(tmp_path: Path) -> tuple[Device, Path]:
    db = tmp_path / "a.sqlite3"
    make_db(db, users=4, logs=20, seed=2)
    init_device(tmp_path / "home", db, PROFILE)
    dev = Device.open(tmp_path / "home")
    with write_transaction(dev.conn):
        serialize_changes(dev.conn, dev.profile)
    return dev, db


def _versions(dev: Device) -> dict[str, tuple[int, str]]:
    with write_transaction(dev.conn):
        serialize_changes(dev.conn, dev.profile)
    return {r["id"]: (r["deleted"], r["data"]) for r in store_rows(dev.conn, "model = 'kolibriauth_facilityuser'")}


def _sql(db: Path, statement: str, params: tuple[object, ...] = ()) -> None:
    conn = sqlite3.connect(db)
    conn.execute(statement, params)
    conn.commit()
    conn.close()


def test_init_is_idempotent_and_queues_existing_rows_once(tmp_path: Path) -> None:
    db = tmp_path / "a.sqlite3"
    make_db(db, users=4, logs=20, seed=2)
    _, newly, created = init_device(tmp_path / "h", db, PROFILE)
    assert created and len(newly) == 15
    conn = sqlite3.connect(db)
    queued = conn.execute("SELECT count(*) FROM bundlesync_changes").fetchone()[0]
    triggers = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'trigger'").fetchone()[0]
    _, newly, created = init_device(tmp_path / "h", db, PROFILE)
    assert not created and newly == []
    assert conn.execute("SELECT count(*) FROM bundlesync_changes").fetchone()[0] == queued
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'trigger'").fetchone()[0] == triggers


def test_every_write_path_is_tracked(tmp_path: Path) -> None:
    dev, db = _device(tmp_path)
    before = _versions(dev)
    victim, other = sorted(before)[:2]
    username = sqlite3.connect(db).execute(
        "SELECT username FROM kolibriauth_facilityuser WHERE id = ?", (victim,)).fetchone()[0]
    # REPLACE that collides on UNIQUE(username, facility_id): SQLite removes the old row without a DELETE trigger.
    _sql(db, "INSERT OR REPLACE INTO kolibriauth_facilityuser SELECT 'ffffffffffffffffffffffffffffffff', username, "
             "full_name, password, date_joined, last_login, birth_year, gender, id_number, facility_id, extra_fields, "
             "dataset_id FROM kolibriauth_facilityuser WHERE id = ?", (victim,))
    after = _versions(dev)
    assert after[victim][0] == 1 and after["f" * 32][0] == 0
    # UPSERT, and an UPDATE that changes the primary key.
    _sql(db, "INSERT INTO kolibriauth_facilityuser SELECT * FROM kolibriauth_facilityuser WHERE id = ? "
             "ON CONFLICT (id) DO UPDATE SET full_name = 'upserted'", (other,))
    _sql(db, "UPDATE kolibriauth_facilityuser SET id = 'eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee' WHERE id = ?", ("f" * 32,))
    after = _versions(dev)
    assert '"full_name":"upserted"' in after[other][1]
    assert after["f" * 32][0] == 1 and after["e" * 32][0] == 0 and username in after["e" * 32][1]
    # An update that changes nothing makes no new version.
    counter = dev.conn.execute("SELECT ctr FROM bundlesync_store WHERE id = ?", (other,)).fetchone()[0]
    _sql(db, "UPDATE kolibriauth_facilityuser SET full_name = full_name WHERE id = ?", (other,))
    _versions(dev)
    assert dev.conn.execute("SELECT ctr FROM bundlesync_store WHERE id = ?", (other,)).fetchone()[0] == counter


def test_numeric_looking_text_keeps_its_type_in_the_prior_copy_a_deletion_carries(tmp_path: Path) -> None:
    """The prior table holds values as the app had them: text like "0012" or "1.50" stays text, not a number."""
    dev, db = _device(tmp_path)
    uid = sorted(_versions(dev))[0]
    _sql(db, "UPDATE kolibriauth_facilityuser SET birth_year = '0012', id_number = '1.50', gender = '7' WHERE id = ?",
         (uid,))
    _versions(dev)
    raw = dev.conn.execute("SELECT v.data FROM bundlesync_versions v JOIN bundlesync_models m ON m.n = v.model "
                           "WHERE m.name = 'kolibriauth_facilityuser' AND v.id = ?", (uid,)).fetchone()
    assert raw == (None,)  # the store leaves the data to the app row, so the deletion needs the prior copy
    _sql(db, "DELETE FROM kolibriauth_facilityuser WHERE id = ?", (uid,))
    deleted, data = _versions(dev)[uid]
    row = json.loads(data)
    assert deleted == 1
    assert (row["birth_year"], row["id_number"], row["gender"]) == ("0012", "1.50", "7")


def test_reinstalled_triggers_keep_prior_rows_and_new_columns_remake_the_prior_table(tmp_path: Path) -> None:
    """A trigger repair keeps the rows the prior table holds; a changed column set makes the table again."""
    dev, db = _device(tmp_path)
    table = next(t for t in dev.profile.tables if t.name == "kolibriauth_facilityuser")
    prior = q(prior_table(table))
    uid = sorted(_versions(dev))[0]
    _sql(db, "UPDATE kolibriauth_facilityuser SET gender = 'x' WHERE id = ?", (uid,))
    kept = dev.conn.execute(f"SELECT * FROM {prior}").fetchall()
    assert [row[0] for row in kept] == [uid]
    with write_transaction(dev.conn):
        install_table_triggers(dev.conn, table)
    assert dev.conn.execute(f"SELECT * FROM {prior}").fetchall() == kept
    narrower = dataclasses.replace(table, columns=table.columns[:-1])
    with write_transaction(dev.conn):
        install_table_triggers(dev.conn, narrower)
    assert [r[1] for r in dev.conn.execute(f"PRAGMA table_info({prior})")] == [PRIOR_ID, *table.columns[:-1]]
    assert dev.conn.execute(f"SELECT count(*) FROM {prior}").fetchone()[0] == 0


def test_floats_blobs_and_non_finite_values_round_trip(tmp_path: Path) -> None:
    from bundlesync.format.records import decode_data, encode_data

    values = [0.1 + 0.2, 1e-310, -0.0, float("inf"), b"\x00\xff", "é\t\"x\"", None, 2**62]
    text = encode_data([str(i) for i in range(len(values))], values)
    assert list(decode_data(text).values()) == values


# --------------------------------------------------------------------------- the triggers themselves


def _scratch(conn: sqlite3.Connection, name: str) -> TableSpec:
    """A bare table with bundlesync's own tables beside it, and the spec tracking needs of it."""
    conn.executescript("CREATE TABLE bundlesync_changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, "
                       "pk TEXT NOT NULL, at_ms INTEGER NOT NULL, UNIQUE (model, pk));"
                       "CREATE TABLE bundlesync_applying (since TEXT NOT NULL);"
                       # What the triggers read to decide whether to keep a prior row (the store's shape, in brief).
                       "CREATE TABLE bundlesync_models (n INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);"
                       "CREATE TABLE bundlesync_versions (model INTEGER NOT NULL, id TEXT NOT NULL, data TEXT, "
                       "UNIQUE (model, id));")
    t = '"' + name.replace('"', '""') + '"'
    conn.executescript(f"CREATE TABLE {t} (id TEXT PRIMARY KEY, code TEXT, site TEXT, note TEXT, gone INTEGER);"
                       f"CREATE UNIQUE INDEX code_site ON {t} (code, site);"
                       f"CREATE UNIQUE INDEX note_live ON {t} (note) WHERE gone IS NULL;"
                       f"CREATE INDEX plain_site ON {t} (site);"
                       f"CREATE UNIQUE INDEX by_id ON {t} (id);")
    return TableSpec(name=name, primary_key="id", partitions=("${dataset_id}",), dataset_column="site",
                     foreign_keys={}, self_reference=None, exclude=frozenset())


def _logged(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    return conn.execute("SELECT model, pk FROM bundlesync_changes ORDER BY seq").fetchall()


def test_expected_triggers_follow_the_tables_plain_unique_indexes_only() -> None:
    conn = sqlite3.connect(":memory:")
    table = _scratch(conn, "app_thing")
    names = set(expected_triggers(conn, table))
    # Insert, update, delete, and a displacement trigger per event for the one plain multi-column
    # UNIQUE index; none for the partial index, the plain index or a unique index on the key alone.
    assert names == {"bundlesync_app_thing_ins", "bundlesync_app_thing_upd", "bundlesync_app_thing_del",
                     "bundlesync_app_thing_ins_code_site", "bundlesync_app_thing_upd_code_site"}
    with write_transaction(conn):
        install_table_triggers(conn, table)
    installed = installed_triggers(conn)
    assert set(installed) == names and {tbl for tbl, _ in installed.values()} == {"app_thing"}
    assert {n: sql for n, (_, sql) in installed.items()} == expected_triggers(conn, table)
    # Installing again replaces rather than duplicates; an app trigger is never taken for one of ours.
    conn.execute("CREATE TRIGGER bundlesyncish AFTER INSERT ON app_thing BEGIN SELECT 1; END")
    with write_transaction(conn):
        install_table_triggers(conn, table)
    assert set(installed_triggers(conn)) == names


def test_triggers_log_every_write_with_its_time_and_stay_silent_while_suppressed() -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    table = _scratch(conn, "it's")
    conn.execute("BEGIN")
    install_table_triggers(conn, table)
    conn.execute("COMMIT")
    t = "\"it's\""
    conn.execute(f"INSERT INTO {t} (id, code, site) VALUES ('a', 'x', 's1'), ('b', 'y', 's1')")
    assert _logged(conn) == [("it's", "a"), ("it's", "b")]
    first_ms = conn.execute("SELECT at_ms FROM bundlesync_changes WHERE pk = 'a'").fetchone()[0]
    time.sleep(0.005)
    conn.execute(f"UPDATE {t} SET note = 'n' WHERE id = 'a'")
    again_ms = conn.execute("SELECT at_ms FROM bundlesync_changes WHERE pk = 'a'").fetchone()[0]
    assert again_ms > first_ms and abs(again_ms - time.time() * 1000) < 5_000
    conn.execute("DELETE FROM bundlesync_changes")
    # OR REPLACE colliding on (code, site) removes 'b' without a DELETE trigger: logged before the write.
    conn.execute(f"INSERT OR REPLACE INTO {t} (id, code, site) VALUES ('c', 'y', 's1')")
    assert sorted(_logged(conn)) == [("it's", "b"), ("it's", "c")]
    conn.execute("DELETE FROM bundlesync_changes")
    conn.execute(f"UPDATE {t} SET id = 'd' WHERE id = 'c'")
    conn.execute(f"DELETE FROM {t} WHERE id = 'a'")
    assert sorted(_logged(conn)) == [("it's", "a"), ("it's", "c"), ("it's", "d")]
    conn.execute("DELETE FROM bundlesync_changes")
    conn.execute("BEGIN")
    with suppressed(conn):
        conn.execute(f"INSERT INTO {t} (id, code, site) VALUES ('e', 'z', 's2')")
        conn.execute(f"UPDATE {t} SET note = 'quiet' WHERE id = 'd'")
    conn.execute(f"INSERT INTO {t} (id, code, site) VALUES ('f', 'w', 's2')")  # after the block: tracked again
    conn.execute("COMMIT")
    assert _logged(conn) == [("it's", "f")]
    assert conn.execute("SELECT count(*) FROM bundlesync_applying").fetchone()[0] == 0
    # Leaving the block outside a transaction (its work rolled back) does not fail.
    conn.execute("BEGIN")
    with suppressed(conn):
        conn.execute("ROLLBACK")
    assert conn.execute("SELECT count(*) FROM bundlesync_applying").fetchone()[0] == 0
