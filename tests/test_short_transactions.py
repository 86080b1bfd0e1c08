"""An import applies a bundle in short transactions: what that must not break.

The scene: A and B hold the same facility; then A updates every session, summary and
attempt log, and B's app edits every third session log (concurrent edits: conflicts),
which B serializes.
A's bundle of its updates is imported into B in-process, which lets a test act between
two of the import's transactions (``import_bundle(between=…)``, where the database is
free) or stop it inside one (an exception from the progress callback rolls it back, as
``kill -9`` would).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from bundlesync.device import Device
from bundlesync.errors import BundleError
from bundlesync.format import container
from bundlesync.replica.db import write_transaction
from bundlesync.replica.store import serialize_changes
from bundlesync.format.records import parse_record
from bundlesync.sync.importer import import_bundle, read_records
from bundlesync.trust.keystore import KeyStore
from conftest import (Pair, app_matches_store, build_pair, clone_device, copy_pair, dump_tables, masked_state,
                      run_cli, state, store_rows)

LOGS = 8_000
UPDATED = ("logger_contentsessionlog", "logger_contentsummarylog", "logger_attemptlog")


class Interrupted(Exception):
    """Stands for a crash in the middle of an import."""


@dataclass
class Scene:
    pair: Pair
    bundle: Path
    """A's bundle of its updates (not yet imported into B)."""
    after: dict[str, list[tuple[object, ...]]]
    """B's state after that import, uninterrupted (:func:`masked_state`, without the transfer's stats)."""
    merged: int
    """How many store versions that import took from the bundle."""


@pytest.fixture(scope="module")
def scene_template(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    p = build_pair(tmp_path_factory.mktemp("short-txn"), users=40, logs=LOGS, seed=11)
    first = run_cli(p.a, "export", "--facility", p.facility, "--out", str(p.usb)).last_line
    run_cli(p.b, "import", "--no-receipt", first)
    a = sqlite3.connect(p.a_db)
    with a:
        for table in UPDATED:
            a.execute(f"UPDATE {table} SET time_spent = time_spent + 1")
    a.close()
    b = sqlite3.connect(p.b_db)
    with b:  # later than A's edits: these win their conflicts
        b.execute("UPDATE logger_contentsessionlog SET progress = 0.5 WHERE rowid % 3 = 0")
    b.close()
    # Serialized now, so that every import of the scene starts from the same versions: an import
    # serializes pending edits in as many transactions (each with its own counter) as time asks.
    with Device.open(p.b) as device, write_transaction(device.conn):
        assert serialize_changes(device.conn, device.profile).versions > 500
    (p.usb / Path(first).name).unlink()
    bundle = Path(run_cli(p.a, "export", "--facility", p.facility, "--out", str(p.usb), "--no-encrypt").last_line)
    ref_home, ref_db = clone_device(p.b, p.b_db, p.tmp / "reference")
    _import(ref_home, bundle)
    return Scene(p, bundle, masked_state(ref_db, runs=False), _merged(ref_db, bundle))


@pytest.fixture
def scene(scene_template: Scene, tmp_path: Path) -> Scene:
    t = scene_template
    pair = copy_pair(t.pair, tmp_path)
    return Scene(pair, pair.usb / t.bundle.name, t.after, t.merged)


def _merged(db: Path, bundle: Path) -> int:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM bundlesync_store WHERE bundle_id = ?",
                                (container.read_info(bundle).manifest["bundle_id"],)).fetchone()[0])
    finally:
        conn.close()


def _import(home: Path, bundle: Path, *, progress: Callable[[int, int], None] | None = None,
            between: Callable[[], None] | None = None) -> None:
    with Device.open(home) as device:
        import_bundle(device, bundle, receipt=False, progress=progress, between=between)


def test_app_edit_between_transactions_meets_the_incoming_version_in_the_merge(scene: Scene) -> None:
    p, bundle = scene.pair, scene.bundle
    with Device.open(p.b) as device:
        last = parse_record(list(read_records(device, bundle))[-1])
    bundle_id = str(container.read_info(bundle).manifest["bundle_id"])
    applied = [0]
    edited: list[bool] = []

    def app_edit() -> None:
        """The app writes while the import holds no lock: once, after the first records are in."""
        if edited or not applied[0]:
            return
        app = sqlite3.connect(p.b_db, timeout=5.0)
        with app:
            merged = app.execute("SELECT bundle_id FROM bundlesync_store WHERE model = ? AND id = ?",
                                 (last.model, last.id)).fetchone()[0]
            edited.append(merged != bundle_id)  # the bundle's version of that row is still to come
            app.execute(f"UPDATE {last.model} SET time_spent = 999.0 WHERE id = ?", (last.id,))
        app.close()

    def progress(done: int, total: int) -> None:
        applied[0] = done

    _import(p.b, bundle, progress=progress, between=app_edit)
    assert edited == [True], "the edit must land before the transaction that brings that row"

    conn = sqlite3.connect(p.b_db)
    row = conn.execute(f"SELECT time_spent FROM {last.model} WHERE id = ?", (last.id,)).fetchone()
    [stored] = store_rows(conn, "model = ? AND id = ?", (last.model, last.id))
    inst, data = stored["inst"], stored["data"]
    losers = [json.loads(text) for (text,) in conn.execute(
        "SELECT loser FROM bundlesync_conflicts WHERE model = ? AND record_id = ?", (last.model, last.id))]
    me = conn.execute("SELECT value FROM bundlesync_meta WHERE key = 'instance_id'").fetchone()[0]
    conn.close()
    # The edit became a version before the incoming one was merged: a conflict, which the later
    # clock (the app's edit) wins; A's version is kept in the conflict log, not silently overwritten.
    assert row == (999.0,) and inst == me and json.loads(data)["time_spent"] == 999.0
    assert [(x["inst"], x["data"]["time_spent"]) for x in losers] == [(last.inst, json.loads(last.data)["time_spent"])]
    assert app_matches_store(p.b_db) == []

    # The edit reaches A with the next sync, and the two devices agree.
    back = run_cli(p.b, "export", "--facility", p.facility, "--out", str(p.usb)).last_line
    run_cli(p.a, "import", "--no-receipt", back)
    assert dump_tables(p.a_db) == dump_tables(p.b_db)


@pytest.mark.parametrize("stop", ["progress:middle", "between:4", "between:last"])
def test_interrupted_import_is_valid_and_completed_by_the_next(scene: Scene, stop: str) -> None:
    """Stopped inside a transaction (rolled back) or between two: a valid state, completed by importing again."""
    p, bundle, after = scene.pair, scene.bundle, scene.after
    conflicts = len(after["bundlesync_conflicts"])
    assert conflicts > 500  # B's edits met A's updates
    before = state(p.b_db)
    me = str(before["bundlesync_meta"][[r[0] for r in before["bundlesync_meta"]].index("instance_id")][1])

    where, _, when = stop.partition(":")
    total = container.read_info(bundle).records
    seen = [0]

    def progress(done: int, _total: int) -> None:
        if where == "progress" and done >= total // 2:
            raise Interrupted(stop)  # inside a transaction of DEQUEUING: it rolls back

    def between() -> None:
        seen[0] += 1
        if where != "between":
            return
        # "last": every record merged (rows maybe still to write), nothing recorded yet.
        if seen[0] == int(when) if when != "last" else _merged(p.b_db, bundle) == scene.merged:
            raise Interrupted(stop)

    with pytest.raises(Interrupted):
        _import(p.b, bundle, progress=progress, between=between)
    now = state(p.b_db)
    assert app_matches_store(p.b_db) == []
    assert now["bundlesync_transfers"] == before["bundlesync_transfers"]  # not recorded
    others = [[r for r in s["bundlesync_fsic"] if r[1] != me] for s in (before, now)]
    assert others[0] == others[1]  # knowledge of A's writes not advanced
    assert 0 < len(now["bundlesync_conflicts"]) <= conflicts
    merged = _merged(p.b_db, bundle)
    assert 0 < merged < scene.merged if when != "last" else merged == scene.merged  # the stop came part-way

    _import(p.b, bundle)
    assert masked_state(p.b_db, runs=False) == after  # conflicts included: none logged twice


def test_a_malformed_line_at_the_end_is_found_before_anything_is_applied(scene: Scene) -> None:
    p, bundle = scene.pair, scene.bundle
    info = container.read_info(bundle)
    lines = [*container.iter_records(info), b'{"m": "logger_attemptlog"}\tnot json\n']
    manifest = {**info.manifest, "bundle_id": hashlib.sha256(b"".join(lines)).hexdigest()[:32]}
    key = KeyStore(p.a).device_key()
    out = p.tmp / "bad"
    out.mkdir()
    with container.BundleWriter(out, "bundle-bad.bsync", manifest, lambda d: key.sign("bundle", d)) as writer:
        writer.write_records(lines)
        bad = writer.finish({"counts": {}})
    before = state(p.b_db)
    with pytest.raises(BundleError, match="malformed record"):
        _import(p.b, bad)
    assert state(p.b_db) == before
