"""The pacer's promise on its own: a writer with a 5 s busy timeout never fails and never waits long.

A thread plays bundlesync: back-to-back short write transactions through a :class:`Pacer`,
each holding the lock for its whole share of time. Another thread (its own connection,
Python's default busy timeout) plays the app. Both journal modes.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from bundlesync.replica.db import connect
from bundlesync.replica.pacing import BURST_S, HOLD_S, REST_S, Pacer

RUN_S = 2.5


def _sync_side(db: Path, stop: threading.Event, out: dict[str, float]) -> None:
    conn = connect(db)
    pacer = Pacer(conn)
    start = time.monotonic()
    while not stop.is_set():
        with pacer.transaction() as over:
            conn.execute("INSERT INTO t (v) VALUES ('sync')")
            while not over():
                time.sleep(0.005)  # bundlesync working while it holds the write lock
    out["rested"], out["elapsed"], out["transactions"] = pacer.rested, time.monotonic() - start, pacer.transactions
    conn.close()


def _app_side(db: Path, stop: threading.Event, out: dict[str, float], pause: float) -> None:
    conn = sqlite3.connect(db, timeout=5.0)
    waits: list[float] = []
    failures = 0
    while not stop.is_set():
        began = time.monotonic()
        try:
            conn.execute("INSERT INTO t (v) VALUES ('app')")
            conn.commit()
        except sqlite3.OperationalError:
            failures += 1
            conn.rollback()
        waits.append(time.monotonic() - began)
        time.sleep(pause)
    out["max_wait"], out["failures"], out["writes"] = max(waits), failures, len(waits)
    conn.close()


@pytest.mark.parametrize("mode", ["wal", "delete"])
@pytest.mark.parametrize("pause", [0.005, 0.7], ids=["busy-app", "occasional-app"])
def test_waiting_writer_gets_the_lock_soon(tmp_path: Path, mode: str, pause: float) -> None:
    db = tmp_path / "db.sqlite3"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA journal_mode = {mode}")
    conn.execute("CREATE TABLE t (v TEXT)")
    conn.commit()
    conn.close()
    stop = threading.Event()
    sync: dict[str, float] = {}
    app: dict[str, float] = {}
    threads = [threading.Thread(target=_sync_side, args=(db, stop, sync)),
               threading.Thread(target=_app_side, args=(db, stop, app, pause))]
    for thread in threads:
        thread.start()
    time.sleep(RUN_S)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    print(f"[{mode}, app pause {pause}s] app: {app['writes']:.0f} writes, longest wait {app['max_wait'] * 1000:.0f} ms; "
          f"sync: {sync['transactions']:.0f} transactions, rested {sync['rested']:.2f} of {sync['elapsed']:.2f} s")
    assert app["failures"] == 0
    # A writer that starts in the middle of a burst waits for it and one rest at most (slack for a busy machine).
    assert app["max_wait"] < BURST_S + 2 * HOLD_S + REST_S + 0.5
    assert sync["transactions"] >= 5  # the sync side made progress too


def test_beside_an_idle_app_rests_take_a_small_share(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    sqlite3.connect(db).execute("CREATE TABLE t (v TEXT)").connection.close()
    stop = threading.Event()
    sync: dict[str, float] = {}
    thread = threading.Thread(target=_sync_side, args=(db, stop, sync))
    thread.start()
    time.sleep(1.5)
    stop.set()
    thread.join(timeout=30)
    # One full rest per BURST_S of held lock: about REST_S / (BURST_S + REST_S) of the time.
    assert sync["rested"] <= sync["elapsed"] * (REST_S / (BURST_S + REST_S) + 0.1)
