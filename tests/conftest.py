"""Shared fixtures: fixture databases, device homes, and a subprocess CLI runner."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import pytest

try:  # a clear word instead of a dozen collection errors when run outside scripts/test.sh's venv
    import cryptography  # noqa: F401
    import sqlite_utils  # noqa: F401
    import yaml
    import zstandard  # noqa: F401
except ImportError as exc:  # pragma: no cover
    pytest.exit(f"missing dependency {exc.name!r}: run the tests with scripts/test.sh (it installs them into .venv)",
                returncode=4)

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "fixtures" / "facility_profile.yaml"
sys.path.insert(0, str(ROOT / "scripts"))

import make_facility_db  # noqa: E402


def make_db(path: Path, *, users: int = 8, logs: int = 200, seed: int = 1, schema_only: bool = False) -> str:
    """Write a fixture facility database; return its facility id ('' for schema only)."""
    conn = sqlite3.connect(path)
    try:
        make_facility_db.create_schema(conn)
        facility = "" if schema_only else make_facility_db.populate(conn, users, logs, seed)
        conn.commit()
    finally:
        conn.close()
    return facility


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def last_line(self) -> str:
        lines = self.out.strip().splitlines()
        return lines[-1] if lines else ""


# Mutation testing (scripts/mutation.sh) first maps each test to the library functions it runs.
# A CLI test runs them in a child process, so the child reports what it ran and the test is
# credited with it; otherwise mutants reached only through the CLI would count as untested.
_STATS_CHILD = """
import atexit, json, runpy, sys
from mutmut.state import state
out = sys.argv[1]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(state()._stats))))
sys.argv = ["bundlesync", *sys.argv[2:]]
runpy.run_module("bundlesync", run_name="__main__", alter_sys=True)
"""


def _mutation_stats_file() -> Path:
    fd, name = tempfile.mkstemp(prefix="mutmut-stats-", suffix=".json")
    os.close(fd)
    return Path(name)


def _credit_mutation_stats(path: Path) -> None:
    from mutmut.state import state  # only installed where mutation testing runs

    try:
        state()._stats.update(json.loads(path.read_text() or "[]"))
    finally:
        path.unlink(missing_ok=True)


def run_cli(home: Path | None, *args: str, check: bool = True, env: dict[str, str] | None = None) -> CliResult:
    """Run ``python -m bundlesync`` as a real subprocess."""
    full_env = {k: v for k, v in os.environ.items() if k != "BUNDLESYNC_HOME"}
    if home is not None:
        full_env["BUNDLESYNC_HOME"] = str(home)
    full_env.update(env or {})
    command = [sys.executable, "-m", "bundlesync", *args]
    stats = _mutation_stats_file() if os.environ.get("MUTANT_UNDER_TEST") == "stats" else None
    if stats is not None:
        command = [sys.executable, "-c", _STATS_CHILD, str(stats), *args]
    proc = subprocess.run(command, capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=300)
    if stats is not None:
        _credit_mutation_stats(stats)
    result = CliResult(proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"bundlesync {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return result


def dump_tables(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every app table (not bundlesync's) of a database, rows sorted, for exact comparison."""
    conn = sqlite3.connect(path)
    try:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'bundlesync_%' "
            "AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '\\_sqlite%' ESCAPE '\\' ORDER BY name")]
        return {n: sorted(conn.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr) for n in names}
    finally:
        conn.close()


def store_rows(db: Path | sqlite3.Connection, where: str = "1", params: tuple[object, ...] = ()) -> list[dict[str, Any]]:
    """Rows of the ``bundlesync_store`` view of a device made with :data:`PROFILE`, each record's data spelled out.

    The store leaves out the data of records whose app row encodes to it; this reads it from there.
    """
    from bundlesync.profile import bind_profile, load_profile
    from bundlesync.replica.store import read_records

    conn = sqlite3.connect(db) if isinstance(db, Path) else db
    try:
        return read_records(conn, bind_profile(load_profile(PROFILE), conn), where, params)
    finally:
        if conn is not db:
            conn.close()


@dataclass
class Pair:
    """Two initialised devices: A holds the facility and is its authority, B trusts it with a full cert."""

    tmp: Path
    facility: str
    a_db: Path
    b_db: Path
    a: Path
    b: Path
    usb: Path


def build_pair(root: Path, *, users: int = 8, logs: int = 200, seed: int = 1) -> Pair:
    """Two devices set up through the CLI: A has the data and is the authority, B trusts it (full scope)."""
    a_db, b_db = root / "a.sqlite3", root / "b.sqlite3"
    facility = make_db(a_db, users=users, logs=logs, seed=seed)
    make_db(b_db, schema_only=True)
    a, b, usb = root / "devA", root / "devB", root / "usb"
    usb.mkdir()
    run_cli(a, "init", "--db", str(a_db), "--profile", str(PROFILE))
    run_cli(a, "facility", "provision", "--facility", facility)
    run_cli(b, "init", "--db", str(b_db), "--profile", str(PROFILE))
    request = run_cli(b, "cert", "request", "--facility", facility, "--scope", "full", "--out", str(usb)).last_line
    grant = run_cli(a, "cert", "issue", request, "--out", str(usb)).last_line
    run_cli(b, "cert", "install", grant)
    for f in usb.iterdir():
        f.unlink()
    return Pair(root, facility, a_db, b_db, a, b, usb)


@pytest.fixture(scope="session")
def pair_template(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """Set up once through the CLI (init, provision, cert request/issue/install); copied per test."""
    return build_pair(tmp_path_factory.mktemp("pair-template"))


def copy_pair(t: Pair, dest: Path) -> Pair:
    """A copy of two devices built by :func:`build_pair` in ``dest``, each home's config pointing at its copied DB."""
    for name in ("a.sqlite3", "b.sqlite3"):
        shutil.copy2(t.tmp / name, dest / name)
    for name in ("devA", "devB", "usb"):
        shutil.copytree(t.tmp / name, dest / name)
    for home, db in (("devA", "a.sqlite3"), ("devB", "b.sqlite3")):
        config = dest / home / "config.yaml"
        data = yaml.safe_load(config.read_text())
        data["db"] = str(dest / db)
        config.write_text(yaml.safe_dump(data))
    return Pair(dest, t.facility, dest / "a.sqlite3", dest / "b.sqlite3", dest / "devA", dest / "devB", dest / "usb")


@pytest.fixture
def pair(pair_template: Pair, tmp_path: Path) -> Pair:
    """A fresh copy of the two-device template."""
    return copy_pair(pair_template, tmp_path)


Runner = Callable[..., CliResult]


def state(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every table of a database, bundlesync_* and sqlite_sequence included, rows sorted, plus the schema.

    ``dump_tables`` covers the app tables only; this also catches writes to bundlesync's own
    state (store, FSICs, transfers, change log) and to triggers or indexes.
    """
    conn = sqlite3.connect(path)
    try:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        dump = {n: sorted(conn.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr) for n in names}
        dump["<schema>"] = sorted(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall(),
                                  key=repr)
        return dump
    finally:
        conn.close()


CLOCK_COLUMNS = {"at", "detected_at", "since"}
"""Wall-clock columns of bundlesync's tables: they legitimately differ between two runs."""


def masked_state(db: Path, *, runs: bool = True) -> dict[str, list[tuple[object, ...]]]:
    """``state(db)`` with wall-clock columns of bundlesync's tables blanked.

    ``runs=False`` also blanks what ``bundlesync_transfers`` says of the run that recorded a
    transfer: the path it was given, and its ``stats`` (records new or already here), which
    differ when an interrupted import is completed by a second run although the data ends
    the same.
    """
    full = state(db)
    conn = sqlite3.connect(db)
    try:
        for table in list(full):
            if not table.startswith("bundlesync_"):
                continue
            cols = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
            blank = CLOCK_COLUMNS | ({"stats", "path"} if not runs and table == "bundlesync_transfers" else set())
            masked = [i for i, c in enumerate(cols) if c in blank]
            if masked:
                full[table] = sorted(
                    (tuple(None if i in masked else v for i, v in enumerate(row)) for row in full[table]), key=repr)
    finally:
        conn.close()
    return full


def clone_device(home: Path, db: Path, dest: Path) -> tuple[Path, Path]:
    """A copy of one device (home and database) under ``dest``: ``(home, db)``, the config pointing at the copy."""
    dest.mkdir(parents=True, exist_ok=True)
    new_db, new_home = dest / db.name, dest / home.name
    shutil.copy2(db, new_db)
    shutil.copytree(home, new_home)
    config = new_home / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["db"] = str(new_db)
    config.write_text(yaml.safe_dump(data))
    return new_home, new_db


def app_matches_store(db: Path) -> list[str]:
    """What makes a database not a valid state of the merge; ``[]`` when it is one.

    Valid: no ``bundlesync_applying`` row is left (it would hide the app's edits from
    tracking); every store record that is not waiting (``dirty``) has its app row exactly as
    the store holds it (absent if deleted or purged); every app row is the store's or
    a local edit still in the change log.
    """
    from bundlesync.format.records import data_hash, encode_data
    from bundlesync.profile import bind_profile, load_profile

    problems: list[str] = []
    conn = sqlite3.connect(db)
    try:
        if conn.execute("SELECT count(*) FROM bundlesync_applying").fetchone()[0]:
            problems.append("a bundlesync_applying row is left: the app's edits go untracked")
        changed = set(conn.execute("SELECT model, pk FROM bundlesync_changes").fetchall())
        for table in bind_profile(load_profile(PROFILE), conn).tables:
            cols = ", ".join(f'"{c}"' for c in table.columns)
            app = {str(r[0]): encode_data(table.columns, r[1:]) for r in conn.execute(
                f'SELECT "{table.primary_key}", {cols} FROM "{table.name}"')}
            for record_id, data, digest, gone, dirty in conn.execute(
                    "SELECT id, data, hash, deleted OR purged, dirty FROM bundlesync_store WHERE model = ?",
                    (table.name,)):
                if (table.name, record_id) in changed or dirty:
                    app.pop(record_id, None)
                    continue
                mine = app.pop(record_id, None)
                # Data the store leaves to the app row (NULL) must still be what the stored hash says.
                differs = mine != data if data is not None else mine is None or data_hash(mine) != digest
                if (mine is not None) if gone else differs:
                    problems.append(f"{table.name} {record_id}: app row {mine!r} but store {data!r} (gone={gone})")
            problems += [f"{table.name} {i}: app row neither in the store nor a logged edit"
                         for i in app if (table.name, i) not in changed]
    finally:
        conn.close()
    return problems[:5]
