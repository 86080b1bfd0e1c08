"""A drive never fills with bundles that change nothing; `drive` lists it and `drive --clean` tidies it."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from conftest import Pair, dump_tables, run_cli


def _edit(db: Path, rowid: int, name: str) -> None:
    conn = sqlite3.connect(db)
    conn.execute("UPDATE kolibriauth_facilityuser SET full_name = ? WHERE rowid = ?", (name, rowid))
    conn.commit()
    conn.close()


def _export(pair: Pair, *args: str) -> str:
    return run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), *args).last_line


def _bundles(pair: Pair) -> list[str]:
    return sorted(p.name for p in pair.usb.glob("bundle-*"))


def _drive(pair: Pair, home: Path, *args: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(run_cli(home, "drive", str(pair.usb), "--json", *args).out)
    return doc


def test_stale_receipt_adds_no_bundle_and_a_superset_replaces_the_earlier(pair: Pair) -> None:
    first = Path(_export(pair))
    run_cli(pair.b, "import", str(first))  # B leaves its receipt, then does not come back for a while
    _edit(pair.a_db, 1, "night one")
    night1 = Path(_export(pair))
    assert _bundles(pair) == sorted([first.name, night1.name])
    # Nights without a change while B's receipt is stale: nothing is added.
    for _ in range(2):
        res = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb))
        assert res.code == 0 and res.out == "" and f"{night1.name} on the drive already carries it" in res.err
    assert _bundles(pair) == sorted([first.name, night1.name])
    # A new change: the new bundle carries night one's too, and replaces it once verified.
    _edit(pair.a_db, 2, "night four")
    night4 = Path(_export(pair))
    assert _bundles(pair) == sorted([first.name, night4.name])
    run_cli(pair.b, "import", str(night4))
    assert dump_tables(pair.b_db) == dump_tables(pair.a_db)


def test_full_export_replaces_an_earlier_full_export(pair: Pair) -> None:
    old = Path(_export(pair, "--full"))
    _edit(pair.a_db, 3, "changed")
    new = Path(_export(pair, "--full"))
    assert _bundles(pair) == [new.name] and not old.exists()


def test_drive_lists_and_cleans_what_nobody_needs(pair: Pair) -> None:
    first = Path(_export(pair))
    run_cli(pair.b, "import", str(first))
    _edit(pair.a_db, 1, "later")
    later = Path(_export(pair))
    stale = pair.usb / "bundle-0000-dead.bsync.partial"
    stale.write_bytes(b"x")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    doc = _drive(pair, pair.a)
    by_name = {b["name"]: b for b in doc["bundles"]}
    assert set(by_name) == {first.name, later.name}
    b_id = run_cli(pair.b, "status", "--json").out
    b_instance = json.loads(b_id)["instance_id"]
    a_instance = json.loads(run_cli(pair.a, "status", "--json").out)["instance_id"]
    f = by_name[first.name]
    assert f["sender"] == a_instance and f["records"] > 0 and f["size"] == first.stat().st_size
    assert f["held_by"] == [b_instance] and "every known reader holds it" in f["unneeded"]
    l_ = by_name[later.name]
    assert l_["held_by"] == [] and l_["unneeded"] is None and len(l_["files"]) == 1
    assert [r["instance_id"] for r in doc["receipts"]] == [b_instance]
    assert doc["stale_partials"] == [stale.name]
    text = run_cli(pair.a, "drive", str(pair.usb)).out
    assert "nobody needs it" in text and "held by" not in text.split(first.name)[0]
    # --clean removes what every known reader holds and the dead run's partial file; keeps the rest.
    cleaned = _drive(pair, pair.a, "--clean")
    assert sorted(cleaned["removed"]) == sorted([first.name, stale.name])
    assert not first.exists() and not stale.exists() and later.exists()
    run_cli(pair.b, "import", str(later))
    assert _drive(pair, pair.a, "--clean")["removed"] == [later.name]
    assert _bundles(pair) == []
    assert dump_tables(pair.b_db) == dump_tables(pair.a_db)
