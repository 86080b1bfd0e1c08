"""Import options and failure exits that other tests do not run: several bundles in one run,
``--no-receipt``, ``--json`` reports, and the exit codes 1 (other) and 7 (sync could not complete)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from conftest import ROOT, Pair, dump_tables, run_cli, state


def _edit(db: Path, name: str) -> None:
    conn = sqlite3.connect(db)
    conn.execute("UPDATE kolibriauth_facilityuser SET full_name = ? WHERE id = (SELECT min(id) FROM "
                 "kolibriauth_facilityuser)", (name,))
    conn.commit()
    conn.close()


def _export(pair: Pair, out: Path) -> Path:
    out.mkdir(exist_ok=True)
    path = Path(run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(out), "--no-encrypt").last_line)
    assert path.is_file()
    return path


def _import_json(home: Path, *args: str) -> list[dict[str, Any]]:
    res = run_cli(home, "import", "--json", *args)
    assert res.err == "", res  # --json: the report is the whole output
    reports: list[dict[str, Any]] = json.loads(res.out)
    return reports


def test_several_bundles_in_one_import_apply_in_the_order_given(pair: Pair) -> None:
    first = _export(pair, pair.tmp / "d1")
    _edit(pair.a_db, "second")
    second = _export(pair, pair.tmp / "d2")
    # Newest first: the first report shows the gap, the second fills it, and nothing is left missing.
    reports = _import_json(pair.b, str(second), str(first), "--no-receipt")
    assert [r["path"] for r in reports] == [str(second), str(first)]
    assert reports[0]["gaps"] and not reports[1]["gaps"]
    assert [r["already_imported"] for r in reports] == [False, False]
    # The older bundle's version of the edited row is already superseded; the rest is new.
    assert reports[1]["outcomes"]["already"] == 1
    assert reports[1]["outcomes"]["new"] == reports[1]["received"] - 1 > 0
    assert all(r["receipt"] is None for r in reports)
    assert not list((pair.tmp / "d1").glob("receipt-*")) and not list((pair.tmp / "d2").glob("receipt-*"))
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)
    assert json.loads(run_cli(pair.b, "status", "--json").out)["facilities"][0]["gaps"] == []
    # The same two again, plus one: the known ones change nothing, and a receipt is left this time.
    _edit(pair.a_db, "third")
    third = _export(pair, pair.tmp / "d3")
    before = state(pair.b_db)
    again = _import_json(pair.b, str(first), str(second))
    assert [r["already_imported"] for r in again] == [True, True]
    assert state(pair.b_db) == before
    [last] = _import_json(pair.b, str(third))
    assert last["outcomes"]["fast_forward"] == 1 and last["receipt"] == str(next((pair.tmp / "d3").glob("receipt-*")))
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)


def test_plain_import_reports_each_bundle_on_one_line(pair: Pair) -> None:
    first = _export(pair, pair.tmp / "d1")
    res = run_cli(pair.b, "import", str(first), str(first), "--no-receipt")
    lines = res.err.splitlines()
    assert lines[0].startswith(f"{first}: ") and " new, " in lines[0]
    assert lines[1].startswith(f"{first}: already imported") and lines[1].endswith("nothing changed")
    assert res.out == "" and not list(first.parent.glob("receipt-*"))


def _refused(pair: Pair, bundle: Path, code: int) -> str:
    before_state, before_tables = state(pair.b_db), dump_tables(pair.b_db)
    res = run_cli(pair.b, "import", str(bundle), check=False)
    assert res.code == code, res
    assert res.out == "" and "Traceback" not in res.err
    [line] = res.err.splitlines()
    assert line.startswith("error: ")
    assert state(pair.b_db) == before_state and dump_tables(pair.b_db) == before_tables
    assert not list(bundle.parent.glob("receipt-*"))
    return line


def test_exit_1_when_the_home_is_unusable_for_an_unforeseen_reason(pair: Pair) -> None:
    """The staging folder is a file: an OS error no specific check anticipates -> exit 1, one line."""
    bundle = _export(pair, pair.tmp / "d1")
    staging = pair.b / "staging"
    if staging.is_dir():
        shutil.rmtree(staging)
    staging.write_text("not a folder\n")
    line = _refused(pair, bundle, 1)
    assert "staging" in line and "check" in line


def test_exit_8_when_the_import_cannot_stage_its_copy(pair: Pair) -> None:
    """The private copy cannot be written (a file-size limit here): an environment problem -> exit 8."""
    bundle = _export(pair, pair.tmp / "d1")
    before_state, before_tables = state(pair.b_db), dump_tables(pair.b_db)

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    env = {k: v for k, v in os.environ.items() if k != "BUNDLESYNC_HOME"}
    proc = subprocess.run([sys.executable, "-m", "bundlesync", "--home", str(pair.b), "import", str(bundle)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, preexec_fn=small_files)
    assert proc.returncode == 8, (proc.returncode, proc.stderr)
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: ") and "cannot write" in line and "Traceback" not in proc.stderr
    assert state(pair.b_db) == before_state and dump_tables(pair.b_db) == before_tables
