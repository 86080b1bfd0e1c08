"""Nothing lost: damaged homes and app upgrades, through the real CLI.

Each case is one a school meets without doing anything wrong: the app rebuilds a table
during an upgrade (the tracking triggers go with it), the profile file changes under an
initialised device, a database is restored from a backup or copied from another device,
a purge is given a wrong user id, the device key is deleted. Each must be detected before
the change log is trusted, and either repaired without losing a change or refused with
one line that says what to do. App rows are compared on both devices after the next sync.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from conftest import PROFILE, ROOT, CliResult, Pair, dump_tables, make_db, run_cli, state, store_rows

from bundlesync.trust.crypto import SigningKey, save_private_key

SMALL_TABLE = "logger_examattemptlog"  # a leaf table: no other table references it


# --------------------------------------------------------------------------- helpers


def _sql(db: Path, *statements: str) -> None:
    conn = sqlite3.connect(db)
    try:
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


def _one(db: Path, sql: str) -> Any:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def _rows(db: Path, sql: str) -> list[Any]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _export(home: Path, facility: str, usb: Path) -> Path:
    res = run_cli(home, "export", "--facility", facility, "--out", str(usb))
    path = Path(res.last_line) if res.last_line else None
    assert path is not None and path.is_file(), f"export wrote no bundle: {res.err}"
    return path


def _sync(src: Path, dst: Path, facility: str, usb: Path) -> None:
    run_cli(dst, "import", str(_export(src, facility, usb)))


def _one_line_error(res: CliResult, code: int) -> str:
    assert res.code == code, (res.code, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.err
    assert "Traceback" not in res.err + res.out
    return lines[0]


def _status(home: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(run_cli(home, "status", "--json").out)
    return doc


def _rebuild_the_django_way(db: Path, table: str) -> None:
    """What Django's SQLite schema editor does for most migrations: copy into new__T, drop T, rename."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()[0]
        indexes = [r[0] for r in conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL", (table,))]
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("BEGIN")
        conn.execute(sql.replace(f"CREATE TABLE {table}", f'CREATE TABLE "new__{table}"', 1))
        conn.execute(f'INSERT INTO "new__{table}" SELECT * FROM "{table}"')
        conn.execute(f'DROP TABLE "{table}"')
        conn.execute(f'ALTER TABLE "new__{table}" RENAME TO "{table}"')
        for index in indexes:
            conn.execute(index)
        conn.execute("COMMIT")
    finally:
        conn.close()


def _profile_without(table: str, out: Path) -> Path:
    data = yaml.safe_load(PROFILE.read_text())
    data["tables"] = [t for t in data["tables"] if t["name"] != table]
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _use_profile(home: Path, profile: Path) -> None:
    config = home / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["profile"] = str(profile)
    config.write_text(yaml.safe_dump(data))


def _triggers(db: Path, table: str) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ? ORDER BY name", (table,))]
    finally:
        conn.close()


# --------------------------------------------------------------------------- the app rebuilds a table


def test_table_rebuilt_by_a_migration_loses_no_change(pair: Pair) -> None:
    _sync(pair.a, pair.b, pair.facility, pair.usb)
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)
    table = "logger_attemptlog"
    ids = [r[0] for r in sqlite3.connect(pair.a_db).execute(f"SELECT id FROM {table} ORDER BY id LIMIT 5")]
    _rebuild_the_django_way(pair.a_db, table)
    assert _triggers(pair.a_db, table) == []  # the migration took bundlesync's tracking with it
    # The app keeps working on the rebuilt table: two updates, one insert, two deletes.
    _sql(pair.a_db,
         f"UPDATE {table} SET correct = 1 - correct, answer = 'after the upgrade' WHERE id IN ('{ids[0]}', '{ids[1]}')",
         f"INSERT INTO {table} SELECT 'abcdefabcdefabcdefabcdefabcdef01', " +
         ", ".join(f'"{c}"' for c in _columns(pair.a_db, table)[1:]) + f" FROM {table} WHERE id = '{ids[2]}'",
         f"DELETE FROM {table} WHERE id IN ('{ids[3]}', '{ids[4]}')")

    _sync(pair.a, pair.b, pair.facility, pair.usb)
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)
    assert _one(pair.b_db, f"SELECT count(*) FROM {table} WHERE id IN ('{ids[3]}', '{ids[4]}')") == 0
    assert len(_triggers(pair.a_db, table)) >= 3  # tracking is back

    status = _status(pair.a)
    [repair] = [r for r in status["repairs"] if r["table"] == table]
    assert repair["changes"] == 5 and "missing" in repair["what"]
    assert table in run_cli(pair.a, "status").out
    # Later edits are tracked again by the reinstalled triggers.
    _sql(pair.a_db, f"UPDATE {table} SET answer = 'tracked again' WHERE id = '{ids[0]}'")
    assert _status(pair.a)["pending_changes"] == 1


def test_unique_index_added_by_an_upgrade_gets_tracked(pair: Pair) -> None:
    _sync(pair.a, pair.b, pair.facility, pair.usb)
    table = "kolibriauth_membership"
    _sql(pair.a_db, f"CREATE UNIQUE INDEX membership_user_collection ON {table} (user_id, collection_id)")
    status = _status(pair.a)  # the next command installs the trigger that sees OR REPLACE through this index
    assert any(r["table"] == table and r["what"] == "stale" for r in status["repairs"])
    _sql(pair.a_db, f"INSERT OR REPLACE INTO {table} SELECT 'abcdefabcdefabcdefabcdefabcdef02', user_id, collection_id, "
                    f"dataset_id FROM {table} WHERE id = (SELECT min(id) FROM {table})")
    _sync(pair.a, pair.b, pair.facility, pair.usb)
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)


def _columns(db: Path, table: str) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
    finally:
        conn.close()


def test_tracking_check_is_cheap_when_nothing_is_wrong(pair: Pair) -> None:
    before = state(pair.a_db)
    run_cli(pair.a, "status")
    assert state(pair.a_db) == before  # a healthy device writes nothing on open


# --------------------------------------------------------------------------- the profile changes


def _pair_with_profile(root: Path, profile: Path) -> Pair:
    a_db, b_db = root / "a.sqlite3", root / "b.sqlite3"
    facility = make_db(a_db, users=6, logs=120, seed=3)
    make_db(b_db, schema_only=True)
    a, b, usb = root / "devA", root / "devB", root / "usb"
    usb.mkdir()
    run_cli(a, "init", "--db", str(a_db), "--profile", str(profile))
    run_cli(a, "facility", "provision", "--facility", facility)
    run_cli(b, "init", "--db", str(b_db), "--profile", str(profile))
    request = run_cli(b, "cert", "request", "--facility", facility, "--scope", "full", "--out", str(usb)).last_line
    run_cli(b, "cert", "install", run_cli(a, "cert", "issue", request, "--out", str(usb)).last_line)
    for f in usb.iterdir():
        f.unlink()
    return Pair(root, facility, a_db, b_db, a, b, usb)


def test_table_added_to_the_profile_is_tracked_and_sent(tmp_path: Path) -> None:
    profile = _profile_without(SMALL_TABLE, tmp_path / "profile.yaml")
    p = _pair_with_profile(tmp_path, profile)
    _sync(p.a, p.b, p.facility, p.usb)
    assert _one(p.b_db, f"SELECT count(*) FROM {SMALL_TABLE}") == 0 < _one(p.a_db, f"SELECT count(*) FROM {SMALL_TABLE}")

    shutil.copy(PROFILE, profile)  # both devices' profile now lists the table (same name and version)
    _sync(p.a, p.b, p.facility, p.usb)
    assert dump_tables(p.a_db) == dump_tables(p.b_db)
    assert len(_triggers(p.a_db, SMALL_TABLE)) >= 3
    repairs = [r for r in _status(p.a)["repairs"] if r["table"] == SMALL_TABLE]
    assert repairs and "added" in repairs[0]["what"]
    assert repairs[0]["changes"] == _one(p.a_db, f"SELECT count(*) FROM {SMALL_TABLE}")


def test_table_removed_from_the_profile_stops_piling_up(pair: Pair) -> None:
    profile = pair.tmp / "profile.yaml"
    shutil.copy(PROFILE, profile)
    _use_profile(pair.a, profile)
    _use_profile(pair.b, profile)
    _sync(pair.a, pair.b, pair.facility, pair.usb)

    _profile_without(SMALL_TABLE, profile)
    _sql(pair.a_db, f"UPDATE {SMALL_TABLE} SET answer = 'not synced any more' WHERE id = (SELECT min(id) FROM {SMALL_TABLE})",
         "UPDATE logger_contentsessionlog SET progress = 0.5 WHERE id = (SELECT min(id) FROM logger_contentsessionlog)")
    assert _status(pair.a)["pending_changes"] == 1  # only the change of a table the profile still syncs
    assert _triggers(pair.a_db, SMALL_TABLE) == []
    _sync(pair.a, pair.b, pair.facility, pair.usb)
    a, b = dump_tables(pair.a_db), dump_tables(pair.b_db)
    assert a.pop(SMALL_TABLE) != b.pop(SMALL_TABLE)
    assert a == b
    assert _status(pair.a)["pending_changes"] == 0
    assert any(r["table"] == SMALL_TABLE and "removed" in r["what"] for r in _status(pair.a)["repairs"])


# --------------------------------------------------------------------------- restored or copied database


def _versions(db: Path) -> dict[tuple[str, str, str, int], str]:
    conn = sqlite3.connect(db)
    try:
        return {(r["model"], r["id"], r["inst"], r["ctr"]): r["data"] for r in store_rows(conn)}
    finally:
        conn.close()


def test_database_copied_from_another_device_is_refused_until_reidentified(pair: Pair) -> None:
    _sync(pair.a, pair.b, pair.facility, pair.usb)
    _sql(pair.b_db, "UPDATE kolibriauth_facilityuser SET full_name = 'edited on B' "
                    "WHERE id = (SELECT min(id) FROM kolibriauth_facilityuser)")
    run_cli(pair.b, "status")
    b_instance = _status(pair.b)["instance_id"]
    shutil.copy(pair.b_db, pair.a_db)  # B's initialised database put on A
    _sql(pair.a_db, "UPDATE kolibriauth_facilityuser SET full_name = 'edited on A after the copy' "
                    "WHERE id = (SELECT max(id) FROM kolibriauth_facilityuser)")
    before, files = state(pair.a_db), sorted(pair.usb.iterdir())

    res = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), check=False)
    line = _one_line_error(res, 3)
    assert "bundlesync reidentify" in line and b_instance[:8] in line
    assert sorted(pair.usb.iterdir()) == files and state(pair.a_db) == before

    out = run_cli(pair.a, "reidentify")
    a_instance = _status(pair.a)["instance_id"]
    assert a_instance != b_instance and a_instance in out.err
    # Nothing pending is lost: B's edit that came with the copy, and A's made after it.
    assert _status(pair.a)["pending_changes"] == 2

    _sync(pair.a, pair.b, pair.facility, pair.usb)
    _sync(pair.b, pair.a, pair.facility, pair.usb)
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)
    assert _one(pair.b_db, "SELECT count(*) FROM kolibriauth_facilityuser WHERE full_name = 'edited on A after the copy'") == 1
    # Every (writer, counter) names the same version on both devices: no counter was used twice.
    va, vb = _versions(pair.a_db), _versions(pair.b_db)
    assert va == vb
    assert a_instance in {inst for (_, _, inst, _) in va}
    # B's edit came to A with the copy and was re-serialized there under A's new identity, while B
    # serialized its own: two concurrent versions with the same edit time. The merge key picks one
    # (the instance id breaks the tie); where B's lost, B keeps it in its conflict log.
    losers = {json.loads(text)["inst"] for (text,) in _rows(pair.b_db, "SELECT loser FROM bundlesync_conflicts")}
    assert b_instance in {inst for (_, _, inst, _) in vb} | losers


def test_database_restored_from_an_older_backup_is_refused(pair: Pair) -> None:
    backup = pair.tmp / "a-backup.sqlite3"
    shutil.copy(pair.a_db, backup)
    _sync(pair.a, pair.b, pair.facility, pair.usb)  # the counter moves past the backup's
    shutil.copy(backup, pair.a_db)
    res = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), check=False)
    line = _one_line_error(res, 3)
    assert "backup" in line and "bundlesync reidentify" in line
    run_cli(pair.a, "reidentify")
    _sync(pair.a, pair.b, pair.facility, pair.usb)
    _sync(pair.b, pair.a, pair.facility, pair.usb)
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)


# --------------------------------------------------------------------------- purge


def _learner(db: Path) -> str:
    return str(_one(db, "SELECT user_id FROM kolibriauth_membership ORDER BY user_id LIMIT 1"))


def test_purge_of_a_user_id_that_is_no_user_changes_nothing(pair: Pair) -> None:
    learner = _learner(pair.a_db)
    for wrong in ("a", learner[:8]):  # "a" is inside the dataset id; a prefix of a real user id
        before = state(pair.a_db)
        res = run_cli(pair.a, "purge", "--facility", pair.facility, "--user", wrong, "--yes", check=False)
        line = _one_line_error(res, 3)
        assert f"user {wrong}" in line
        assert state(pair.a_db) == before
    assert _one(pair.a_db, "SELECT count(*) FROM kolibriauth_collection WHERE kind = 'facility'") == 1


def test_purge_needs_confirmation(pair: Pair) -> None:
    learner = _learner(pair.a_db)
    before = state(pair.a_db)
    res = run_cli(pair.a, "purge", "--facility", pair.facility, "--user", learner, check=False)
    line = _one_line_error(res, 2)
    assert "--yes" in line
    assert state(pair.a_db) == before
    # On a terminal it asks; anything but yes changes nothing.
    assert _purge_on_a_terminal(pair, learner, b"n\n") != 0
    assert state(pair.a_db) == before


def _purge_on_a_terminal(pair: Pair, user: str, answer: bytes) -> int:
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "BUNDLESYNC_HOME"} | {"BUNDLESYNC_HOME": str(pair.a)}
    proc = subprocess.Popen([sys.executable, "-m", "bundlesync", "purge", "--facility", pair.facility, "--user", user],
                            stdin=follower, stdout=follower, stderr=follower, env=env, cwd=ROOT)
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 60
    while b"[y/N]" not in seen and time.monotonic() < deadline:
        if select.select([leader], [], [], 1)[0]:
            try:
                seen += os.read(leader, 4096)
            except OSError:
                break
    assert re.search(rb"purge .* record", seen, re.IGNORECASE), seen
    os.write(leader, answer)
    code = proc.wait(timeout=60)
    os.close(leader)
    return code


def test_purge_with_yes_erases_one_user_and_travels(pair: Pair) -> None:
    _sync(pair.a, pair.b, pair.facility, pair.usb)
    learner = _learner(pair.a_db)
    collections = _one(pair.a_db, "SELECT count(*) FROM kolibriauth_collection")
    res = run_cli(pair.a, "purge", "--facility", pair.facility, "--user", learner, "--yes")
    assert "purged" in res.err
    for db in (pair.a_db,):
        assert _one(db, f"SELECT count(*) FROM kolibriauth_facilityuser WHERE id = '{learner}'") == 0
        assert _one(db, f"SELECT count(*) FROM kolibriauth_membership WHERE user_id = '{learner}'") == 0
    _sync(pair.a, pair.b, pair.facility, pair.usb)
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)
    assert _one(pair.b_db, f"SELECT count(*) FROM kolibriauth_facilityuser WHERE id = '{learner}'") == 0
    assert _one(pair.b_db, "SELECT count(*) FROM kolibriauth_collection") == collections
    assert _one(pair.b_db, "SELECT count(*) FROM kolibriauth_facilityuser") > 0


# --------------------------------------------------------------------------- device.key


def _key(home: Path) -> Path:
    return home / "keys" / "device.key"


def _damage_key(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    elif how == "damaged":
        path.write_bytes(b"not a key at all")
    else:
        path.unlink()
        save_private_key(path, SigningKey.generate(), exclusive=True)


def test_device_key_missing_damaged_or_foreign_is_refused_up_front(pair: Pair) -> None:
    _sync(pair.a, pair.b, pair.facility, pair.usb)
    _sql(pair.b_db, "UPDATE kolibriauth_facilityuser SET full_name = 'edited on B' "
                    "WHERE id = (SELECT min(id) FROM kolibriauth_facilityuser)")
    original = _key(pair.b).read_bytes()
    for how in ("deleted", "damaged", "foreign"):
        _damage_key(_key(pair.b), how)
        kept = _key(pair.b).read_bytes() if _key(pair.b).exists() else None
        before, files = state(pair.b_db), sorted(pair.usb.iterdir())
        res = run_cli(pair.b, "export", "--facility", pair.facility, "--out", str(pair.usb), check=False)
        line = _one_line_error(res, 3)
        assert "cert request" in line and "cert install" in line, line
        assert sorted(pair.usb.iterdir()) == files and state(pair.b_db) == before
        assert (_key(pair.b).read_bytes() if _key(pair.b).exists() else None) == kept  # no silent new key
        _key(pair.b).unlink(missing_ok=True)
        _key(pair.b).write_bytes(original)
        _key(pair.b).chmod(0o600)


def test_device_key_deleted_recovers_by_a_new_certificate(pair: Pair) -> None:
    _sync(pair.a, pair.b, pair.facility, pair.usb)
    _sql(pair.b_db, "UPDATE kolibriauth_facilityuser SET full_name = 'edited on B' "
                    "WHERE id = (SELECT min(id) FROM kolibriauth_facilityuser)")
    _key(pair.b).unlink()
    refused = run_cli(pair.b, "export", "--facility", pair.facility, "--out", str(pair.usb), check=False)
    assert refused.code == 3 and not _key(pair.b).exists()
    request = run_cli(pair.b, "cert", "request", "--facility", pair.facility, "--scope", "full",
                      "--out", str(pair.usb)).last_line
    run_cli(pair.b, "cert", "install", run_cli(pair.a, "cert", "issue", request, "--out", str(pair.usb)).last_line)
    _sync(pair.b, pair.a, pair.facility, pair.usb)
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)
