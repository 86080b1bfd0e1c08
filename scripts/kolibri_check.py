"""End-to-end check of the built-in Kolibri profile on a real Kolibri database (run by kolibri_check.sh).

Usage: python scripts/kolibri_check.py KOLIBRI_DB WORKDIR

Devices: A holds the real Kolibri database and is the facility's authority; B is an empty Kolibri schema with a
full-facility certificate; L is a learner's single-user device (an empty schema, certificate ``user:U``).
Steps: partitions of every row against Kolibri's own; A -> B full; A -> L for learner U (lessons and quizzes
arrive through the Kolibri plugin); SQL edits on A, B and L; B -> A, L -> A, A -> B, A -> L; then every table
and column of A and B must agree, and L must hold exactly what A holds in U's partitions. Exits 1 on a
difference, printing what differs.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from bundlesync.profile import bind_profile, load_profile

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "fixtures" / "kolibri_schema.sql"
LOCAL_ONLY = {"_morango_dirty_bit"}  # a device's own state: never compared across devices
failures: list[str] = []


def cli(home: Path, *args: str) -> str:
    """Run bundlesync (an incomplete import, exit 9, is reported by the comparisons); its last line of output."""
    out = cli_out(home, *args, ok=(0, 9)).strip()
    return out.splitlines()[-1] if out else ""


def export(home: Path, *args: str) -> str:
    """Export with ``--json`` (``--quiet`` prints nothing on success); the bundle's path, or "" if nothing new."""
    report = json.loads(cli_out(home, "export", *args, "--json"))
    return str(report["path"]) if report.get("path") else ""


def cli_out(home: Path, *args: str, ok: tuple[int, ...] = (0,)) -> str:
    env = {**os.environ, "BUNDLESYNC_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "bundlesync", *args], capture_output=True, text=True, env=env)
    if proc.returncode not in ok:
        sys.exit(f"bundlesync {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    for line in proc.stderr.strip().splitlines():
        print(f"    {home.name}: {line}")
    return proc.stdout


def check(ok: bool, what: str) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failures.append(what)


def empty_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA.read_text())
    conn.close()


def rows(conn: sqlite3.Connection, table: str, where: str = "", params: tuple[object, ...] = ()) -> dict[str, dict[str, object]]:
    cur = conn.execute(f'SELECT * FROM "{table}" {where}', params)
    names = [d[0] for d in cur.description]
    return {str(r[names.index("id")]): {n: v for n, v in zip(names, r) if n not in LOCAL_ONLY} for r in cur}


def compare(a: Path, b: Path, tables: list[str], label: str, where: str = "", params: tuple[object, ...] = ()) -> None:
    ca, cb = sqlite3.connect(a), sqlite3.connect(b)
    total, differ = 0, []
    for table in tables:
        left, right = rows(ca, table, where, params), rows(cb, table, where, params)
        total += len(left)
        if left != right:
            keys = sorted(set(left) ^ set(right)) or [k for k in left if left[k] != right.get(k)]
            differ.append(f"{table} ({len(left)} vs {len(right)} rows, e.g. {keys[:1]})")
            if left.keys() == right.keys():
                k = keys[0]
                diff = {c: (left[k][c], right[k][c]) for c in left[k] if left[k][c] != right[k].get(c)}
                differ[-1] += f" {diff}"
    check(not differ, f"{label}: {len(tables)} tables, {total} rows, every column equal"
          + (f"; differ: {'; '.join(differ)}" if differ else ""))


def main(kolibri_db: Path, work: Path) -> int:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    a_db, b_db, l_db, usb = work / "a.sqlite3", work / "b.sqlite3", work / "learner.sqlite3", work / "usb"
    usb.mkdir()
    shutil.copy(kolibri_db, a_db)
    empty_db(b_db)
    empty_db(l_db)
    A, B, L = work / "devA", work / "devB", work / "devL"
    drives = {B: work / "drive-b", L: work / "drive-learner"}
    for drive in drives.values():
        drive.mkdir()
    size_before = a_db.stat().st_size

    conn = sqlite3.connect(a_db)
    profile = bind_profile(load_profile("kolibri"), conn)
    tables = [t.name for t in profile.tables]
    facility, dataset = conn.execute("SELECT id, dataset_id FROM kolibriauth_collection WHERE kind = 'facility'").fetchone()
    # A learner with lessons and quizzes assigned through their memberships.
    learner = conn.execute(
        "SELECT m.user_id FROM kolibriauth_membership m JOIN lessons_lessonassignment a ON a.collection_id = m.collection_id "
        "JOIN lessons_lesson l ON l.id = a.lesson_id AND l.is_active GROUP BY m.user_id ORDER BY count(*) DESC, m.user_id "
        "LIMIT 1").fetchone()[0]
    print(f"Kolibri database {kolibri_db.name}: {size_before} bytes, facility {facility}, learner {learner}")

    print("1. partitions: the profile's, computed in SQL, against Kolibri's own _morango_partition")
    total = bad = 0
    for spec in profile.tables:
        for pk, mine, theirs in conn.execute(f'SELECT t.id, {spec.partition_sql("t")}, t._morango_partition FROM "{spec.name}" AS t'):
            total += 1
            bad += mine != theirs
    counts = {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
    check(bad == 0, f"{total} rows in {len(tables)} tables ({sum(1 for n in counts.values() if n)} non-empty), {bad} differ")
    empty = [t for t, n in counts.items() if not n]
    if empty:
        print(f"    empty tables: {', '.join(empty)}")
    copies_before = {t: rows(conn, t) for t in ("lessons_individualsyncablelesson", "exams_individualsyncableexam")}
    conn.close()

    print("2. devices: A = Kolibri's database (authority), B = empty schema (full), L = learner's device (user:U)")
    cli(A, "init", "--db", str(a_db), "--profile", "kolibri", "--quiet")
    cli(A, "facility", "provision", "--facility", facility, "--quiet")
    size_init = a_db.stat().st_size
    for home, db, scope in ((B, b_db, "full"), (L, l_db, f"user:{learner}")):
        cli(home, "init", "--db", str(db), "--profile", "kolibri", "--quiet")
        request = cli(home, "cert", "request", "--facility", facility, "--scope", scope, "--out", str(usb))
        cli(home, "cert", "install", cli(A, "cert", "issue", request, "--out", str(usb)), "--quiet")
    plugins = subprocess.run([sys.executable, "-m", "bundlesync", "plugins"], capture_output=True, text=True,
                             env={**os.environ, "BUNDLESYNC_HOME": str(A)}).stdout.strip()
    print(f"    plugins: {plugins}")

    print("3. A -> B, full")
    t0 = time.perf_counter()
    bundle = export(A, "--facility", facility, "--out", str(drives[B]))
    cli(B, "import", bundle, "--quiet")
    print(f"    {Path(bundle).stat().st_size} byte bundle, {time.perf_counter() - t0:.1f} s")
    compare(a_db, b_db, tables, "A and B")
    cb = sqlite3.connect(b_db)
    dirty = sum(cb.execute(f'SELECT count(*) FROM "{t}" WHERE _morango_dirty_bit').fetchone()[0] for t in tables)
    check(dirty == 0, f"received rows have a clear Morango dirty bit on B ({dirty} set)")
    cb.close()

    print(f"4. A -> L, single-user export for learner {learner}")
    bundle = export(A, "--facility", facility, "--out", str(drives[L]), "--user", learner)
    cli(L, "import", bundle, "--quiet")
    ca, cl = sqlite3.connect(a_db), sqlite3.connect(l_db)
    copies_after = {t: rows(ca, t) for t in copies_before}
    check(all(copies_before[t] == {k: v for k, v in copies_after[t].items() if k in copies_before[t]} for t in copies_before),
          "the copies Kolibri made on A are the ones the plugin makes (same ids and serialized form: unchanged)")
    for kind, table, assignment, active in (("lessons", "lessons_lesson", "lessons_lessonassignment", "is_active"),
                                            ("quizzes", "exams_exam", "exams_examassignment", "active")):
        ref = "lesson_id" if kind == "lessons" else "exam_id"
        on_a = {r[0] for r in ca.execute(
            f"SELECT DISTINCT a.{ref} FROM {assignment} a JOIN kolibriauth_membership m ON m.collection_id = a.collection_id "
            f"AND m.user_id = ? JOIN {table} x ON x.id = a.{ref} AND x.{active}", (learner,))}
        on_l = {r[0] for r in cl.execute(f"SELECT DISTINCT {ref} FROM {assignment}")}
        titles_a = {r[0] for r in ca.execute(f"SELECT title FROM {table} WHERE id IN ({','.join('?' * len(on_a))})", tuple(on_a))}
        titles_l = {r[0] for r in cl.execute(f"SELECT title FROM {table}")}
        check(bool(on_a) and on_a == on_l and titles_a == titles_l,
              f"{len(on_l)} {kind} assigned to the learner on A are assigned to them on L ({len(on_a)} on A)")
    mine = tuple(f"{dataset}:{s}:{learner}" for s in ("user-ro", "user-rw")) + (f"{dataset}:allusers-ro",)
    sync_tables = [t for t in tables if t not in ("lessons_lesson", "lessons_lessonassignment", "exams_exam",
                                                   "exams_examassignment")]
    ca.close()
    cl.close()
    compare(a_db, l_db, sync_tables, "A and L in the learner's partitions",
            "WHERE _morango_partition IN (?, ?, ?)", mine)

    print("5. edits with plain SQL on A, B and L")
    edits = {
        a_db: ["UPDATE lessons_lesson SET title = 'Renamed on A', _morango_dirty_bit = 1 WHERE id = (SELECT lesson_id FROM lessons_lessonassignment a JOIN kolibriauth_membership m ON m.collection_id = a.collection_id AND m.user_id = :u LIMIT 1)",
               "UPDATE logger_contentsummarylog SET progress = 0.5, _morango_dirty_bit = 1 WHERE id IN (SELECT id FROM logger_contentsummarylog ORDER BY id LIMIT 20)",
               "DELETE FROM logger_attemptlog WHERE id IN (SELECT id FROM logger_attemptlog ORDER BY id LIMIT 10)"],
        b_db: ["UPDATE kolibriauth_facilityuser SET full_name = 'Renamed on B', _morango_dirty_bit = 1 WHERE id = (SELECT min(id) FROM kolibriauth_facilityuser)",
               "UPDATE logger_contentsummarylog SET time_spent = 99.0, _morango_dirty_bit = 1 WHERE id IN (SELECT id FROM logger_contentsummarylog ORDER BY id DESC LIMIT 20)",
               "INSERT INTO kolibriauth_collection (id, _morango_dirty_bit, _morango_source_id, _morango_partition, name, kind, dataset_id, parent_id) "
               "SELECT lower(hex(randomblob(16))), 1, lower(hex(randomblob(16))), dataset_id || ':allusers-ro', 'Class made on B', 'classroom', dataset_id, id FROM kolibriauth_collection WHERE kind = 'facility'"],
        l_db: ["INSERT INTO logger_contentsessionlog (id, _morango_dirty_bit, _morango_source_id, _morango_partition, content_id, start_timestamp, end_timestamp, time_spent, progress, kind, extra_fields, dataset_id, user_id, visitor_id, channel_id) "
               "VALUES (lower(hex(randomblob(16))), 1, 'src', :d || ':user-rw:' || :u, lower(hex(randomblob(16))), '2026-01-01 10:00:00', '2026-01-01 10:05:00', 300.0, 1.0, 'video', '{}', :d, :u, NULL, NULL)",
               "UPDATE logger_masterylog SET complete = 1, _morango_dirty_bit = 1 WHERE user_id = :u"],
    }
    for db, statements in edits.items():
        c = sqlite3.connect(db)
        with c:
            changed = sum(c.execute(s, {"u": learner, "d": dataset}).rowcount for s in statements)
        c.close()
        print(f"    {db.name}: {len(statements)} statements, {changed} rows")

    print("6. sync back: B -> A, L -> A, A -> L, A -> B")
    # Each device has its own drive; the receipts on it tell the sender what that device lacks.
    for sender, receiver, extra in ((B, A, ()), (L, A, ()), (A, L, ("--user", learner)), (A, B, ())):
        drive = drives[receiver if sender == A else sender]
        bundle = export(sender, "--facility", facility, "--out", str(drive), *extra)
        if bundle:
            cli(receiver, "import", bundle, "--quiet")
    compare(a_db, b_db, tables, "A and B after the edits")
    compare(a_db, l_db, sync_tables, "A and L in the learner's partitions after the edits",
            "WHERE _morango_partition IN (?, ?, ?)", mine)
    cl = sqlite3.connect(l_db)
    renamed = cl.execute("SELECT count(*) FROM lessons_lesson WHERE title = 'Renamed on A'").fetchone()[0]
    check(renamed == 1, "the lesson renamed on A is renamed on the learner's device")
    cl.close()

    print("7. what bundlesync adds to the app database")
    names = {}
    for db in (kolibri_db, a_db):
        c = sqlite3.connect(db)
        names[db] = {n for (n,) in c.execute("SELECT name FROM sqlite_master")}
        c.close()
    added = names[a_db] - names[kolibri_db]
    foreign = sorted(n for n in added if not n.startswith(("bundlesync_", "sqlite_autoindex_bundlesync_")))
    check(not foreign, f"{len(added)} tables, indexes and triggers added, every one named bundlesync_*"
          + (f"; not: {foreign}" if foreign else ""))
    print(f"    A's database: {size_before} bytes before init, {size_init} after init, {a_db.stat().st_size} now")
    print("PASS" if not failures else f"FAIL: {len(failures)} check(s) failed")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
