"""Compare every profile table of two app databases row by row; exit 1 on any difference.

Usage: python scripts/compare_dbs.py A.sqlite3 B.sqlite3 PROFILE.yaml
"""

from __future__ import annotations

import sqlite3
import sys

from bundlesync.replica.db import q
from bundlesync.profile import bind_profile, load_profile


def table_rows(conn: sqlite3.Connection, table: str, pk: str) -> list[tuple[object, ...]]:
    return conn.execute(f"SELECT * FROM {q(table)} ORDER BY {q(pk)}").fetchall()


def main(argv: list[str]) -> int:
    a, b = sqlite3.connect(argv[1]), sqlite3.connect(argv[2])
    profile = bind_profile(load_profile(argv[3]), a)
    differ = 0
    for table in profile.tables:
        left, right = table_rows(a, table.name, table.primary_key), table_rows(b, table.name, table.primary_key)
        same = left == right
        differ += not same
        print(f"{'same' if same else 'DIFFERENT':<10} {table.name:<36} {len(left):>8} vs {len(right):>8}")
    print("identical" if not differ else f"{differ} table(s) differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
