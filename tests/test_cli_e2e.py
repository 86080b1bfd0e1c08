"""The issue-2 scenario end to end, through the CLI as subprocesses, comparing every table."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from conftest import PROFILE, Pair, dump_tables, make_db, run_cli


def _export(home: Path, facility: str, usb: Path, *extra: str) -> str:
    res = run_cli(home, "export", "--facility", facility, "--out", str(usb), *extra)
    return res.last_line


def test_two_devices_converge_both_ways(pair: Pair) -> None:
    bundle = _export(pair.a, pair.facility, pair.usb)
    assert Path(bundle).is_file() and Path(bundle).parent == pair.usb
    assert Path(bundle).name.startswith("bundle-")
    run_cli(pair.b, "verify", bundle)
    run_cli(pair.b, "import", bundle)
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)

    again = run_cli(pair.b, "import", bundle)
    assert "already imported" in again.err
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)
    # Recognised as imported without being copied, the file is still checked: a damaged copy is refused.
    damaged = pair.usb / "damaged" / Path(bundle).name
    damaged.parent.mkdir()
    data = bytearray(Path(bundle).read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    refused = run_cli(pair.b, "import", str(damaged), check=False)
    assert refused.code == 4 and "already imported" not in refused.err, refused.err

    # Any SQLite client edits B: update, insert, delete.
    conn = sqlite3.connect(pair.b_db)
    conn.execute("UPDATE kolibriauth_facilityuser SET full_name = 'Zoë on B', birth_year = 2001 "
                 "WHERE id = (SELECT min(id) FROM kolibriauth_facilityuser)")
    conn.execute("DELETE FROM logger_attemptlog WHERE id IN (SELECT id FROM logger_attemptlog ORDER BY id LIMIT 3)")
    conn.execute("INSERT INTO kolibriauth_collection (id, name, kind, parent_id, dataset_id) "
                 "SELECT 'f00dfeedf00dfeedf00dfeedf00dfeed', 'New class', 'classroom', id, dataset_id "
                 "FROM kolibriauth_collection WHERE kind = 'facility'")
    conn.commit()
    conn.close()
    status = json.loads(run_cli(pair.b, "status", "--json").out)
    assert status["pending_changes"] == 5

    back = _export(pair.b, pair.facility, pair.usb)
    run_cli(pair.a, "import", back)
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)
    a_conn = sqlite3.connect(pair.a_db)
    assert a_conn.execute("SELECT count(*) FROM kolibriauth_facilityuser WHERE full_name = 'Zoë on B'").fetchone()[0] == 1
    assert a_conn.execute("SELECT count(*) FROM kolibriauth_collection WHERE name = 'New class'").fetchone()[0] == 1
    # Rows written by the import are not tracked as A's own changes.
    assert a_conn.execute("SELECT count(*) FROM bundlesync_changes").fetchone()[0] == 0
    a_conn.close()


def test_export_with_nothing_new_writes_no_file(pair: Pair) -> None:
    _export(pair.a, pair.facility, pair.usb)
    before = sorted(pair.usb.iterdir())
    res = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb))
    assert res.code == 0 and res.out.strip() == "" and "nothing new" in res.err
    assert sorted(pair.usb.iterdir()) == before


def test_inspect_status_and_help(pair: Pair) -> None:
    bundle = _export(pair.a, pair.facility, pair.usb, "--no-encrypt")  # per-table counts are in the clear only then
    doc = json.loads(run_cli(None, "inspect", bundle, "--json").out)
    manifest = doc["manifest"]
    assert manifest["facility_id"] == pair.facility
    assert manifest["profile"]["name"] == "facilitydata"
    assert doc["summary"]["records"] == sum(doc["summary"]["counts"].values()) > 200
    human = run_cli(None, "inspect", bundle).out
    assert manifest["bundle_id"] in human and "logger_attemptlog" in human
    run_cli(pair.b, "import", bundle)
    status = json.loads(run_cli(pair.b, "status", "--json").out)
    assert status["facilities"][0]["facility_id"] == pair.facility
    sender = manifest["sender"]["instance_id"]
    assert status["facilities"][0]["fsic"][sender] == manifest["sender"]["counter"]
    assert status["last_transfers"][0]["direction"] == "import"
    assert "facility" in run_cli(pair.b, "status").out
    for command in ["init", "export", "import", "verify", "inspect", "status", "cert", "facility"]:
        assert "Usage" in run_cli(None, command, "--help").out
    assert "0.1.0" in run_cli(None, "--version").out


def test_home_option_equals_environment(tmp_path: Path) -> None:
    db = tmp_path / "x.sqlite3"
    make_db(db, schema_only=True)
    run_cli(None, "--home", str(tmp_path / "h"), "init", "--db", str(db), "--profile", str(PROFILE))
    first = json.loads(run_cli(None, "--home", str(tmp_path / "h"), "status", "--json").out)
    second = json.loads(run_cli(tmp_path / "h", "status", "--json").out)
    assert first["instance_id"] == second["instance_id"]
    again = run_cli(tmp_path / "h", "init", "--db", str(db), "--profile", str(PROFILE))
    assert "already initialised" in again.err
    assert json.loads(run_cli(tmp_path / "h", "status", "--json").out)["instance_id"] == first["instance_id"]
