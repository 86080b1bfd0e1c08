"""What a device knows about itself, as one JSON-ready dict (``bundlesync status``)."""

from __future__ import annotations

import json
from typing import Any

from . import fsic as fsic_mod
from .device import Device
from .store import current_counter, pending_changes

__all__ = ["device_status"]

RECENT_TRANSFERS = 10


def device_status(device: Device) -> dict[str, Any]:
    """Identity, facilities with their certificates and knowledge, pending work, recent transfers."""
    conn = device.conn
    rows = fsic_mod.read_rows(conn)
    facilities = []
    for dataset_id in device.keyring.datasets():
        root = device.keyring.trusted_root(dataset_id)
        chain = device.keyring.device_chain(dataset_id)
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
            "authority": device.keyring.root_key(dataset_id) is not None,
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
    }
