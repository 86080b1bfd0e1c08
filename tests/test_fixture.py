"""Tests for scripts/make_facility_db.py: deterministic, consistent, exactly sized fixture databases."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

__all__: list[str] = []

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_facility_db.py"
LOGGER_TABLES = ("logger_contentsessionlog", "logger_contentsummarylog", "logger_masterylog",
                 "logger_attemptlog", "logger_examlog", "logger_examattemptlog")


import make_facility_db as mfd  # noqa: E402 - on sys.path via conftest



def _make(path: Path, users: int = 30, logs: int = 3000, seed: int = 1) -> str:
    conn = sqlite3.connect(path)
    try:
        mfd.create_schema(conn)
        facility: str = mfd.populate(conn, users, logs, seed)
    finally:
        conn.close()
    return facility


def _dump(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def _count(conn: sqlite3.Connection, table: str) -> int:
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def test_same_seed_gives_identical_databases(tmp_path: Path) -> None:
    a, b = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"
    assert _make(a, seed=7) == _make(b, seed=7)
    assert _dump(a) == _dump(b)


def test_different_seeds_differ(tmp_path: Path) -> None:
    a, b = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"
    assert _make(a, seed=1) != _make(b, seed=2)
    assert _dump(a) != _dump(b)


@pytest.mark.parametrize(("users", "logs"), [(30, 3000), (1, 0), (1, 1), (2, 7), (16, 41), (100, 12345)])
def test_row_counts_follow_the_documented_formula(tmp_path: Path, users: int, logs: int) -> None:
    path = tmp_path / "f.sqlite3"
    _make(path, users=users, logs=logs)
    conn = sqlite3.connect(path)
    classrooms, staff = max(1, users // 15), max(1, users // 10)
    expected = {
        "kolibriauth_facilitydataset": 1, "kolibriauth_collection": 1 + 3 * classrooms,
        "kolibriauth_facilityuser": users, "kolibriauth_membership": 2 * (users - staff),
        "kolibriauth_role": staff, "lessons_lesson": 2 * classrooms, "lessons_lessonassignment": 2 * classrooms,
        "exams_exam": classrooms, "exams_examassignment": classrooms, **mfd.log_counts(logs),
    }
    assert {t: _count(conn, t) for t in mfd.TABLES} == expected
    assert sum(_count(conn, t) for t in LOGGER_TABLES) == logs
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.close()


def test_every_foreign_key_resolves_and_rows_are_varied(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite3"
    _make(path, users=60, logs=5000, seed=3)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    # The data exercises what a sync must carry: NULLs, non-ASCII text, full-precision floats.
    assert conn.execute("SELECT count(*) FROM logger_contentsessionlog WHERE user_id IS NULL").fetchone()[0] > 0
    assert conn.execute("SELECT count(*) FROM logger_attemptlog WHERE user_id IS NULL").fetchone()[0] > 0
    names = {r[0] for r in conn.execute("SELECT full_name FROM kolibriauth_facilityuser")}
    assert any(not n.isascii() for n in names)
    spent = [r[0] for r in conn.execute("SELECT time_spent FROM logger_contentsessionlog LIMIT 50")]
    assert all(isinstance(x, float) for x in spent) and len({repr(x) for x in spent}) == 50
    assert conn.execute("SELECT dataset_id = id FROM kolibriauth_facilitydataset").fetchone() == (1,)
    datasets = {r[0] for t in mfd.TABLES for r in conn.execute(f"SELECT DISTINCT dataset_id FROM {t}")}
    assert len(datasets) == 1
    conn.close()


def test_schema_only_has_every_table_and_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "empty.sqlite3"
    done = subprocess.run([sys.executable, str(SCRIPT), str(path), "--schema-only"],
                          capture_output=True, text=True, check=True)
    assert done.stdout == ""
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == set(mfd.TABLES) and len(mfd.TABLES) == 15
    assert all(_count(conn, t) == 0 for t in tables)
    conn.close()


def test_cli_prints_only_the_facility_id(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite3"
    done = subprocess.run([sys.executable, str(SCRIPT), str(path), "--users", "20", "--logs", "500",
                           "--seed", "5"], capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and done.stdout == lines[0] + "\n"
    conn = sqlite3.connect(path)
    facilities = conn.execute("SELECT id FROM kolibriauth_collection WHERE kind = 'facility'").fetchall()
    assert facilities == [(lines[0],)]
    assert sum(_count(conn, t) for t in LOGGER_TABLES) == 500
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    conn.close()
    # The CLI and the importable functions produce the same database.
    other = tmp_path / "g.sqlite3"
    assert _make(other, users=20, logs=500, seed=5) == lines[0]
    assert _dump(other) == _dump(path)


def test_cli_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite3"
    path.write_text("precious")
    done = subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert "already exists" in done.stderr and "--force" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert path.read_text() == "precious"
    done = subprocess.run([sys.executable, str(SCRIPT), str(path), "--force", "--users", "3", "--logs", "10"],
                          capture_output=True, text=True, check=True)
    assert len(done.stdout.split()) == 1
