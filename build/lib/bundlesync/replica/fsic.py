"""Filter-specific instance counters (FSIC): what a device knows it holds.

``bundlesync_fsic`` rows say "for partitions under prefix P, I hold everything
instance I wrote up to counter C" (Morango's DatabaseMaxCounter). For a filter
(a set of partition prefixes) two views exist, as in Morango:

- what I *hold* for the filter: per instance, the minimum over the filter's
  prefixes (a claim must hold for every part), each taken as the maximum over
  the rows whose partition is a prefix of it;
A bundle carries the sender's *basis* (what it assumed the receiver holds) and
*result* (what the sender held for every prefix of the filter, so a receiver never
claims more than was there to send). The receiver advances its counters for an
instance only if it already held at least the basis, so knowledge never jumps
over a bundle it did not see (history stays contiguous); otherwise it records
a gap and says how to fill it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence

from bundlesync.partitions import within

__all__ = [
    "Fsic",
    "advance",
    "held",
    "missing",
    "pointwise_min",
    "read_rows",
]

Fsic = dict[str, int]
Row = tuple[str, str, int]


def read_rows(conn: sqlite3.Connection) -> list[Row]:
    """All knowledge rows ``(partition, inst, ctr)``; there is one per partition and instance."""
    return [(p, i, c) for p, i, c in conn.execute("SELECT partition, inst, ctr FROM bundlesync_fsic")]


def _for_prefix(rows: Iterable[Row], prefix: str) -> Fsic:
    out: Fsic = {}
    for partition, inst, ctr in rows:
        if within(prefix, [partition]) and out.get(inst, 0) < ctr:
            out[inst] = ctr
    return out


def held(rows: Sequence[Row], prefixes: Sequence[str]) -> Fsic:
    """Per instance, the counter I hold for *every* prefix of the filter."""
    result: Fsic | None = None
    for prefix in prefixes:
        one = _for_prefix(rows, prefix)
        result = one if result is None else {i: min(c, one[i]) for i, c in result.items() if i in one}
    return result or {}


def pointwise_min(fsics: Iterable[Mapping[str, int]]) -> Fsic:
    """What *all* of several peers hold: instances missing from one count as 0."""
    items = list(fsics)
    if not items:
        return {}
    keys = set(items[0]).intersection(*items[1:])
    return {k: min(f[k] for f in items) for k in keys}


def missing(have: Mapping[str, int], basis: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """Instances whose history between ``have`` and ``basis`` this device never saw."""
    return {i: (have.get(i, 0), need) for i, need in basis.items() if have.get(i, 0) < need}


def advance(
    conn: sqlite3.Connection,
    prefixes: Sequence[str],
    basis: Mapping[str, int],
    result: Mapping[str, int],
) -> dict[str, tuple[int, int]]:
    """Raise knowledge to ``result`` where contiguous with ``basis``; return the gaps.

    Must run inside the import's write transaction.
    """
    have = held(read_rows(conn), prefixes)
    gaps = missing(have, basis)
    rows = [
        (prefix, inst, ctr)
        for inst, ctr in result.items()
        if inst not in gaps and have.get(inst, 0) < ctr
        for prefix in prefixes
    ]
    conn.executemany(
        "INSERT INTO bundlesync_fsic (partition, inst, ctr) VALUES (?, ?, ?) "
        "ON CONFLICT (partition, inst) DO UPDATE SET ctr = max(ctr, excluded.ctr)",
        rows,
    )
    return gaps
