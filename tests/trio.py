"""Three devices set up through the CLI, for tests of what one device accepts from another.

A holds the facility and is its authority, B has a full-facility certificate and holds
everything, L is learner U's tablet (a ``user:U`` certificate) and holds what U may read.
The template is built once per test module; each test gets a fresh copy.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import PROFILE, build_pair, run_cli

LOGS = "logger_contentsessionlog"
USERS = "kolibriauth_facilityuser"


@dataclass
class Trio:
    root: Path
    facility: str
    dataset: str
    user: str  # U: the learner of L
    other: str  # V: another learner
    a_db: Path
    b_db: Path
    l_db: Path
    a: Path
    b: Path
    l: Path
    usb: Path

    def sql(self, db: Path, statement: str, params: tuple[object, ...] = ()) -> None:
        conn = sqlite3.connect(db)
        conn.execute(statement, params)
        conn.commit()
        conn.close()

    def one(self, db: Path, statement: str, params: tuple[object, ...] = ()) -> Any:
        conn = sqlite3.connect(db)
        try:
            row = conn.execute(statement, params).fetchone()
            return None if row is None else row[0]
        finally:
            conn.close()

    def drive(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(exist_ok=True)
        return path

    def export(self, home: Path, out: Path, *extra: str) -> Path:
        res = run_cli(home, "export", "--facility", self.facility, "--out", str(out), "--no-encrypt", *extra)
        path = Path(res.last_line)
        assert path.is_file(), res
        return path

    def import_json(self, home: Path, *bundles: Path, receipt: bool = True) -> list[dict[str, Any]]:
        args = ["import", *map(str, bundles), "--json"] + ([] if receipt else ["--no-receipt"])
        res = run_cli(home, *args, check=False)
        reports: list[dict[str, Any]] = json.loads(res.out)
        # Exit 9 exactly when some record was refused or left waiting (the import told the truth).
        partial = any(r.get("refused") or r.get("waiting") or r.get("failed") or r.get("gaps") for r in reports)
        assert res.code == (9 if partial else 0), res
        return reports


def _learner_pair(db: Path) -> tuple[str, str]:
    """U, the user with the most session logs, and V, another user with logs."""
    conn = sqlite3.connect(db)
    try:
        users = [r[0] for r in conn.execute(
            f"SELECT user_id FROM {LOGS} WHERE user_id IS NOT NULL GROUP BY user_id ORDER BY count(*) DESC, user_id")]
        return users[0], users[1]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def trio_template(tmp_path_factory: pytest.TempPathFactory) -> Trio:
    root = tmp_path_factory.mktemp("trio")
    p = build_pair(root)
    user, other = _learner_pair(p.a_db)
    dataset = str(sqlite3.connect(p.a_db).execute(f"SELECT dataset_id FROM {USERS} LIMIT 1").fetchone()[0])
    l_db, l_home = root / "l.sqlite3", root / "devL"
    shutil.copy2(p.b_db, l_db)  # the same empty schema as B's
    run_cli(l_home, "init", "--db", str(l_db), "--profile", str(PROFILE))
    request = run_cli(l_home, "cert", "request", "--facility", p.facility, "--scope", f"user:{user}",
                      "--out", str(p.usb)).last_line
    run_cli(l_home, "cert", "install", run_cli(p.a, "cert", "issue", request, "--out", str(p.usb)).last_line)
    t = Trio(root, p.facility, dataset, user, other, p.a_db, p.b_db, l_db, p.a, p.b, l_home, p.usb)
    # B holds everything; L holds what U may read.
    run_cli(p.b, "import", str(t.export(p.a, t.drive("a-full"))))
    run_cli(l_home, "import", str(t.export(p.a, t.drive("a-for-u"), "--user", user)))
    for f in p.usb.iterdir():
        f.unlink()
    return t


@pytest.fixture
def trio(trio_template: Trio, tmp_path: Path) -> Trio:
    """A fresh copy of the three devices, each home's config pointing at its copied database."""
    t = trio_template
    for name in ("a.sqlite3", "b.sqlite3", "l.sqlite3"):
        shutil.copy2(t.root / name, tmp_path / name)
    for home, db in (("devA", "a.sqlite3"), ("devB", "b.sqlite3"), ("devL", "l.sqlite3")):
        shutil.copytree(t.root / home, tmp_path / home)
        config = tmp_path / home / "config.yaml"
        data = yaml.safe_load(config.read_text())
        data["db"] = str(tmp_path / db)
        config.write_text(yaml.safe_dump(data))
    (tmp_path / "usb").mkdir()
    return replace(t, root=tmp_path, a_db=tmp_path / "a.sqlite3", b_db=tmp_path / "b.sqlite3",
                   l_db=tmp_path / "l.sqlite3", a=tmp_path / "devA", b=tmp_path / "devB", l=tmp_path / "devL",
                   usb=tmp_path / "usb")
