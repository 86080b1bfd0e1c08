"""Invariant 4 and single-user devices: scope decides what is sent and what is applied."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from conftest import PROFILE, make_db, run_cli, store_rows

from bundlesync.format import container as container
from bundlesync.device import Device
from bundlesync.errors import EXIT_PARTIAL
from bundlesync.trust.keystore import KeyStore


def _tablet(tmp_path: Path) -> tuple[str, Path, Path, Path, Path, Path, str]:
    """A full authority A and a single-user tablet T for the busiest learner."""
    a_db, t_db, usb = tmp_path / "a.sqlite3", tmp_path / "t.sqlite3", tmp_path / "usb"
    usb.mkdir()
    facility = make_db(a_db, users=6, logs=120, seed=4)
    make_db(t_db, schema_only=True)
    a, t = tmp_path / "devA", tmp_path / "devT"
    run_cli(a, "init", "--db", str(a_db), "--profile", str(PROFILE))
    run_cli(a, "facility", "provision", "--facility", facility)
    run_cli(t, "init", "--db", str(t_db), "--profile", str(PROFILE))
    conn = sqlite3.connect(a_db)
    user = conn.execute("SELECT user_id FROM logger_contentsessionlog WHERE user_id IS NOT NULL GROUP BY user_id "
                        "ORDER BY count(*) DESC LIMIT 1").fetchone()[0]
    conn.close()
    request = run_cli(t, "cert", "request", "--facility", facility, "--scope", f"user:{user}", "--out", str(usb)).last_line
    run_cli(t, "cert", "install", run_cli(a, "cert", "issue", request, "--out", str(usb)).last_line)
    return facility, a_db, t_db, a, t, usb, user


def test_single_user_device_gets_its_scope_and_sends_back_its_own(tmp_path: Path) -> None:
    facility, a_db, t_db, a, t, usb, user = _tablet(tmp_path)
    bundle = run_cli(a, "export", "--facility", facility, "--out", str(usb), "--user", user, "--no-encrypt").last_line
    run_cli(t, "import", bundle)
    tc = sqlite3.connect(t_db)
    assert tc.execute("SELECT count(DISTINCT user_id) FROM logger_contentsessionlog").fetchone()[0] == 1
    assert tc.execute("SELECT count(*) FROM kolibriauth_facilityuser").fetchone()[0] == 1
    assert tc.execute("SELECT count(*) FROM kolibriauth_collection").fetchone()[0] > 0  # allusers-ro
    assert tc.execute("SELECT count(*) FROM lessons_lesson").fetchone()[0] == 0  # bare-dataset partition
    tc.execute("UPDATE logger_contentsessionlog SET progress = 1.0 WHERE user_id = ?", (user,))
    tc.execute("UPDATE kolibriauth_collection SET name = 'renamed on tablet'")  # read-only for the tablet
    tc.commit()
    back = run_cli(t, "export", "--facility", facility, "--out", str(usb), "--json", "--no-encrypt")
    summary = json.loads(back.out)
    assert summary["counts"] and all(m.startswith("logger_") for m in summary["counts"])  # only what it may write
    run_cli(a, "import", summary["path"])
    ac = sqlite3.connect(a_db)
    assert ac.execute("SELECT min(progress) FROM logger_contentsessionlog WHERE user_id = ?", (user,)).fetchone()[0] == 1.0
    assert ac.execute("SELECT count(*) FROM kolibriauth_collection WHERE name = 'renamed on tablet'").fetchone()[0] == 0


def test_out_of_scope_records_are_refused_and_the_rest_applies(tmp_path: Path) -> None:
    facility, a_db, t_db, a, t, usb, user = _tablet(tmp_path)
    run_cli(t, "import", run_cli(a, "export", "--facility", facility, "--out", str(usb), "--user", user, "--no-encrypt").last_line)
    tc = sqlite3.connect(t_db)
    tc.execute("UPDATE logger_contentsessionlog SET progress = 0.5 WHERE user_id = ?", (user,))
    tc.execute("UPDATE kolibriauth_collection SET name = 'forged by tablet'")
    tc.commit()
    tc.close()
    # A tampered tablet build signs a bundle that also carries the read-only collection rows.
    honest = json.loads(run_cli(t, "export", "--facility", facility, "--out", str(usb), "--json", "--no-encrypt").out)["path"]
    info = container.read_info(Path(honest))
    with Device.open(t) as dev:
        with dev.conn:
            from bundlesync.replica.store import serialize_changes
            serialize_changes(dev.conn, dev.profile)
        data = {r["id"]: r["data"] for r in store_rows(dev.conn, "model = 'kolibriauth_collection'")}
        forged_lines = [
            row[0] + b"\t" + data[row[1]].encode() + b"\n" for row in dev.conn.execute(
                "SELECT CAST(json_object('m', model, 'id', id, 'p', partition, 'h', hlc, 'i', inst, 'c', ctr, "
                "'v', json(vv), 'f', deleted + 2 * purged) AS BLOB), id "
                "FROM bundlesync_store WHERE model = 'kolibriauth_collection' AND inst = ?", (dev.instance_id,))
        ]
    assert forged_lines
    key = KeyStore(t).ensure_device_key()
    manifest = dict(info.manifest)
    manifest["bundle_id"] = "f" * 32
    out = tmp_path / "forged"
    out.mkdir()
    with container.BundleWriter(out, "bundle-forged.bsync", manifest, lambda d: key.sign("bundle", d)) as writer:
        writer.write_records(list(container.iter_records(info)) + forged_lines)
        forged = writer.finish({"counts": {}})
    res = run_cli(a, "import", str(forged), check=False)
    assert res.code == EXIT_PARTIAL and res.err.strip().splitlines()[-1].startswith("incomplete: ")
    assert f"refused {len(forged_lines)} record(s) outside the signer's scope" in res.err
    ac = sqlite3.connect(a_db)
    assert ac.execute("SELECT count(*) FROM kolibriauth_collection WHERE name = 'forged by tablet'").fetchone()[0] == 0
    assert ac.execute("SELECT min(progress) FROM logger_contentsessionlog WHERE user_id = ?", (user,)).fetchone()[0] == 0.5
