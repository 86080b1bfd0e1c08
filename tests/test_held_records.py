"""Import passes by records it holds exactly as they come, and only those.

A record line byte-identical to the one this device's store would export (same version,
vector, flags and data) is counted as already here without being decoded or merged. A line
that differs in anything — data that lies about its partition, a larger vector — still goes
through every check and the merge.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from conftest import Pair, run_cli, state
from forge import resign


def _export(pair: Pair, out: Path, *extra: str) -> Path:
    out.mkdir(exist_ok=True)
    return Path(run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(out), "--no-encrypt", *extra).last_line)


def _import(pair: Pair, bundle: Path) -> dict[str, object]:
    reports = json.loads(run_cli(pair.b, "import", str(bundle), "--json", "--no-receipt", check=False).out)
    report: dict[str, object] = reports[0]
    return report


def _lines(bundle: Path) -> list[bytes]:
    from bundlesync.format import container
    return list(container.iter_records(container.read_info(bundle)))


def test_a_full_bundle_of_records_held_changes_nothing(pair: Pair) -> None:
    first = _export(pair, pair.tmp / "one")
    assert _import(pair, first)["complete"] is True
    again = _export(pair, pair.tmp / "two", "--full")
    before = state(pair.b_db)
    report = _import(pair, again)
    records = len(_lines(again))
    outcomes = report["outcomes"]
    assert isinstance(outcomes, dict)
    assert outcomes["already"] == records and report["written"] == 0
    after = state(pair.b_db)
    # Only the transfer log and knowledge may move; the store and the app tables stay as they were.
    for table in after:
        if table.startswith("bundlesync_store") or not table.startswith(("bundlesync_", "sqlite_", "<")):
            assert after[table] == before[table], table


def test_a_held_version_with_other_data_or_a_larger_vector_takes_the_long_way(pair: Pair) -> None:
    first = _export(pair, pair.tmp / "one")
    _import(pair, first)
    lines = _lines(first)
    # A role: its partition names its user, so data naming another user lies about the partition.
    role = next(line for line in lines if b'"m":"kolibriauth_role"' in line)
    head, _, data = role.rstrip(b"\n").partition(b"\t")
    row = json.loads(data)
    row["user_id"] = "0" * 32
    lying = head + b"\t" + json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    h = json.loads(head)
    h["v"] = {**h["v"], "f" * 32: 7}
    wider = json.dumps(h, separators=(",", ":")).encode() + b"\t" + data + b"\n"
    forged = resign(first, pair.a, [lying, wider], pair.tmp / "forged")
    report = _import(pair, forged)
    assert report["refused"] == 1 and report["received"] == 2
    outcomes = report["outcomes"]
    assert isinstance(outcomes, dict) and outcomes["already"] == 1
    conn = sqlite3.connect(pair.b_db)
    try:
        vv = conn.execute("SELECT vv FROM bundlesync_store WHERE model = ? AND id = ?",
                          (h["m"], h["id"])).fetchone()[0]
    finally:
        conn.close()
    assert json.loads(vv)["f" * 32] == 7  # the merge ran: the stored vector took in the larger one
