"""Choosing an export's basis: what its reader is assumed to hold already, and why.

Records at or below the basis are left out of the bundle. In this order:

1. ``--full``: nothing.
2. ``--since RECEIPT``: what that receipt's signer holds.
3. Receipts in the output folder from devices that read this export (see :func:`reads`):
   what the least up-to-date of them holds. A receipt names its reader exactly.
4. Otherwise the reader is unknown. It is assumed to hold what the least up-to-date
   *known* peer that reads this export holds (learned from its bundles and receipts,
   :mod:`bundlesync.replica.peers`). A peer last heard from before this device's previous
   export of the same filter is assumed to have read that export too (its result is
   joined in); a peer that spoke *after* it is taken at its word, so a bundle of ours
   that was lost, or whose records could not all be taken there, is sent again without
   waiting for a receipt. With no known peer, the previous export's result alone.
5. Nothing known: nothing (the bundle is complete for its filter).

Everything a receipt or a peer says about the reader is joined with the rest of what is
known of that same device: each is a lower bound of what it holds.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bundlesync.errors import StateError
from bundlesync.partitions import within, covered
from bundlesync.replica import knowledge as kn
from bundlesync.replica.knowledge import Knowledge
from bundlesync.replica.peers import Peer, known_peers, learn
from bundlesync.trust.certs import Certificate
from bundlesync.trust.keystore import KeyStore
from bundlesync.profile import Profile
from bundlesync.trust.receipts import Receipt, find_receipts, read_receipt

__all__ = ["Basis", "choose_basis", "reads"]


@dataclass
class Basis:
    """What the reader is assumed to hold (clipped to the filter), where that came from, and notes."""

    knowledge: Knowledge
    source: str
    skipped: list[str] = field(default_factory=list)


def reads(scope: str, read: Sequence[str], prefixes: Sequence[str], user: str | None) -> bool:
    """True if a device of ``scope`` reading ``read`` is a reader this export is made for.

    A single-user export (``--user U``) is for user U's devices only: a full-facility
    device's knowledge says nothing of what a fresh learner tablet holds. Any other export
    is for devices that read its whole filter.
    """
    if user is not None:
        return scope == f"user:{user}"
    return covered(prefixes, read)


def _receipt_scope(receipt: Receipt) -> str:
    return Certificate.from_dict(receipt.chain[0]).scope


@dataclass(frozen=True)
class _LastExport:
    held: Knowledge
    bundle_id: str
    at: str


def _last_export(conn: sqlite3.Connection, dataset_id: str, prefixes: Sequence[str]) -> _LastExport | None:
    row = conn.execute(
        "SELECT result_fsic, bundle_id, at FROM bundlesync_transfers WHERE direction = 'export' AND dataset_id = ? "
        "AND filter = ? ORDER BY id DESC LIMIT 1",
        (dataset_id, "\n".join(prefixes)),
    ).fetchone()
    if row is None:
        return None
    raw = json.loads(row[0])
    # Exports recorded before per-prefix knowledge stored a flat map, true for every prefix of the filter.
    held = kn.from_flat(raw, prefixes) if all(isinstance(v, int) for v in raw.values()) else raw
    return _LastExport(kn.clip(held, prefixes), str(row[1]), str(row[2]))


def _peer_label(peers: Sequence[Peer]) -> str:
    if len(peers) == 1:
        return f"what {peers[0].instance_id[:8]} held in {peers[0].source}"
    return "the least of what " + ", ".join(f"{p.instance_id[:8]} held in {p.source}" for p in peers)


def choose_basis(
    conn: sqlite3.Connection, keys: KeyStore, *, dataset_id: str, facility_id: str, me: str,
    prefixes: Sequence[str], user: str | None, full: bool, since: Path | None, out_dir: Path,
    profile: Profile, on_receipt: Callable[[Receipt], None] | None = None,
) -> Basis:
    """The basis of an export of ``prefixes`` into ``out_dir`` (inside the export's write transaction)."""
    if full:
        return Basis({}, "full")
    if since is not None:
        receipt = read_receipt(since, keys, profile)
        if on_receipt is not None:
            on_receipt(receipt)
        if receipt.dataset_id != dataset_id:
            raise StateError(f"receipt {since.name} is for another facility: pick one of {facility_id}")
        _learn_receipt(conn, receipt)
        held = _known(conn, dataset_id).get(receipt.instance_id, receipt.held())
        return Basis(kn.clip(held, prefixes), f"receipt of {receipt.instance_id[:8]}")
    receipts, skipped = find_receipts(out_dir, keys, profile, dataset_id, me)
    if on_receipt is not None:
        for receipt in receipts:
            on_receipt(receipt)
    readers: list[Receipt] = []
    for receipt in receipts:
        _learn_receipt(conn, receipt)
        scope = _receipt_scope(receipt)
        if reads(scope, receipt.filter, prefixes, user):
            readers.append(receipt)
        elif user is not None:
            skipped.append(f"receipt of {receipt.instance_id[:8]}: it is a {scope} device's, and this export is "
                           f"for user {user}'s devices")
        else:
            skipped.append(f"receipt of {receipt.instance_id[:8]}: it covers {', '.join(receipt.filter)}, "
                           "not this export's filter")
    known = _known(conn, dataset_id)
    others = [r for r in receipts if r not in readers]
    basis = _basis_without_receipts(conn, dataset_id, me, prefixes, user, known, readers, skipped)
    # A valid receipt of a device this export is not meant for still names a reader the drive may
    # reach: wherever its filter reaches, the bundle must not assume more than that device holds.
    for r in others:
        reached = [p for p in prefixes if within(p, r.filter)]
        if reached:
            mine = kn.meet([kn.clip(basis.knowledge, reached), kn.clip(known.get(r.instance_id, r.held()), reached)])
            rest = kn.clip(basis.knowledge, [p for p in prefixes if p not in reached])
            basis = Basis(kn.join([mine, rest]), f"{basis.source}, lowered by the receipt of {r.instance_id[:8]}",
                          basis.skipped)
    return basis


def _basis_without_receipts(
    conn: sqlite3.Connection, dataset_id: str, me: str, prefixes: Sequence[str], user: str | None,
    known: dict[str, Knowledge], readers: list[Receipt], skipped: list[str],
) -> Basis:
    """The basis from the receipts of this export's readers, else from known peers and the last export."""
    if readers:
        names = ", ".join(sorted(r.instance_id[:8] for r in readers))
        held = kn.meet(kn.clip(known.get(r.instance_id, r.held()), prefixes) for r in readers)
        return Basis(held, f"receipts of {names}", skipped)
    peers = [p for p in known_peers(conn, dataset_id)
             if p.instance_id != me and reads(p.scope, p.read, prefixes, user)]
    last = _last_export(conn, dataset_id, prefixes)
    if not peers:
        if last is None:
            return Basis({}, "first export", skipped)
        return Basis(last.held, f"since last export {last.bundle_id[:8]}", skipped)
    views = [kn.clip(p.knowledge, prefixes) for p in peers]
    label = _peer_label(peers)
    if last is not None:
        # Timestamps are ISO text, UTC: exports and what peers signed compare as text.
        silent = [p.at <= last.at for p in peers]
        views = [kn.join([view, last.held]) if quiet else view for view, quiet in zip(views, silent)]
        if any(silent):
            label = f"since last export {last.bundle_id[:8]}, and {label}"
    held = kn.meet(views)
    return Basis(kn.clip(held, prefixes), label, skipped)


def _learn_receipt(conn: sqlite3.Connection, receipt: Receipt) -> None:
    learn(conn, receipt.dataset_id, receipt.instance_id, scope=_receipt_scope(receipt), read=receipt.filter,
          knowledge=receipt.held(), source=f"its receipt of {receipt.created_at[:19]}", at=receipt.created_at)


def _known(conn: sqlite3.Connection, dataset_id: str) -> dict[str, Knowledge]:
    return {p.instance_id: p.knowledge for p in known_peers(conn, dataset_id)}
