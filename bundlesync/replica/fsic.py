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

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence

from bundlesync.partitions import within
from bundlesync.replica import knowledge as kn
from bundlesync.replica.knowledge import Knowledge

__all__ = [
    "Fsic",
    "advance",
    "advance_knowledge",
    "held",
    "missing",
    "pointwise_min",
    "pending_instances",
    "read_knowledge",
    "read_rows",
    "resolve_pending",
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


def read_knowledge(conn: sqlite3.Connection) -> Knowledge:
    """This device's knowledge, per prefix (see :mod:`bundlesync.replica.knowledge`)."""
    out: Knowledge = {}
    for partition, inst, ctr in read_rows(conn):
        out.setdefault(partition, {})[inst] = ctr
    return out


def _store(conn: sqlite3.Connection, rows: Iterable[Row]) -> None:
    conn.executemany(
        "INSERT INTO bundlesync_fsic (partition, inst, ctr) VALUES (?, ?, ?) "
        "ON CONFLICT (partition, inst) DO UPDATE SET ctr = max(ctr, excluded.ctr)",
        list(rows),
    )


def advance_knowledge(
    conn: sqlite3.Connection,
    region: Sequence[str],
    basis: Mapping[str, Mapping[str, int]],
    result: Mapping[str, Mapping[str, int]],
    *,
    dataset_id: str = "",
    bundle_id: str = "",
) -> dict[str, tuple[int, int]]:
    """Raise knowledge under ``region`` to ``result`` where contiguous with ``basis``; return the gaps.

    A claim "``inst`` up to ``ctr`` under ``q``" is taken only if this device already held
    what the sender assumed it held for ``q`` and every part below it: the bundle left those
    records out. Otherwise the claim waits in ``bundlesync_pending`` and is taken as soon as
    a later import fills the gap (the records it carried are in the store already), so
    knowledge catches up with what is held whatever order bundles arrive in.
    Must run inside the import's write transaction.
    """
    have = read_knowledge(conn)
    claims = kn.clip(result, region)
    assumed = kn.clip(basis, region)
    gaps: dict[str, tuple[int, int]] = {}
    taken: list[Row] = []
    waiting: list[tuple[str, str, str, int, str, str]] = []
    for prefix, counters in claims.items():
        held_here = kn.effective(have, prefix)
        for inst, ctr in counters.items():
            if held_here.get(inst, 0) >= ctr:
                continue
            needs = _needs(assumed, prefix, inst)
            unmet = [(p, c) for p, c in needs if kn.effective(have, p).get(inst, 0) < c]
            if not unmet:
                taken.append((prefix, inst, ctr))
                continue
            part, need = unmet[0]
            have_ctr = kn.effective(have, part).get(inst, 0)
            gaps[inst] = (have_ctr, max(need, gaps.get(inst, (0, 0))[1]))
            waiting.append((dataset_id, prefix, inst, ctr, json.dumps(needs), bundle_id))
    _store(conn, taken)
    conn.executemany(
        "INSERT INTO bundlesync_pending (dataset_id, partition, inst, ctr, needs, bundle_id) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT DO NOTHING",
        waiting,
    )
    resolve_pending(conn)
    return gaps


def _needs(assumed: Mapping[str, Mapping[str, int]], prefix: str, inst: str) -> list[tuple[str, int]]:
    """What the sender assumed this device held of ``inst`` for ``prefix`` and the parts below it."""
    needs = [(prefix, kn.effective(assumed, prefix).get(inst, 0))]
    needs += [(p, c[inst]) for p, c in assumed.items() if inst in c and kn.strictly_under(p, prefix)]
    return [(p, c) for p, c in needs if c > 0]


def resolve_pending(conn: sqlite3.Connection) -> None:
    """Take every waiting claim whose gap has been filled, until none more can be taken."""
    while True:
        have = read_knowledge(conn)
        done: list[tuple[str, str, int, str]] = []
        taken: list[Row] = []
        for partition, inst, ctr, needs in conn.execute(
            "SELECT partition, inst, ctr, needs FROM bundlesync_pending"
        ).fetchall():
            if kn.effective(have, partition).get(inst, 0) >= ctr:
                done.append((partition, inst, ctr, needs))
            elif all(kn.effective(have, p).get(inst, 0) >= c for p, c in json.loads(needs)):
                done.append((partition, inst, ctr, needs))
                taken.append((partition, inst, ctr))
        conn.executemany("DELETE FROM bundlesync_pending WHERE partition = ? AND inst = ? AND ctr = ? AND needs = ?",
                         done)
        _store(conn, taken)
        if not taken:
            return


def pending_instances(conn: sqlite3.Connection, dataset_id: str) -> set[str]:
    """Writers whose history this device still waits to complete (a gap not yet filled)."""
    return {i for (i,) in conn.execute("SELECT DISTINCT inst FROM bundlesync_pending WHERE dataset_id = ?",
                                       (dataset_id,))}


def advance(
    conn: sqlite3.Connection,
    prefixes: Sequence[str],
    basis: Mapping[str, int],
    result: Mapping[str, int],
) -> dict[str, tuple[int, int]]:
    """Flat form of :func:`advance_knowledge`: one claim for every prefix of a filter."""
    return advance_knowledge(conn, prefixes, kn.from_flat(basis, prefixes), kn.from_flat(result, prefixes))
