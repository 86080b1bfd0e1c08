"""Steady state through the CLI: no export re-sends what its reader holds; imports tell the truth.

Each case runs ``python -m bundlesync`` as a subprocess on real SQLite files: a learner device
that keeps re-exporting what it received, an authority that keeps re-carrying a learner's
records, the first export back after an import, a single-user bundle read by a fresh device,
and the exit codes and ``--json`` report of imports that did not deliver everything.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

from conftest import PROFILE, Pair, dump_tables, make_db, run_cli

from bundlesync.errors import EXIT_PARTIAL

LEARNER_TABLES = ("kolibriauth_facilityuser", "logger_contentsessionlog", "logger_contentsummarylog")


def _busiest_user(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("SELECT user_id FROM logger_contentsessionlog WHERE user_id IS NOT NULL "
                                "GROUP BY user_id ORDER BY count(*) DESC, user_id LIMIT 1").fetchone()[0])
    finally:
        conn.close()


def _learner(pair: Pair, name: str, user: str) -> tuple[Path, Path]:
    """A fresh device with a single-user certificate for ``user``, issued by A."""
    db, home = pair.tmp / f"{name}.sqlite3", pair.tmp / f"dev{name}"
    make_db(db, schema_only=True)
    run_cli(home, "init", "--db", str(db), "--profile", str(PROFILE))
    certs = pair.tmp / f"certs-{name}"
    certs.mkdir()
    request = run_cli(home, "cert", "request", "--facility", pair.facility, "--scope", f"user:{user}",
                      "--out", str(certs)).last_line
    run_cli(home, "cert", "install", run_cli(pair.a, "cert", "issue", request, "--out", str(certs)).last_line)
    return db, home


def _folder(pair: Pair, name: str) -> Path:
    path = pair.tmp / name
    path.mkdir()
    return path


def _export(home: Path, facility: str, out: Path, *extra: str) -> dict[str, object]:
    res = run_cli(home, "export", "--facility", facility, "--out", str(out), "--json", *extra)
    summary: dict[str, object] = json.loads(res.out)
    return summary


def _sql(db: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    conn = sqlite3.connect(db)
    for sql, params in statements:
        conn.execute(sql, params)
    conn.commit()
    conn.close()


def test_a_learner_device_falls_silent_after_its_import(pair: Pair) -> None:
    user = _busiest_user(pair.a_db)
    _, c = _learner(pair, "C", user)
    to_c = _export(pair.a, pair.facility, pair.usb, "--user", user)
    assert to_c["path"] is not None
    run_cli(c, "import", str(to_c["path"]))
    back = _folder(pair, "back")
    for _ in range(2):
        res = run_cli(c, "export", "--facility", pair.facility, "--out", str(back))
        assert res.out.strip() == "" and "nothing new" in res.err, res.err
        assert list(back.glob("*.bsync")) == []


def test_the_authority_does_not_re_carry_a_learners_records(pair: Pair) -> None:
    user = _busiest_user(pair.a_db)
    c_db, c = _learner(pair, "C", user)
    run_cli(c, "import", str(_export(pair.a, pair.facility, pair.usb, "--user", user)["path"]))
    _sql(c_db,
         ("UPDATE logger_contentsessionlog SET progress = 0.5 WHERE user_id = ?", (user,)),
         ("INSERT INTO logger_contentsessionlog SELECT 'a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0', NULL, content_id, "
          "channel_id, start_timestamp, end_timestamp, 1.0, 1.0, kind, extra_fields, dataset_id "
          "FROM logger_contentsessionlog LIMIT 1", ()))
    from_c = _export(c, pair.facility, _folder(pair, "c2a"))
    run_cli(pair.a, "import", str(from_c["path"]))
    to_b = _folder(pair, "a2b")
    first = _export(pair.a, pair.facility, to_b)
    run_cli(pair.b, "import", str(first["path"]))
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)
    for folder in (to_b, _folder(pair, "elsewhere")):
        again = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(folder))
        assert again.out.strip() == "" and "nothing new" in again.err, again.err


def test_the_first_export_back_carries_only_what_changed(pair: Pair) -> None:
    bundle = _export(pair.a, pair.facility, pair.usb)
    run_cli(pair.b, "import", str(bundle["path"]))
    _sql(pair.b_db,
         ("UPDATE logger_contentsessionlog SET progress = 0.125 WHERE id IN "
          "(SELECT id FROM logger_contentsessionlog ORDER BY id LIMIT 5)", ()),
         ("UPDATE kolibriauth_facilityuser SET full_name = 'Edited on B' WHERE id IN "
          "(SELECT id FROM kolibriauth_facilityuser ORDER BY id LIMIT 2)", ()))
    back = run_cli(pair.b, "export", "--facility", pair.facility, "--out", str(_folder(pair, "back")), "--json")
    summary = json.loads(back.out)
    assert summary["records"] == 7, summary
    a_inst = json.loads(run_cli(pair.a, "status", "--json").out)["instance_id"]
    assert summary["basis_source"] == f"what {a_inst[:8]} held in bundle {str(bundle['bundle_id'])[:8]}"
    human = run_cli(pair.b, "export", "--facility", pair.facility, "--out", str(_folder(pair, "again")), "--full")
    assert "basis: full" in human.err
    run_cli(pair.a, "import", str(summary["path"]))
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)


def test_a_single_user_bundle_is_complete_for_a_fresh_learner(pair: Pair) -> None:
    user = _busiest_user(pair.a_db)
    first = _export(pair.a, pair.facility, pair.usb)
    run_cli(pair.b, "import", str(first["path"]))  # leaves B's (full-facility) receipt on the drive
    assert list(pair.usb.glob("receipt-*.json"))
    c_db, c = _learner(pair, "C", user)
    single = _export(pair.a, pair.facility, pair.usb, "--user", user)
    res = run_cli(c, "import", str(single["path"]), "--json")
    report = json.loads(res.out)[0]
    assert res.code == 0 and report["waiting"] == 0 and report["gaps"] == {}, report
    assert report["written"] == report["received"] > 3
    conn = sqlite3.connect(c_db)
    assert conn.execute("SELECT count(*) FROM logger_contentsessionlog WHERE user_id = ?", (user,)).fetchone()[0] > 0
    conn.close()


def _three_bundles(pair: Pair) -> tuple[Path, Path, Path]:
    """A's first bundle, a rename, and a child whose parent (a new user) is in the second."""
    b1 = Path(str(_export(pair.a, pair.facility, _folder(pair, "x1"))["path"]))
    _sql(pair.a_db, ("INSERT INTO kolibriauth_facilityuser (id, username, full_name, password, date_joined, "
                     "birth_year, gender, id_number, facility_id, dataset_id, extra_fields) SELECT "
                     "'abcdabcdabcdabcdabcdabcdabcdabcd', 'newbie', 'New Learner', password, date_joined, birth_year, "
                     "gender, id_number, facility_id, dataset_id, extra_fields FROM kolibriauth_facilityuser LIMIT 1",
                     ()))
    b2 = Path(str(_export(pair.a, pair.facility, _folder(pair, "x2"))["path"]))
    _sql(pair.a_db, ("INSERT INTO logger_contentsessionlog SELECT 'feedfeedfeedfeedfeedfeedfeedfeed', "
                     "'abcdabcdabcdabcdabcdabcdabcdabcd', content_id, channel_id, start_timestamp, end_timestamp, "
                     "time_spent, progress, kind, extra_fields, dataset_id FROM logger_contentsessionlog LIMIT 1", ()))
    b3 = Path(str(_export(pair.a, pair.facility, _folder(pair, "x3"))["path"]))
    return b1, b2, b3


def test_a_partial_import_exits_9_with_what_to_do(pair: Pair) -> None:
    b1, b2, b3 = _three_bundles(pair)
    run_cli(pair.b, "import", str(b1))
    res = run_cli(pair.b, "import", str(b3), "--json", check=False)
    assert res.code == EXIT_PARTIAL, res
    report = json.loads(res.out)
    assert len(report) == 1 and report[0]["waiting"] == 1 and report[0]["complete"] is False
    assert list(report[0]["gaps"]) and report[0]["exit_code"] == EXIT_PARTIAL
    human = run_cli(pair.b, "import", str(b3), check=False)
    assert human.code == 0 and "already imported" in human.err  # nothing new happened, but rows still wait
    done = run_cli(pair.b, "import", str(b2), check=False)
    assert done.code == 0, done.err
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)
    status = json.loads(run_cli(pair.b, "status", "--json").out)
    assert status["waiting_records"] == [] and status["facilities"][0]["gaps"] == []


def test_the_partial_summary_line_says_what_to_do(pair: Pair) -> None:
    b1, _, b3 = _three_bundles(pair)
    run_cli(pair.b, "import", str(b1))
    res = run_cli(pair.b, "import", str(b3), check=False)
    assert res.code == EXIT_PARTIAL
    last = res.err.strip().splitlines()[-1]
    assert last.startswith("incomplete:") and "import" in last and "status" in last, res.err


def test_import_of_several_goes_on_past_a_bad_one_and_exits_with_the_worst(pair: Pair) -> None:
    b1, b2, b3 = _three_bundles(pair)
    bad = pair.tmp / "bad.bsync"
    bad.write_bytes(b1.read_bytes()[:-40])
    res = run_cli(pair.b, "import", str(b1), str(bad), str(b2), str(b3), "--json", check=False)
    assert res.code == 4, res.err
    report = json.loads(res.out)
    assert [r["path"] for r in report] == [str(b1), str(bad), str(b2), str(b3)]
    assert report[1]["exit_code"] == 4 and report[1]["error"].startswith("error: ")
    assert [r["exit_code"] for r in (report[0], report[2], report[3])] == [0, 0, 0]
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)
    human = run_cli(pair.b, "import", str(bad), str(b1), check=False)
    assert human.code == 4 and "error:" in human.err and "already imported" in human.err


def test_import_of_a_folder_orders_bundles_to_avoid_waits(pair: Pair) -> None:
    bundles = _three_bundles(pair)
    drop = _folder(pair, "drop")
    for name, bundle in zip(("c", "a", "b"), reversed(bundles)):  # names sort against the export order
        shutil.copy2(bundle, drop / f"{name}.bsync")
    (drop / "half.bsync.partial").write_bytes(b"ignored")
    res = run_cli(pair.b, "import", str(drop), "--json", check=False)
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert [Path(r["path"]).name for r in report] == ["b.bsync", "a.bsync", "c.bsync"]
    assert all(r["waiting"] == 0 and r["gaps"] == {} for r in report)
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)


def test_importing_an_own_bundle_says_so_and_leaves_no_receipt(pair: Pair) -> None:
    out = _folder(pair, "own")
    bundle = _export(pair.a, pair.facility, out)
    res = run_cli(pair.a, "import", str(bundle["path"]), check=False)
    assert res.code == 0 and "this device wrote it" in res.err, res.err
    assert list(out.glob("receipt-*.json")) == []
    report = json.loads(run_cli(pair.a, "import", str(bundle["path"]), "--json").out)
    assert report[0]["own_bundle"] is True and report[0]["receipt"] is None
