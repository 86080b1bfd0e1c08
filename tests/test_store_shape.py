"""The store's compact shape: a device made before it is upgraded in place and syncs exactly as before.

The store keeps small ids for its repeated names, a version vector only where it is not the
default, and a record's data only where its app row does not give it. A device whose store was
written in the earlier shape (every name as text, every vector and every record's data kept) is
rebuilt here from a device of today: its store is written back in the earlier shape with the
earlier tracking triggers, and its migration record removed. Opening it must rewrite the store,
and its full export must be the very bytes it was before; edits and deletions made afterwards
must sync (a deletion carrying the data it deleted, which only the prior table still has).
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

from conftest import Pair, dump_tables, run_cli, store_rows

from bundlesync.format import container
from bundlesync.format.records import parse_record

_OLD_STORE = """
    CREATE TABLE bundlesync_store (
        model TEXT NOT NULL, id TEXT NOT NULL, partition TEXT NOT NULL, data TEXT NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0, purged INTEGER NOT NULL DEFAULT 0, hlc INTEGER NOT NULL,
        inst TEXT NOT NULL, ctr INTEGER NOT NULL, vv TEXT NOT NULL, dirty INTEGER NOT NULL DEFAULT 0,
        error TEXT, bundle_id TEXT, wall INTEGER, UNIQUE (model, id))
"""

_KEEP_PRIOR = re.compile(r'INSERT OR IGNORE INTO "bundlesync_prior_[^"]*".*?AND s\.data IS NULL\);\s*', re.DOTALL)


def _full_lines(home: Path, facility: str, out: Path) -> list[bytes]:
    """The record lines of a full, unencrypted export of ``home``."""
    out.mkdir(exist_ok=True)
    path = json.loads(run_cli(home, "export", "--facility", facility, "--out", str(out), "--full", "--no-encrypt",
                              "--json").out)["path"]
    return list(container.iter_records(container.read_info(Path(path))))


def _write_back_in_the_earlier_shape(db: Path) -> int:
    """Turn a device's store into the shape it had before (as that version wrote it); return its rows."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        rows = store_rows(conn)
        rowids = {(m, i): r for r, m, i in conn.execute("SELECT s.rowid, m.name, s.id FROM bundlesync_versions s "
                                                        "JOIN bundlesync_models m ON m.n = s.model")}
        triggers = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
                                "AND name LIKE 'bundlesync%'").fetchall()
        priors = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                             "AND name LIKE 'bundlesync_prior_%'")]
        conn.execute("BEGIN")
        for name, sql in triggers:  # the earlier triggers only logged changes
            conn.execute(f'DROP TRIGGER "{name}"')
            conn.execute(_KEEP_PRIOR.sub("", sql))
        conn.execute("DROP VIEW bundlesync_store")
        for table in ("bundlesync_versions", "bundlesync_models", "bundlesync_partitions", "bundlesync_writers",
                      "bundlesync_bundles", *priors):
            conn.execute(f'DROP TABLE "{table}"')
        conn.execute(_OLD_STORE)
        conn.executemany(
            "INSERT INTO bundlesync_store (rowid, model, id, partition, data, deleted, purged, hlc, inst, ctr, vv, "
            "dirty, error, bundle_id, wall) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(rowids[(r["model"], r["id"])], r["model"], r["id"], r["partition"], r["data"], r["deleted"], r["purged"],
              r["hlc"], r["inst"], r["ctr"], r["vv"], r["dirty"], r["error"], r["bundle_id"], r["wall"])
             for r in rows])
        conn.execute("CREATE INDEX bundlesync_store_version ON bundlesync_store (model, inst, ctr)")
        conn.execute("CREATE INDEX bundlesync_store_dirty ON bundlesync_store (model) WHERE dirty = 1")
        conn.execute("DELETE FROM bundlesync_migrations WHERE name = 'm007_compact_store'")
        conn.execute("COMMIT")
        assert all(r["data"] for r in rows) and all(r["vv"] for r in rows)
        return len(rows)
    finally:
        conn.close()


def _unused(db: Path) -> float:
    """The share of the store table's pages that holds nothing."""
    conn = sqlite3.connect(db)
    try:
        return float(conn.execute("SELECT sum(unused) * 1.0 / sum(pgsize) FROM dbstat "
                                  "WHERE name = 'bundlesync_versions'").fetchone()[0])
    finally:
        conn.close()


def _left_to_app(db: Path) -> tuple[int, int]:
    conn = sqlite3.connect(db)
    try:
        total, left = conn.execute("SELECT count(*), sum(data IS NULL) FROM bundlesync_versions").fetchone()
        return int(total), int(left)
    finally:
        conn.close()


def test_a_device_of_the_earlier_store_shape_is_upgraded_and_syncs_identically(pair: Pair) -> None:
    p = pair
    first = _full_lines(p.a, p.facility, p.usb)
    run_cli(p.b, "import", str(next(p.usb.iterdir())))
    before = {"a": first, "b": _full_lines(p.b, p.facility, p.tmp / "b-out")}
    assert len(before["a"]) == len(before["b"]) > 200

    fresh = {db: _unused(db) for db in (p.a_db, p.b_db)}
    for db in (p.a_db, p.b_db):
        rows = _write_back_in_the_earlier_shape(db)
        assert rows == len(first)
    # Any command opens the device: the migration rewrites the store, the first open leaves the data to app rows.
    for home in (p.a, p.b):
        status = json.loads(run_cli(home, "status", "--json").out)
        assert status["repairs"] == [] and status["store_records"] == len(first)
    for db in (p.a_db, p.b_db):
        total, left = _left_to_app(db)
        assert total == len(first) and left == total  # every record's app row gives its data
        conn = sqlite3.connect(db)
        assert conn.execute("SELECT count(*) FROM bundlesync_versions WHERE vv IS NOT NULL").fetchone()[0] == 0
        assert not conn.execute("SELECT 1 FROM bundlesync_meta WHERE key = 'compact_store'").fetchone()
        conn.close()
        # Written anew, not shrunk in place: its pages are as full as a store written in this shape from the start
        # (rows shrunk in place would leave them mostly empty).
        assert _unused(db) <= fresh[db] + 0.05, (_unused(db), fresh[db])
    after = {"a": _full_lines(p.a, p.facility, p.tmp / "a-again"), "b": _full_lines(p.b, p.facility, p.tmp / "b-again")}
    assert after == before  # byte for byte, in the same order

    # Edits and a deletion made after the upgrade sync; the deletion carries the row it deleted.
    conn = sqlite3.connect(p.a_db)
    edited, gone = [r[0] for r in conn.execute("SELECT id FROM logger_attemptlog ORDER BY id LIMIT 2")]
    conn.execute("UPDATE logger_attemptlog SET answer = 'after the upgrade' WHERE id = ?", (edited,))
    conn.execute("DELETE FROM logger_attemptlog WHERE id = ?", (gone,))
    conn.commit()
    conn.close()
    for f in p.usb.iterdir():
        f.unlink()
    bundle = json.loads(run_cli(p.a, "export", "--facility", p.facility, "--out", str(p.usb), "--json",
                                "--no-encrypt").out)["path"]
    sent = {v.id: v for v in map(parse_record, container.iter_records(container.read_info(Path(bundle))))}
    assert set(sent) == {edited, gone} and sent[gone].deleted and not sent[edited].deleted
    [old] = [parse_record(line) for line in first if parse_record(line).id == gone]
    assert sent[gone].data == old.data
    run_cli(p.b, "import", bundle)
    assert dump_tables(p.a_db) == dump_tables(p.b_db)
