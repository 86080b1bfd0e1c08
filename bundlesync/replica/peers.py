"""What other devices are known to hold: lower bounds learned from their bundles and receipts.

The signer of a verified bundle held at least the knowledge its manifest states (``held``);
a verified receipt says the same of its signer. Knowledge only grows, so the join of
everything heard from a device is a lower bound of what it holds now. An export whose
reader is not named by a receipt assumes its reader holds what the least up-to-date
known peer of the right kind holds (:mod:`bundlesync.sync.basis`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bundlesync.replica import knowledge as kn
from bundlesync.replica.knowledge import Knowledge

__all__ = ["Peer", "known_peers", "learn"]


@dataclass(frozen=True)
class Peer:
    """A device heard from: its certificate scope, read prefixes, knowledge, and where it was last heard."""

    instance_id: str
    scope: str
    read: tuple[str, ...]
    knowledge: Knowledge
    source: str
    at: str
    """When the newest of what was heard from it was written (its bundle's or receipt's creation time)."""


def learn(conn: sqlite3.Connection, dataset_id: str, peer: str, *, scope: str, read: Sequence[str],
          knowledge: Mapping[str, Mapping[str, int]], source: str, at: str) -> None:
    """Join what ``peer`` was seen to hold into what is known of it (inside a write transaction)."""
    current = _knowledge(conn, dataset_id, peer)
    merged = kn.join([current, kn.clip(knowledge, [dataset_id])])
    conn.execute(
        "INSERT INTO bundlesync_peers (dataset_id, peer, scope, read, source, at) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (dataset_id, peer) DO UPDATE SET scope = excluded.scope, read = excluded.read, "
        "source = CASE WHEN excluded.at >= at THEN excluded.source ELSE source END, at = max(at, excluded.at)",
        (dataset_id, peer, scope, "\n".join(read), source, at),
    )
    if merged == current:
        return
    conn.execute("DELETE FROM bundlesync_peer_fsic WHERE dataset_id = ? AND peer = ?", (dataset_id, peer))
    conn.executemany(
        "INSERT INTO bundlesync_peer_fsic (dataset_id, peer, partition, inst, ctr) VALUES (?, ?, ?, ?, ?)",
        [(dataset_id, peer, p, i, c) for p, counters in merged.items() for i, c in counters.items()],
    )


def _knowledge(conn: sqlite3.Connection, dataset_id: str, peer: str) -> Knowledge:
    out: Knowledge = {}
    for partition, inst, ctr in conn.execute(
        "SELECT partition, inst, ctr FROM bundlesync_peer_fsic WHERE dataset_id = ? AND peer = ?", (dataset_id, peer)
    ):
        out.setdefault(partition, {})[inst] = ctr
    return out


def known_peers(conn: sqlite3.Connection, dataset_id: str) -> list[Peer]:
    """Every peer heard from for ``dataset_id``, with what it is known to hold."""
    return [
        Peer(peer, scope, tuple(read.split("\n")), _knowledge(conn, dataset_id, peer), source, at)
        for peer, scope, read, source, at in conn.execute(
            "SELECT peer, scope, read, source, at FROM bundlesync_peers WHERE dataset_id = ? ORDER BY peer", (dataset_id,)
        ).fetchall()
    ]
