"""``kill -9`` at any instant of an import, through the real CLI: the database is a valid
state, and importing the same bundle again gives exactly the state of an uninterrupted import.

An import applies a bundle in short transactions (the app keeps writing meanwhile), so a
kill can leave part of the bundle merged. What must hold after every kill: ``PRAGMA
integrity_check`` is ok; the database is a valid state of the merge (every app row as
the store holds it, no ``bundlesync_applying`` row left that would hide the app's edits);
nothing is recorded (transfer, knowledge) unless the import finished. And the next import
completes it: every table (wall-clock columns and the run's own report masked) equals the
state a clean import left, and no file is left in ``staging/``.

One clean import of a ~5k-record bundle into an empty device is the reference (its
duration is the last kill time). Kill points: as soon as SQLite's rollback journal appears
(inside the first write transaction), as soon as the first records, half of them, all of
them are merged (between or inside the short transactions, then while rows wait to be
written or the import to be recorded), and at the clean import's duration.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from conftest import ROOT, app_matches_store, build_pair, dump_tables, masked_state, run_cli


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return "\n".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def count(db: Path, table: str) -> int:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


def staging_files(home: Path) -> list[str]:
    staging = home / "staging"
    return sorted(p.name for p in staging.iterdir()) if staging.exists() else []


def restore(pristine: Path, db: Path) -> None:
    for suffix in ("-journal", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(pristine, db)


def start_import(home: Path, bundle: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "BUNDLESYNC_HOME"}
    env["BUNDLESYNC_HOME"] = str(home)
    return subprocess.Popen([sys.executable, "-m", "bundlesync", "import", str(bundle)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_kill_9_during_import_leaves_a_valid_state_that_the_next_import_completes(tmp_path: Path) -> None:
    # Enough records that the import needs several transactions even while the app is quiet (one
    # transaction then holds up to half a second of work), so some kill lands between two of them.
    p = build_pair(tmp_path, users=40, logs=15_000, seed=3)
    bundle = Path(run_cli(p.a, "export", "--facility", p.facility, "--out", str(p.usb)).last_line)
    journal = Path(f"{p.b_db}-journal")
    pristine = tmp_path / "b.pristine.sqlite3"
    shutil.copyfile(p.b_db, pristine)
    before = masked_state(p.b_db)
    source_app = dump_tables(p.a_db)

    # The reference: a clean import, timed.
    t0 = time.monotonic()
    ref = start_import(p.b, bundle)
    _, err = ref.communicate(timeout=120)
    duration = time.monotonic() - t0
    assert ref.returncode == 0, err.decode()
    after = masked_state(p.b_db, runs=False)
    assert dump_tables(p.b_db) == source_app and integrity(p.b_db) == "ok"

    # Kill points: (label, when to start counting, seconds after that).
    records = count(p.b_db, "bundlesync_store")

    def merged(share: float) -> Callable[[], bool]:
        return lambda: count(p.b_db, "bundlesync_store") >= max(1, int(records * share))

    points: list[tuple[str, Callable[[], bool], float]] = [
        ("journal appeared", journal.exists, 0.0), ("first records merged", merged(0), 0.0),
        ("half merged", merged(0.5), 0.0), ("all merged", merged(1), 0.0),
        (f"{duration:.2f}s (a clean import's time)", lambda: True, duration)]

    outcomes: dict[str, str] = {}
    partial = mid_transaction = 0
    for label, trigger, delay in points:
        restore(pristine, p.b_db)
        proc = start_import(p.b, bundle)
        start = time.monotonic()
        while proc.poll() is None and not trigger() and time.monotonic() - start < 60:
            time.sleep(0.002)
        time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        hot = journal.exists() and journal.stat().st_size > 0
        mid_transaction += hot

        assert integrity(p.b_db) == "ok", label
        assert app_matches_store(p.b_db) == [], label
        recorded = count(p.b_db, "bundlesync_transfers") > 0
        now = masked_state(p.b_db, runs=False)
        assert recorded == (now == after), label  # recorded only when all is in
        assert now["bundlesync_fsic"] == (after if recorded else before)["bundlesync_fsic"], label
        merged_now = count(p.b_db, "bundlesync_store")
        partial += not recorded and merged_now > 0
        outcomes[label] = ("finished" if finished else "killed") + (" in txn" if hot else "") + (
            ", recorded" if recorded else f", {merged_now} records merged")

        again = run_cli(p.b, "import", str(bundle), check=False)
        assert again.code == 0 and "Traceback" not in again.err, (label, again)
        assert masked_state(p.b_db, runs=False) == after, label
        assert dump_tables(p.b_db) == source_app, label
        assert integrity(p.b_db) == "ok", label
        assert staging_files(p.b) == [], (label, staging_files(p.b))

    print(f"import takes {duration:.2f}s; outcomes: {outcomes}")
    # Kills must have landed inside a write transaction and between the first merge and the record.
    assert mid_transaction >= 1 and partial >= 1, outcomes
