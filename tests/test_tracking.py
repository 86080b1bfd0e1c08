"""Change tracking: every way any SQLite client can write a row is seen; imports are not."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from conftest import PROFILE, make_db, store_rows

from bundlesync.replica.db import write_transaction
from bundlesync.device import Device, init_device
from bundlesync.replica.store import serialize_changes


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


def test_floats_blobs_and_non_finite_values_round_trip(tmp_path: Path) -> None:
    from bundlesync.format.records import decode_data, encode_data

    values = [0.1 + 0.2, 1e-310, -0.0, float("inf"), b"\x00\xff", "é\t\"x\"", None, 2**62]
    text = encode_data([str(i) for i in range(len(values))], values)
    assert list(decode_data(text).values()) == values
