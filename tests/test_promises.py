"""The promises of import, each defended by a test that fails when its check is removed.

Three devices (``tests/trio.py``): A the authority, B full-facility, L learner U's tablet. Records a device may not send are forged the way a peer with a valid
certificate could: real records, changed, signed with that peer's real key
(``tests/forge.py``). Every import and export runs the real CLI.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

from conftest import dump_tables, run_cli
from forge import record_line, resign, versions_of
from trio import LOGS, USERS, Trio, trio, trio_template  # noqa: F401  (fixtures)

from bundlesync.format.records import Version


def _learner_bundle(t: Trio) -> tuple[Path, list[Version], Version]:
    """A real bundle from L (U's records, one session log edited on L), its versions, and the edit."""
    edited = t.one(t.l_db, f"SELECT min(id) FROM {LOGS} WHERE user_id = ?", (t.user,))
    t.sql(t.l_db, f"UPDATE {LOGS} SET progress = 0.5 WHERE id = ?", (edited,))
    bundle = t.export(t.l, t.drive("from-l"))
    versions = versions_of(bundle)
    [edit] = [v for v in versions if v.id == edited]
    assert edit.inst == _instance(t.l)
    return bundle, versions, edit


def _row_of(t: Trio, db: Path, table: str, user: str) -> dict[str, Any]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return dict(conn.execute(f"SELECT * FROM {table} WHERE user_id = ? ORDER BY id LIMIT 1", (user,)).fetchone())
    finally:
        conn.close()


def _new_log(t: Trio, *, owner: str, partition_user: str, learner: str, ctr: int) -> Version:
    """A new session log of ``owner`` written by L, claiming ``partition_user``'s partition."""
    row = _row_of(t, t.a_db, LOGS, owner)
    row["id"] = "f0" * 16
    hlc = 1 << 60
    return Version(model=LOGS, id=row["id"], partition=f"{t.dataset}:user-rw:{partition_user}",
                   data=json.dumps(row, separators=(",", ":")), deleted=False, purged=False, hlc=hlc,
                   inst=learner, ctr=ctr, vv={learner: ctr})


def _instance(home: Path) -> str:
    return str(json.loads(run_cli(home, "status", "--json").out)["instance_id"])


# --------------------------------------------------------------------------- scope of the signer


def test_a_new_record_outside_the_signers_write_scope_is_refused(trio: Trio) -> None:
    t = trio
    bundle, versions, edit = _learner_bundle(t)
    forged = _new_log(t, owner=t.other, partition_user=t.other, learner=edit.inst, ctr=edit.ctr)
    evil = resign(bundle, t.l, [*map(record_line, versions), record_line(forged)], t.drive("evil"))
    [report] = t.import_json(t.a, evil)
    assert report["refused"] == 1 and report["received"] == len(versions) + 1
    assert "outside the signer's write scope" in report["refused_sample"][0]
    assert t.one(t.a_db, f"SELECT count(*) FROM {LOGS} WHERE id = ?", (forged.id,)) == 0
    assert t.one(t.a_db, "SELECT count(*) FROM bundlesync_store WHERE id = ?", (forged.id,)) == 0
    # The rest of the bundle applied: U's own edit is L's to make.
    assert t.one(t.a_db, f"SELECT progress FROM {LOGS} WHERE id = ?", (edit.id,)) == 0.5


def test_a_record_whose_data_lies_about_its_partition_is_refused(trio: Trio) -> None:
    """V's log claiming U's partition: the partition is L's to write, the data is not."""
    t = trio
    bundle, versions, edit = _learner_bundle(t)
    forged = _new_log(t, owner=t.other, partition_user=t.user, learner=edit.inst, ctr=edit.ctr)
    evil = resign(bundle, t.l, [*map(record_line, versions), record_line(forged)], t.drive("evil"))
    [report] = t.import_json(t.a, evil)
    assert report["refused"] == 1
    assert "does not belong to partition" in report["refused_sample"][0]
    assert t.one(t.a_db, f"SELECT count(*) FROM {LOGS} WHERE id = ?", (forged.id,)) == 0
    assert t.one(t.a_db, "SELECT count(*) FROM bundlesync_store WHERE id = ?", (forged.id,)) == 0


def test_a_single_user_certificate_cannot_purge(trio: Trio) -> None:
    t = trio
    # Through the CLI: the learner's device refuses to purge its own user.
    res = run_cli(t.l, "purge", "--facility", t.facility, "--user", t.user, check=False)
    assert res.code == 3 and res.err.startswith("error:") and len(res.err.splitlines()) == 1, res
    assert "full-facility certificate" in res.err
    # A purge version forged by L for U's own session log (inside L's write scope) is refused by A.
    bundle, _, v = _learner_bundle(t)
    purge = replace(v, data="{}", deleted=True, purged=True, hlc=v.hlc + 1, ctr=v.ctr + 1,
                    vv={**v.vv, v.inst: v.ctr + 1})
    evil = resign(bundle, t.l, [record_line(purge)], t.drive("evil"))
    before = dump_tables(t.a_db)
    [report] = t.import_json(t.a, evil)
    assert report["refused"] == 1
    assert "only a full-facility certificate may purge" in report["refused_sample"][0]
    assert dump_tables(t.a_db) == before
    assert t.one(t.a_db, "SELECT purged FROM bundlesync_store WHERE id = ?", (v.id,)) == 0


# --------------------------------------------------------------------------- scope of the reader


def test_a_learner_device_skips_what_it_may_not_read(trio: Trio) -> None:
    """A full-facility bundle imported on U's tablet: only what U may read is kept."""
    t = trio
    full = t.export(t.a, t.drive("full"), "--full")
    [report] = t.import_json(t.l, full)
    assert report["refused"] == 0 and report["not_for_this_device"] > 0
    assert t.one(t.l_db, f"SELECT count(*) FROM {LOGS} WHERE user_id IS NOT NULL AND user_id != ?", (t.user,)) == 0
    assert t.one(t.l_db, f"SELECT count(*) FROM {USERS} WHERE id != ?", (t.user,)) == 0
    readable = (f"{t.dataset}:allusers-ro", f"{t.dataset}:user-ro:{t.user}", f"{t.dataset}:user-rw:{t.user}",
                f"{t.dataset}:anonymous")
    conn = sqlite3.connect(t.l_db)
    partitions = {r[0] for r in conn.execute("SELECT DISTINCT partition FROM bundlesync_store")}
    conn.close()
    assert partitions and partitions <= set(readable)
    # U's own rows are all there.
    assert t.one(t.l_db, f"SELECT count(*) FROM {LOGS} WHERE user_id = ?", (t.user,)) == \
        t.one(t.a_db, f"SELECT count(*) FROM {LOGS} WHERE user_id = ?", (t.user,))


# --------------------------------------------------------------------------- clocks


def test_an_edit_is_stamped_above_the_version_it_replaces(trio: Trio) -> None:
    """A's clock runs a year ahead; B's later edit of the same row must still win everywhere."""
    t = trio
    t.sql(t.a_db, f"UPDATE {USERS} SET full_name = 'from the future' WHERE id = ?", (t.other,))
    year_ms = 365 * 24 * 3600 * 1000
    t.sql(t.a_db, "UPDATE bundlesync_changes SET at_ms = at_ms + ?", (year_ms,))  # what A's clock said
    [report] = t.import_json(t.b, t.export(t.a, t.drive("a1")))
    assert report["outcomes"]["fast_forward"] == 1
    t.sql(t.b_db, f"UPDATE {USERS} SET full_name = 'edited after it' WHERE id = ?", (t.other,))
    [report] = t.import_json(t.a, t.export(t.b, t.drive("b1")))
    assert report["outcomes"]["fast_forward"] == 1 and report["outcomes"]["conflict"] == 0
    for db in (t.a_db, t.b_db):
        assert t.one(db, f"SELECT full_name FROM {USERS} WHERE id = ?", (t.other,)) == "edited after it"
    assert dump_tables(t.a_db) == dump_tables(t.b_db)


# --------------------------------------------------------------------------- receipts


def test_a_receipt_with_a_broken_signature_is_not_used(trio: Trio) -> None:
    t = trio
    drive = t.drive("drive")
    t.sql(t.a_db, f"UPDATE {USERS} SET full_name = 'before the receipt' WHERE id = ?", (t.other,))
    [report] = t.import_json(t.b, t.export(t.a, drive))
    receipt = Path(report["receipt"])
    assert receipt.parent == drive
    # Someone raises the counters B claims to hold, without B's key: A must not believe it.
    doc = json.loads(receipt.read_text())
    doc["receipt"]["fsic"] = {inst: ctr + 1_000_000 for inst, ctr in doc["receipt"]["fsic"].items()}
    receipt.write_text(json.dumps(doc))
    t.sql(t.a_db, f"UPDATE {USERS} SET full_name = 'after the receipt' WHERE id = ?", (t.other,))
    res = run_cli(t.a, "export", "--facility", t.facility, "--out", str(drive))
    assert receipt.name in res.err and ("signature" in res.err or "not signed by" in res.err)
    bundle = Path(res.last_line)
    assert bundle.is_file(), "the forged receipt must not make A think B holds everything"
    # Named with --since, the same receipt is a trust failure, not a basis.
    res = run_cli(t.a, "export", "--facility", t.facility, "--out", str(t.drive("x")), "--since", str(receipt),
                  check=False)
    assert res.code == 5 and len(res.err.splitlines()) == 1 and res.err.startswith("error:"), res
    assert list((t.root / "x").iterdir()) == []
    t.import_json(t.b, bundle)
    assert t.one(t.b_db, f"SELECT full_name FROM {USERS} WHERE id = ?", (t.other,)) == "after the receipt"


# --------------------------------------------------------------------------- purges


def test_a_purge_drops_the_conflict_log_and_undoes_later_local_edits(trio: Trio) -> None:
    t = trio
    # A conflict on V's user row: both sides edit it, then exchange.
    t.sql(t.a_db, f"UPDATE {USERS} SET full_name = 'A says' WHERE id = ?", (t.other,))
    t.sql(t.b_db, f"UPDATE {USERS} SET full_name = 'B says' WHERE id = ?", (t.other,))
    a1, b1 = t.export(t.a, t.drive("a1")), t.export(t.b, t.drive("b1"))
    t.import_json(t.a, b1)
    t.import_json(t.b, a1)
    for home in (t.a, t.b):
        logged = json.loads(run_cli(home, "conflicts", "--json").out)
        assert [(c["model"], c["record_id"]) for c in logged] == [(USERS, t.other)]
    text = run_cli(t.b, "conflicts")
    assert f"{USERS} {t.other}: lost" in text.out
    saved = _row_of(t, t.b_db, LOGS, t.other)
    # A purges V through the CLI: V's rows and conflict-log entries go.
    res = run_cli(t.a, "purge", "--facility", t.facility, "--user", t.other, "--yes")
    assert "purged" in res.err and f"user {t.other}" in res.err
    assert json.loads(run_cli(t.a, "conflicts", "--json").out) == []
    assert "no conflicts" in run_cli(t.a, "conflicts").err
    purge = t.export(t.a, t.drive("a2"))
    [report] = t.import_json(t.b, purge)
    assert report["refused"] == 0 and report["deleted"] > 0
    assert json.loads(run_cli(t.b, "conflicts", "--json").out) == []
    for db in (t.a_db, t.b_db):
        assert t.one(db, f"SELECT count(*) FROM {USERS} WHERE id = ?", (t.other,)) == 0
        assert t.one(db, f"SELECT count(*) FROM {LOGS} WHERE user_id = ?", (t.other,)) == 0
    # An app on B writes one of V's session logs back (same id): the next serialization undoes it.
    columns = ", ".join(saved)
    marks = ", ".join("?" * len(saved))
    t.sql(t.b_db, "PRAGMA foreign_keys = OFF")
    conn = sqlite3.connect(t.b_db)
    conn.execute(f"INSERT INTO {LOGS} ({columns}) VALUES ({marks})", tuple(saved.values()))
    conn.commit()
    conn.close()
    out = run_cli(t.b, "export", "--facility", t.facility, "--out", str(t.drive("b2")))
    assert t.one(t.b_db, "SELECT data || purged FROM bundlesync_store WHERE id = ?", (saved["id"],)) == "{}1"
    if out.last_line.endswith(".bsync"):  # whatever B sends, V's data is not in it
        assert all(t.other not in v.data for v in versions_of(Path(out.last_line)))
        t.import_json(t.a, Path(out.last_line))
    assert t.one(t.a_db, f"SELECT count(*) FROM {LOGS} WHERE id = ?", (saved["id"],)) == 0
    # B's next import writes the purged version back over the app's row.
    t.sql(t.a_db, f"UPDATE {USERS} SET full_name = 'later' WHERE id = ?", (t.user,))
    t.import_json(t.b, t.export(t.a, t.drive("a3")))
    assert t.one(t.b_db, f"SELECT count(*) FROM {LOGS} WHERE id = ?", (saved["id"],)) == 0
    assert t.one(t.b_db, "SELECT data || purged FROM bundlesync_store WHERE id = ?", (saved["id"],)) == "{}1"
