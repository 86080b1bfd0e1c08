"""Quiet runs print nothing; every export and import leaves one line in the home's rotating log."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from bundlesync import runlog
from conftest import Pair, run_cli

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")


def test_quiet_export_and_import_print_nothing(pair: Pair) -> None:
    res = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), "--quiet")
    assert (res.code, res.out, res.err) == (0, "", "")
    bundles = list(pair.usb.glob("bundle-*.bsync"))
    assert len(bundles) == 1
    res = run_cli(pair.b, "import", str(bundles[0]), "-q")
    assert (res.code, res.out, res.err) == (0, "", "")
    # Without --quiet the path stays the last stdout line (public contract).
    conn = sqlite3.connect(pair.a_db)
    conn.execute("UPDATE kolibriauth_facilityuser SET full_name = 'x' WHERE rowid = 1")
    conn.commit()
    conn.close()
    loud = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb))
    assert Path(loud.last_line).is_file() and "exported" in loud.err


def test_every_export_and_import_appends_one_timestamped_line(pair: Pair) -> None:
    bundle = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb)).last_line
    run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), "-q")  # nothing new
    run_cli(pair.b, "import", bundle, "-q")
    failed = run_cli(pair.b, "import", str(pair.usb / "no-such.bsync"), check=False)
    assert failed.code != 0
    a_lines = runlog.read(pair.a)
    b_lines = runlog.read(pair.b)
    assert len(a_lines) == 2 and len(b_lines) == 2, (a_lines, b_lines)
    assert all(STAMP.match(line) for line in a_lines + b_lines)
    assert "export" in a_lines[0] and bundle in a_lines[0] and "records" in a_lines[0]
    assert "nothing new" in a_lines[1]
    assert "import" in b_lines[0] and "records" in b_lines[0]
    assert f"import failed (exit {failed.code})" in b_lines[1]
    shown = run_cli(pair.b, "log")
    assert shown.out.splitlines() == b_lines
    assert run_cli(pair.b, "log", "-n", "1").out.splitlines() == b_lines[-1:]


def test_log_is_size_bounded(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("{}")  # an initialised home
    for i in range(2000):
        assert runlog.append(tmp_path, f"export line {i} " + "x" * 100, max_bytes=20_000, backups=2)
    files = sorted(p.name for p in tmp_path.iterdir() if p.name != "config.yaml")
    assert files == ["bundlesync.log", "bundlesync.log.1", "bundlesync.log.2"]
    assert all((tmp_path / f).stat().st_size <= 20_000 for f in files)
    kept = runlog.read(tmp_path, backups=2)
    assert kept[-1].endswith("export line 1999 " + "x" * 100)
    numbers = [int(line.split()[3]) for line in kept]
    assert numbers == sorted(numbers)  # oldest first across the rotated files


def test_unwritable_log_does_not_fail_the_run(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("{}")
    (tmp_path / runlog.LOG_NAME).mkdir()  # cannot be opened as a file
    assert runlog.append(tmp_path, "x") is False
