"""Enrolling extra devices into a ``pair`` through the CLI (a learner tablet, a third full device)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from conftest import PROFILE, Pair, make_db, run_cli


def learner_of(pair: Pair) -> str:
    """The user with the most session logs in A's database."""
    conn = sqlite3.connect(pair.a_db)
    user = conn.execute("SELECT user_id FROM logger_contentsessionlog WHERE user_id IS NOT NULL GROUP BY user_id "
                        "ORDER BY count(*) DESC LIMIT 1").fetchone()[0]
    conn.close()
    return str(user)


def enrol(pair: Pair, name: str, scope: str, *extra: str) -> Path:
    """A new device home ``name`` with a certificate of ``scope`` issued by A; returns its home."""
    db, home = pair.tmp / f"{name}.sqlite3", pair.tmp / name
    make_db(db, schema_only=True)
    run_cli(home, "init", "--db", str(db), "--profile", str(PROFILE))
    certs = pair.tmp / f"{name}-certs"
    request = run_cli(home, "cert", "request", "--facility", pair.facility, "--scope", scope, "--out", str(certs),
                      *extra).last_line
    run_cli(home, "cert", "install", run_cli(pair.a, "cert", "issue", request, "--out", str(certs)).last_line)
    return home


def status(home: Path) -> dict[str, object]:
    return json.loads(run_cli(home, "status", "--json").out)  # type: ignore[no-any-return]


def cert_list(home: Path) -> dict[str, object]:
    return json.loads(run_cli(home, "cert", "list", "--json").out)  # type: ignore[no-any-return]


def own_cert(home: Path) -> dict[str, object]:
    facilities = cert_list(home)["facilities"]
    return facilities[0]["chain"][0]  # type: ignore[index,no-any-return]
