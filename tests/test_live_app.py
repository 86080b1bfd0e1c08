"""bundlesync beside a running app: the app's writes never fail and never wait long.

An app writer (scripts/app_writer.py, its own process, Python's default 5 s busy timeout)
runs thousands of small transactions on a synced table while a ~100k-record export runs
on device A, and again while that bundle is imported on device B, with the databases in
WAL and in rollback-journal (DELETE) mode. No app write may fail, the longest any of them
waited is printed and must stay under :data:`MAX_WAIT_S`, and after the next sync in
both directions every app row is identical on the two devices (the app's edits made
during the sync, the ones to rows the import was bringing included, all arrive).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import pytest

from conftest import ROOT, Pair, build_pair, copy_pair, dump_tables, run_cli

LOGS = 100_000
"""Logger rows of the facility: with users, classes and lessons, 100,212 records."""

MAX_WAIT_S = 1.5
"""The longest an app transaction may take (its wait for the write lock included)."""


class AppWriter:
    """Runs scripts/app_writer.py on a database for the ``with`` block; ``report`` is its result."""

    def __init__(self, db: Path, dataset: str, ids: Path, work: Path, tag: str) -> None:
        self.out, self.stop = work / f"writer-{tag}.json", work / f"writer-{tag}.stop"
        self.args = [sys.executable, str(ROOT / "scripts" / "app_writer.py"), str(db), dataset, str(ids),
                     str(self.out), str(self.stop), tag]
        self.report: dict[str, object] = {}

    def __enter__(self) -> AppWriter:
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        ready = self.out.with_name(self.out.name + ".ready")
        deadline = time.monotonic() + 30
        while not ready.exists() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists(), f"the app writer did not start: {self.proc.stderr.read() if self.proc.stderr else ''}"
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop.touch()
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        self.report = json.loads(self.out.read_text())

    @property
    def max_wait(self) -> float:
        return float(str(self.report["max_wait"]))


@pytest.fixture(scope="module")
def live_template(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """Two devices, A with a 100k-log facility whose rows init has queued (built once per module)."""
    return build_pair(tmp_path_factory.mktemp("live-template"), users=60, logs=LOGS, seed=5)


def _one(db: Path, sql: str) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [str(r[0]) for r in conn.execute(sql)]
    finally:
        conn.close()


def _journal_mode(db: Path, mode: str) -> None:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute(f"PRAGMA journal_mode = {mode}").fetchone()[0] == mode
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["wal", "delete"])
def test_app_writes_beside_export_and_import(live_template: Pair, tmp_path: Path, mode: str) -> None:
    p = copy_pair(live_template, tmp_path)
    for db in (p.a_db, p.b_db):
        _journal_mode(db, mode)
    dataset = _one(p.a_db, "SELECT id FROM kolibriauth_facilitydataset")[0]
    # Rows the app edits while they are being exported (on A) and imported (on B).
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(_one(p.a_db, "SELECT id FROM logger_contentsessionlog ORDER BY id")[::20]))

    start = time.monotonic()
    with AppWriter(p.a_db, dataset, ids, tmp_path, "appa") as on_a:
        exported = run_cli(p.a, "export", "--facility", p.facility, "--out", str(p.usb))
    export_s = time.monotonic() - start
    bundle = exported.last_line
    start = time.monotonic()
    with AppWriter(p.b_db, dataset, ids, tmp_path, "appb") as on_b:
        imported = run_cli(p.b, "import", bundle)
    import_s = time.monotonic() - start
    for what, took, app in (("export", export_s, on_a), ("import", import_s, on_b)):
        print(f"[{mode}] {what} {took:.1f}s beside {app.report['transactions']} app transactions: "
              f"{app.report['failures']} failed, longest wait {app.max_wait * 1000:.0f} ms, "
              f"p99 {float(str(app.report['p99_wait'])) * 1000:.0f} ms")
    records = int(imported.err.split(" records: ")[0].rsplit(" ", 1)[-1])
    assert records >= 100_000, imported.err
    assert on_a.report["failures"] == 0 and on_b.report["failures"] == 0, (on_a.report, on_b.report)
    assert on_a.max_wait < MAX_WAIT_S and on_b.max_wait < MAX_WAIT_S, (on_a.report, on_b.report)

    # The next sync, both ways: every row the same on both devices, the app's edits included.
    to_b = run_cli(p.a, "export", "--facility", p.facility, "--out", str(p.usb)).last_line
    run_cli(p.b, "import", to_b)
    to_a = run_cli(p.b, "export", "--facility", p.facility, "--out", str(p.usb)).last_line
    run_cli(p.a, "import", to_a)
    a, b = dump_tables(p.a_db), dump_tables(p.b_db)
    assert a == b
    sessions = {str(row[0]) for row in a["logger_contentsessionlog"]}
    assert sum(i.startswith("appa") for i in sessions) == on_a.report["inserted"]
    assert sum(i.startswith("appb") for i in sessions) == on_b.report["inserted"]
