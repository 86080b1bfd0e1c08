"""What a device knows about itself, as one JSON-ready dict (``bundlesync status``)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from bundlesync.replica import fsic as fsic_mod
from bundlesync.replica import knowledge as kn
from bundlesync.replica.peers import known_peers
from bundlesync.trust.scope import scope_filters
from bundlesync.device import Device
from bundlesync.replica.clock import ahead_hlc, iso_ms, skew_warning
from bundlesync.replica.health import describe, recent_repairs
from bundlesync.replica.store import current_counter, held_rows, pending_changes
from bundlesync.sync.exporter import expiry_warning
from bundlesync.trust.certs import Certificate

__all__ = ["certificate_listing", "device_status", "list_conflicts"]

RECENT_TRANSFERS = 10
HELD_SHOWN = 20
"""How many held-back rows ``status`` names (it always gives their number)."""


def device_status(device: Device) -> dict[str, Any]:
    """Identity, facilities with their certificates and knowledge, pending work, recent transfers."""
    conn = device.conn
    knowledge = fsic_mod.read_knowledge(conn)
    facilities = []
    for dataset_id in device.keys.datasets():
        root = device.keys.trusted_root(dataset_id)
        chain = device.keys.device_chain(dataset_id)
        gaps = [
            {"instance": inst, "have": have, "need": need, "bundle_id": bundle}
            for inst, have, need, bundle in conn.execute(
                "SELECT inst, have, need, bundle_id FROM bundlesync_gaps WHERE dataset_id = ? ORDER BY inst",
                (dataset_id,),
            )
        ]
        read = scope_filters(device.profile, dataset_id, chain[0].scope).read if chain else (dataset_id,)
        warning = expiry_warning(chain[0]) if chain else None
        facilities.append({
            "dataset_id": dataset_id,
            "facility_id": root.facility_id if root else None,
            "scope": chain[0].scope if chain else None,
            "certificate": chain[0].cert_id if chain else None,
            "expires_at": chain[0].expires_at if chain else None,
            "warnings": [warning] if warning else [],
            "authority": device.keys.root_key(dataset_id) is not None,
            "fsic": kn.flat(knowledge, read),
            "knowledge": kn.clip(knowledge, read),
            "peers": [{"instance": p.instance_id, "scope": p.scope, "last_heard": p.source}
                      for p in known_peers(conn, dataset_id)],
            "gaps": gaps,
        })
    held_total, held = held_rows(conn, HELD_SHOWN)
    waiting = [
        {"model": model, "count": count, "example": error}
        for model, count, error in conn.execute(
            "SELECT m.name, count(*), min(s.error) FROM bundlesync_versions s JOIN bundlesync_models m ON m.n = s.model "
            "WHERE s.dirty = 1 GROUP BY m.name ORDER BY m.name"
        )
    ]
    transfers = [
        {"direction": d, "bundle_id": b, "at": at, "records": n, "path": p, "peer_instance": peer,
         "stats": json.loads(stats)}
        for d, b, at, n, p, peer, stats in conn.execute(
            "SELECT direction, bundle_id, at, records, path, peer_instance, stats FROM bundlesync_transfers "
            f"ORDER BY id DESC LIMIT {RECENT_TRANSFERS}"
        )
    ]
    return {
        "home": str(device.home),
        "db": str(device.config.db),
        "profile": {"name": device.profile.name, "version": device.profile.version},
        "instance_id": device.instance_id,
        "counter": current_counter(conn),
        "pending_changes": pending_changes(conn),
        "store_records": int(conn.execute("SELECT count(*) FROM bundlesync_versions").fetchone()[0]),
        "waiting_records": waiting,
        "conflicts": int(conn.execute("SELECT count(*) FROM bundlesync_conflicts").fetchone()[0]),
        "held_back": {"count": held_total, "rows": held},
        "clocks_ahead": _clocks_ahead(conn),
        "facilities": facilities,
        "last_transfers": transfers,
        "repairs": [{"at": r.at, "table": r.table, "what": r.what, "changes": r.changes, "sentence": describe(r)}
                    for r in recent_repairs(conn)],
    }


def _clocks_ahead(conn: sqlite3.Connection) -> dict[str, Any]:
    """Versions in the store stamped far ahead of this device's clock (a device's clock is or was wrong)."""
    count, top = conn.execute("SELECT count(*), max(hlc) FROM bundlesync_versions WHERE hlc > ?", (ahead_hlc(),)).fetchone()
    found: dict[str, Any] = {"records": int(count), "latest": iso_ms(int(top) >> 16) if top is not None else None}
    if count:
        found["warning"] = skew_warning(int(count), int(top), "in the store").removeprefix("warning: ")
    return found


def list_conflicts(device: Device, *, model: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Losing versions of concurrent edits, newest first (``bundlesync conflicts``).

    The winner is the record's current version (in the app table); each entry is
    the version that lost, with who wrote it, its clock and its data.
    """
    sql = ("SELECT id, model, record_id, loser, winner_inst, winner_ctr, bundle_id, detected_at "
           "FROM bundlesync_conflicts")
    params: list[object] = []
    if model is not None:
        sql += " WHERE model = ?"
        params.append(model)
    sql += " ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit else "")
    return [
        {"conflict": cid, "model": m, "record_id": rid, "loser": json.loads(loser),
         "winner": {"instance": wi, "counter": wc}, "bundle_id": bundle, "detected_at": at}
        for cid, m, rid, loser, wi, wc, bundle, at in device.conn.execute(sql, params)
    ]


def _cert_entry(cert: Certificate) -> dict[str, Any]:
    return {
        "cert_id": cert.cert_id, "scope": cert.scope, "issuer": cert.issuer_id, "issued_at": cert.issued_at,
        "expires_at": cert.expires_at, "fingerprint": cert.fingerprint, "instance_id": cert.instance_id,
        "recipient": cert.recipient,
    }


def certificate_listing(device: Device) -> dict[str, Any]:
    """This device's certificates per facility (``bundlesync cert list``): its chain, scopes,
    expiry, fingerprints and encryption recipients, the peers it may encrypt to, and the
    revocations it knows (and relays)."""
    keys = device.keys
    facilities = []
    for dataset_id in keys.datasets():
        root = keys.trusted_root(dataset_id)
        chain = keys.device_chain(dataset_id) or ()
        warning = expiry_warning(chain[0]) if chain else None
        facilities.append({
            "dataset_id": dataset_id,
            "facility_id": root.facility_id if root else None,
            "authority": keys.root_key(dataset_id) is not None,
            "chain": [_cert_entry(c) for c in chain],
            "root": _cert_entry(root) if root else None,
            "peers": [_cert_entry(c) for c in keys.peers(dataset_id)],
            "revocations": [
                {"cert_id": r.cert_id, "revoked_at": r.revoked_at, "revoked_by": r.revoker_id}
                for r in keys.revocations(dataset_id)
            ],
            "warnings": [warning] if warning else [],
        })
    return {"instance_id": device.instance_id, "recipient": keys.recipient(), "facilities": facilities}
