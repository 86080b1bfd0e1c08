"""Odd values in app rows never wedge a device: each is synced exactly or held back, the rest goes on.

- TEXT whose bytes are not valid UTF-8 (SQLite stores whatever it is given) used to fail every
  export and import ("Could not decode to UTF-8 column"). It now syncs with identical bytes.
- A value too large for a record (17 MB) used to end every export in a traceback. The row is now
  held back with its reason (export warns, ``status`` lists it) and the rest syncs; once the app
  makes it smaller, it syncs too.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from conftest import Pair, run_cli

USERS = "kolibriauth_facilityuser"


def sql(db: Path, statement: str, *params: object) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    conn.text_factory = bytes  # the rows hold bytes Python cannot decode
    try:
        rows = conn.execute(statement, params).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def first_sync(pair: Pair) -> list[str]:
    """Export everything from A into B; return two user ids."""
    bundle = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb)).last_line
    run_cli(pair.b, "import", "--no-receipt", bundle)
    return [bytes(r[0]).decode() for r in sql(pair.a_db, f"SELECT id FROM {USERS} ORDER BY id LIMIT 2")]


def test_text_that_is_not_utf8_syncs_exactly_both_ways(pair: Pair) -> None:
    odd, plain = first_sync(pair)
    sql(pair.a_db, f"UPDATE {USERS} SET extra_fields = CAST(X'66FF6F' AS TEXT) WHERE id = ?", odd)
    sql(pair.a_db, f"UPDATE {USERS} SET full_name = 'Renamed on A' WHERE id = ?", plain)
    export = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb))
    assert "Traceback" not in export.err
    imported = run_cli(pair.b, "import", "--no-receipt", export.last_line)
    assert "Traceback" not in imported.err
    query = f"SELECT typeof(extra_fields), hex(extra_fields) FROM {USERS} WHERE id = ?"
    assert sql(pair.b_db, query, odd) == [(b"text", b"66FF6F")]
    assert sql(pair.b_db, f"SELECT full_name FROM {USERS} WHERE id = ?", plain) == [(b"Renamed on A",)]
    # B holds the odd value itself now: its own imports and exports go on, and it travels back unchanged.
    sql(pair.b_db, f"UPDATE {USERS} SET extra_fields = CAST(X'C0FFEE' AS TEXT) WHERE id = ?", odd)
    back = run_cli(pair.b, "export", "--facility", pair.facility, "--out", str(pair.usb)).last_line
    run_cli(pair.a, "import", "--no-receipt", back)
    assert sql(pair.a_db, query, odd) == [(b"text", b"C0FFEE")]
    status = json.loads(run_cli(pair.a, "status", "--json").out)
    assert status["held_back"]["count"] == 0


def test_a_primary_key_that_is_not_utf8_is_held_back_and_the_rest_syncs(pair: Pair) -> None:
    _, plain = first_sync(pair)
    columns = [str(r[1], "utf-8") for r in sql(pair.a_db, f"PRAGMA table_info({USERS})")]
    select = ", ".join("CAST(X'6964FF' AS TEXT)" if c == "id" else "'odd-user'" if c == "username" else f'"{c}"' for c in columns)
    sql(pair.a_db, f"INSERT INTO {USERS} SELECT {select} FROM {USERS} WHERE id = ?", plain)
    sql(pair.a_db, f"UPDATE {USERS} SET full_name = 'Still synced' WHERE id = ?", plain)
    export = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb))
    assert "held back" in export.err and "x'6964ff'" in export.err, export.err
    run_cli(pair.b, "import", "--no-receipt", export.last_line)
    assert sql(pair.b_db, f"SELECT full_name FROM {USERS} WHERE id = ?", plain) == [(b"Still synced",)]
    status = run_cli(pair.a, "status")
    assert "held back  1 row(s)" in status.out and "not valid UTF-8" in status.out, status.out


def test_a_value_too_large_for_a_record_is_held_back_then_synced_when_fixed(pair: Pair) -> None:
    big, plain = first_sync(pair)
    sql(pair.a_db, f"UPDATE {USERS} SET extra_fields = hex(zeroblob(8500000)) WHERE id = ?", big)  # 17 MB of TEXT
    sql(pair.a_db, f"UPDATE {USERS} SET full_name = 'Renamed on A' WHERE id = ?", plain)
    export = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb))
    assert "Traceback" not in export.err
    warning = [line for line in export.err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and big in warning[0] and "over the 15728640 byte limit" in warning[0], export.err
    status = json.loads(run_cli(pair.a, "status", "--json").out)
    assert status["held_back"]["count"] == 1 and status["held_back"]["rows"][0]["id"] == big
    run_cli(pair.b, "import", "--no-receipt", export.last_line)
    assert sql(pair.b_db, f"SELECT full_name FROM {USERS} WHERE id = ?", plain) == [(b"Renamed on A",)]
    assert sql(pair.b_db, f"SELECT length(extra_fields) > 1000 FROM {USERS} WHERE id = ?", big) == [(0,)]
    # The app makes the value smaller: the row is let go and syncs.
    sql(pair.a_db, f"UPDATE {USERS} SET extra_fields = 'small again' WHERE id = ?", big)
    again = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb))
    assert "held back" not in again.err
    run_cli(pair.b, "import", "--no-receipt", again.last_line)
    assert sql(pair.b_db, f"SELECT extra_fields FROM {USERS} WHERE id = ?", big) == [(b"small again",)]
    assert json.loads(run_cli(pair.a, "status", "--json").out)["held_back"]["count"] == 0
