#!/usr/bin/env python3
"""An app writing to its database beside bundlesync, as a separate process (tests/test_live_app.py, bench.py).

``python scripts/app_writer.py DB DATASET_ID IDS_FILE OUT_JSON STOP_FILE TAG`` opens the
database the way a Python app does by default (``sqlite3.connect(db, timeout=5.0)``,
implicit transactions) and runs small transactions until ``STOP_FILE`` exists: each
inserts one anonymous content session log (id ``TAG`` + a number), updates one it
inserted earlier, and updates one of the rows listed in ``IDS_FILE`` (rows a sync brings
or sends; an update of a row not there yet changes nothing). Every failure is counted,
and each transaction's duration (which includes any wait for the write lock) is kept.
``OUT_JSON`` gets ``{"transactions", "failures", "errors", "max_wait", "p99_wait", "inserted"}``;
``OUT_JSON.ready`` appears after the first commit, so a test starts the sync only once
the app is writing. Standard library only.
"""

from __future__ import annotations

import json
import random
import sqlite3
import sys
import time
from pathlib import Path

PAUSE_S = 0.004
"""Between two transactions: a busy server, not a loop that never lets go of the lock."""

TABLE = "logger_contentsessionlog"


def run(db: Path, dataset: str, ids: list[str], out: Path, stop: Path, tag: str) -> dict[str, object]:
    """Write until ``stop`` exists; return the report (also written to ``out``)."""
    rng = random.Random(tag)
    conn = sqlite3.connect(str(db), timeout=5.0)  # Python's default busy timeout, as Kolibri's server
    inserted: list[str] = []
    waits: list[float] = []
    errors: list[str] = []
    ready = out.with_name(out.name + ".ready")
    n = 0
    while not stop.exists():
        n += 1
        row_id = f"{tag}{n:08d}".ljust(32, "0")
        start = time.perf_counter()
        try:
            conn.execute(
                f"INSERT INTO {TABLE} (id, user_id, content_id, channel_id, start_timestamp, end_timestamp, "
                "time_spent, progress, kind, extra_fields, dataset_id) VALUES (?, NULL, ?, ?, ?, ?, ?, ?, 'video', "
                "NULL, ?)",
                (row_id, f"{n:032x}", "c" * 32, "2026-03-01T10:00:00.000Z", "2026-03-01T10:05:00.000Z",
                 float(n), rng.random(), dataset))
            if inserted:
                conn.execute(f"UPDATE {TABLE} SET time_spent = time_spent + 1 WHERE id = ?", (rng.choice(inserted),))
            if ids:
                conn.execute(f"UPDATE {TABLE} SET progress = ? WHERE id = ?", (rng.random(), rng.choice(ids)))
            conn.commit()
            inserted.append(row_id)
        except sqlite3.OperationalError as exc:
            errors.append(str(exc))
            conn.rollback()
        waits.append(time.perf_counter() - start)
        if n == 1:
            ready.touch()
        time.sleep(PAUSE_S)
    conn.close()
    waits.sort()
    report: dict[str, object] = {
        "transactions": len(waits), "failures": len(errors), "errors": sorted(set(errors))[:5],
        "max_wait": waits[-1] if waits else 0.0, "p99_wait": waits[int(len(waits) * 0.99)] if waits else 0.0,
        "inserted": len(inserted),
    }
    out.write_text(json.dumps(report))
    return report


def main(argv: list[str]) -> int:
    """Command line: see the module docstring."""
    db, dataset, ids_file, out, stop, tag = argv
    ids = Path(ids_file).read_text().split()
    run(Path(db), dataset, ids, Path(out), Path(stop), tag)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
