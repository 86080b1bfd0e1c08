"""Everything bundlesync adds to an app database carries the ``bundlesync_`` prefix."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from conftest import PROFILE, make_db, run_cli

from bundlesync.replica import db


def _schema(path: Path) -> set[tuple[str, str, str]]:
    conn = sqlite3.connect(path)
    try:
        return {(str(t), str(n), str(tbl)) for t, n, tbl in conn.execute("SELECT type, name, tbl_name FROM sqlite_master")}
    finally:
        conn.close()


def _foreign(added: set[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Entries neither named bundlesync_* nor SQLite's own bookkeeping for a bundlesync_* table."""
    return sorted(
        e for e in added
        if not e[1].startswith("bundlesync_")
        and not (e[1].startswith("sqlite_autoindex_bundlesync_") and e[2].startswith("bundlesync_"))
        and e[1] != "sqlite_sequence"  # SQLite's AUTOINCREMENT counter table, shared with the app
    )


def test_init_adds_only_prefixed_tables_indexes_and_triggers(tmp_path: Path) -> None:
    app = tmp_path / "app.sqlite3"
    make_db(app)
    before = _schema(app)
    run_cli(tmp_path / "home", "init", "--db", str(app), "--profile", str(PROFILE))
    added = _schema(app) - before
    assert any(e[1] == "bundlesync_store" for e in added)
    assert any(e[0] == "trigger" for e in added)
    assert _foreign(added) == []


def _legacy_home(tmp_path: Path, other_set: bool) -> Path:
    """An app database initialised by an older bundlesync: its migrations noted in ``_sqlite_migrations``."""
    app = tmp_path / "app.sqlite3"
    make_db(app)
    run_cli(tmp_path / "home", "init", "--db", str(app), "--profile", str(PROFILE))
    conn = sqlite3.connect(app)
    with conn:
        conn.execute("CREATE TABLE _sqlite_migrations (id INTEGER PRIMARY KEY, migration_set TEXT, name TEXT, "
                     "applied_at TEXT)")
        conn.execute("CREATE UNIQUE INDEX idx__sqlite_migrations_migration_set_name "
                     "ON _sqlite_migrations (migration_set, name)")
        conn.execute("INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
                     "SELECT migration_set, name, applied_at FROM bundlesync_migrations")
        conn.execute("DROP TABLE bundlesync_migrations")
        if other_set:
            conn.execute("INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
                         "VALUES ('the_app', 'm001', '2024-01-01')")
    conn.close()
    return app


def test_an_existing_home_moves_its_migration_rows_and_drops_the_old_table(tmp_path: Path) -> None:
    app = _legacy_home(tmp_path, other_set=False)
    run_cli(tmp_path / "home", "status")  # any command opens the home and migrates it
    conn = sqlite3.connect(app)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "_sqlite_migrations" not in names and "idx__sqlite_migrations_migration_set_name" not in names
    moved = [r[0] for r in conn.execute("SELECT name FROM bundlesync_migrations ORDER BY id")]
    assert moved == [step.__name__ for step in db._STEPS]  # nothing re-applied, nothing lost
    conn.close()


def test_an_existing_home_leaves_other_migration_sets_in_place(tmp_path: Path) -> None:
    app = _legacy_home(tmp_path, other_set=True)
    run_cli(tmp_path / "home", "status")
    conn = sqlite3.connect(app)
    assert conn.execute("SELECT migration_set, name FROM _sqlite_migrations").fetchall() == [("the_app", "m001")]
    assert conn.execute("SELECT count(*) FROM bundlesync_migrations WHERE migration_set = 'bundlesync'").fetchone()[0]
    conn.close()
