"""Invariant 2 through the real CLI: ``kill -9`` at any instant of an import leaves the
database exactly as before or exactly as after a clean import, never in between.

One import of a ~20k-record bundle is run cleanly first, as the reference (its duration
sets the kill times, its end state is "after"). Then, for each kill point, the importing
device's database is reset to its pristine copy, ``python -m bundlesync import`` is started
as a subprocess and killed with SIGKILL: at fixed times, at fractions of the measured
duration, and right after SQLite's rollback journal appears (so the kill lands inside the
write transaction, whatever the machine's speed). After each kill: ``PRAGMA
integrity_check`` is ok, every table (bundlesync's included, wall-clock columns masked)
equals the "before" or the "after" reference, and a new import completes, converges on
the reference and leaves no file in ``staging/``.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, build_pair, dump_tables, run_cli, state

# Wall-clock columns written by an import: they legitimately differ between two runs.
CLOCK_COLUMNS = {"at", "detected_at", "since"}


def masked_state(db: Path) -> dict[str, list[tuple[object, ...]]]:
    """``state(db)`` with wall-clock columns of bundlesync's tables blanked."""
    full = state(db)
    conn = sqlite3.connect(db)
    try:
        for table in list(full):
            if not table.startswith("bundlesync_"):
                continue
            cols = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
            clock = [i for i, c in enumerate(cols) if c in CLOCK_COLUMNS]
            if clock:
                full[table] = sorted(
                    (tuple(None if i in clock else v for i, v in enumerate(row)) for row in full[table]), key=repr)
    finally:
        conn.close()
    return full


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return "\n".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check"))
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


def test_kill_9_during_import_leaves_before_or_after(tmp_path: Path) -> None:
    p = build_pair(tmp_path, users=60, logs=20_000, seed=3)
    a_db, b_db, a, b, usb, facility = p.a_db, p.b_db, p.a, p.b, p.usb, p.facility
    bundle = Path(run_cli(a, "export", "--facility", facility, "--out", str(usb)).last_line)
    journal = Path(f"{b_db}-journal")

    pristine = tmp_path / "b.pristine.sqlite3"
    shutil.copyfile(b_db, pristine)
    before = masked_state(b_db)
    source_app = dump_tables(a_db)

    # The reference: a clean import, timed.
    t0 = time.monotonic()
    ref = start_import(b, bundle)
    _, err = ref.communicate(timeout=120)
    duration = time.monotonic() - t0
    assert ref.returncode == 0, err.decode()
    after = masked_state(b_db)
    assert dump_tables(b_db) == source_app
    assert after != before
    assert integrity(b_db) == "ok"

    # Kill points: (label, seconds after start, or seconds after the journal appears).
    points: list[tuple[str, float, bool]] = [(f"t={t:.2f}s", t, False) for t in (0.05, 0.2)]
    points += [(f"{f:.0%} of {duration:.2f}s", f * duration, False) for f in (0.5, 0.75, 0.95)]
    points += [(f"journal+{d:.2f}s", d, True) for d in (0.0, 0.1, 0.3)]

    outcomes: dict[str, str] = {}
    mid_transaction = 0
    for label, delay, after_journal in points:
        restore(pristine, b_db)
        proc = start_import(b, bundle)
        start = time.monotonic()
        if after_journal:
            while proc.poll() is None and not journal.exists() and time.monotonic() - start < 60:
                time.sleep(0.001)
        time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        hot = journal.exists() and journal.stat().st_size > 0
        mid_transaction += hot

        assert integrity(b_db) == "ok", label
        now = masked_state(b_db)
        assert now in (before, after), (
            f"kill -9 at {label} left the database neither as before nor as after: tables differing from "
            f"'before': {sorted(k for k in now if now[k] != before.get(k))}, from 'after': "
            f"{sorted(k for k in now if now[k] != after.get(k))}"
        )
        outcomes[label] = ("finished" if finished else "killed") + (" in txn" if hot else "") + (
            ", before" if now == before else ", after")

        again = run_cli(b, "import", str(bundle), check=False)
        assert again.code == 0 and "Traceback" not in again.err, (label, again)
        assert masked_state(b_db) == after, label
        assert dump_tables(b_db) == source_app, label
        assert integrity(b_db) == "ok", label
        assert staging_files(b) == [], (label, staging_files(b))

    print(f"import takes {duration:.2f}s; outcomes: {outcomes}")
    # The journal-triggered kills must have hit the write transaction, or the test proved little.
    assert mid_transaction >= 1, outcomes
