"""What a device knows about itself, as one JSON-ready dict (``bundlesync status``)."""

from __future__ import annotations

import json
from typing import Any

from bundlesync.replica import fsic as fsic_mod
from bundlesync.device import Device
from bundlesync.replica.health import describe, recent_repairs
from bundlesync.replica.store import current_counter, pending_changes

__all__ = ["device_status", "list_conflicts"]

RECENT_TRANSFERS = 10


def device_status(device: Device) -> dict[str, Any]:
    """Identity, facilities with their certificates and knowledge, pending work, recent transfers."""
    conn = device.conn
    rows = fsic_mod.read_rows(conn)
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
        facilities.append({
            "dataset_id": dataset_id,
            "facility_id": root.facility_id if root else None,
            "scope": chain[0].scope if chain else None,
            "authority": device.keys.root_key(dataset_id) is not None,
            "fsic": fsic_mod.held(rows, [dataset_id]),
            "gaps": gaps,
        })
    waiting = [
        {"model": model, "count": count, "example": error}
        for model, count, error in conn.execute(
            "SELECT model, count(*), min(error) FROM bundlesync_store WHERE dirty = 1 GROUP BY model ORDER BY model"
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
        "store_records": int(conn.execute("SELECT count(*) FROM bundlesync_store").fetchone()[0]),
        "waiting_records": waiting,
        "conflicts": int(conn.execute("SELECT count(*) FROM bundlesync_conflicts").fetchone()[0]),
        "facilities": facilities,
        "last_transfers": transfers,
        "repairs": [{"at": r.at, "table": r.table, "what": r.what, "changes": r.changes, "sentence": describe(r)}
                    for r in recent_repairs(conn)],
    }


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
