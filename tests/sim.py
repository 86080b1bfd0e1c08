"""A multi-device world for convergence tests, driven through the library in-process."""

from __future__ import annotations

import random
import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from conftest import PROFILE, make_db, store_rows

from bundlesync.device import Device, init_device
from bundlesync.sync.exporter import export_bundle
from bundlesync.sync.importer import import_bundle, leave_receipt
from bundlesync.trust.authority import issue_grant, provision_facility
from bundlesync.trust.enrolment import install_grant, request_certificate


@dataclass
class World:
    """N devices sharing one facility; device 0 is its authority and starts with the data."""

    root: Path
    facility: str
    devices: list[Device] = field(default_factory=list)
    dbs: list[Path] = field(default_factory=list)
    users: dict[int, str] = field(default_factory=dict)
    """Single-user devices: device index -> the user their certificate is for."""

    @classmethod
    def create(cls, root: Path, n: int, *, users: int = 4, logs: int = 24, seed: int = 1,
               scopes: dict[int, str] | None = None, learners: int = 0) -> World:
        """``learners``: the last devices get single-user certificates for the busiest learners."""
        root.mkdir(parents=True, exist_ok=True)
        dbs = [root / f"d{i}.sqlite3" for i in range(n)]
        facility = make_db(dbs[0], users=users, logs=logs, seed=seed)
        for db in dbs[1:]:
            make_db(db, schema_only=True)
        world = cls(root, facility, dbs=dbs)
        scopes = dict(scopes or {})
        if learners:
            conn = sqlite3.connect(dbs[0])
            busiest = [r[0] for r in conn.execute(
                "SELECT user_id FROM logger_contentsessionlog WHERE user_id IS NOT NULL GROUP BY user_id "
                "ORDER BY count(*) DESC, user_id LIMIT ?", (learners,))]
            conn.close()
            for k, user in enumerate(busiest):
                scopes[n - learners + k] = f"user:{user}"
        world.users = {i: s.split(":", 1)[1] for i, s in scopes.items() if s.startswith("user:")}
        drive = root / "certs"
        drive.mkdir()
        for i, db in enumerate(dbs):
            init_device(root / f"home{i}", db, PROFILE)
            world.devices.append(Device.open(root / f"home{i}"))
        first = world.devices[0]
        dataset_id, fac = first.resolve_facility(facility)
        provision_facility(first.keys, dataset_id=dataset_id, facility_id=fac, profile=first.profile.name,
                           instance_id=first.instance_id)
        for i, dev in enumerate(world.devices[1:], start=1):
            scope = scopes.get(i, "full")
            request = request_certificate(dev.keys, dataset_id=None, facility_id=fac, profile=dev.profile.name, scope=scope,
                                          instance_id=dev.instance_id, out_dir=drive)
            install_grant(dev.keys, issue_grant(first.keys, request, drive))
        # Every device has met every other (their certificates), so relays are encrypted to all who may read.
        leaves = [dev.keys.device_chain(dataset_id) for dev in world.devices]
        for dev in world.devices:
            for chain in leaves:
                assert chain is not None
                if chain[0].subject_key != dev.keys.device_key().public_key:
                    dev.keys.save_peer(chain[0])
        return world

    def close(self) -> None:
        for dev in self.devices:
            dev.close()

    def export(self, i: int, out: Path, **kw: object) -> Path | None:
        out.mkdir(parents=True, exist_ok=True)
        # Convergence does not depend on encryption (its own tests cover it); relays through devices
        # that may not read a whole bundle are the point here, so the simulated drives carry clear bundles.
        kw.setdefault("encrypt", False)
        return export_bundle(self.devices[i], self.facility, out, **kw).path  # type: ignore[arg-type]

    def deliver(self, bundle: Path, i: int, *, receipt: bool = False) -> object:
        return import_bundle(self.devices[i], bundle, receipt=receipt)

    def receipt(self, i: int, folder: Path) -> Path:
        dev = self.devices[i]
        dataset_id, _ = dev.resolve_facility(self.facility)
        return leave_receipt(dev, dataset_id, folder)

    def natural_exports(self, i: int, out: Path, **kw: object) -> list[Path]:
        """What device i sends in the field: a learner its own rows; a full device the facility,
        and a single-user bundle for each learner device's user."""
        kinds: list[dict[str, object]] = [{}]
        if i not in self.users:
            kinds += [{"user": user} for user in sorted(set(self.users.values()))]
        return [b for kind in kinds if (b := self.export(i, out, **kind, **kw)) is not None]

    def sql(self, i: int, statement: str, params: tuple[object, ...] = ()) -> None:
        conn = sqlite3.connect(self.dbs[i])
        conn.execute(statement, params)
        conn.commit()
        conn.close()

    def app_rows(self, i: int) -> dict[str, list[tuple[object, ...]]]:
        conn = self.devices[i].conn
        return {t.name: conn.execute(f'SELECT * FROM "{t.name}" ORDER BY "{t.primary_key}"').fetchall()
                for t in self.devices[i].profile.tables}

    def one(self, i: int, sql: str, params: tuple[object, ...] = ()) -> object:
        return self.devices[i].conn.execute(sql, params).fetchone()[0]

    def store(self, i: int) -> list[tuple[object, ...]]:
        return [(r["model"], r["id"], r["data"], r["deleted"], r["purged"], r["inst"], r["ctr"])
                for r in store_rows(self.devices[i].conn, "1 ORDER BY model, id")]


def random_edit(world: World, i: int, rnd: random.Random) -> None:
    """One edit by "another program" on device i: update, insert or delete."""
    conn = world.devices[i].conn
    users = [r[0] for r in conn.execute("SELECT id FROM kolibriauth_facilityuser ORDER BY id")]
    logs = [r[0] for r in conn.execute("SELECT id FROM logger_contentsessionlog ORDER BY id")]
    kind = rnd.choice(["rename", "progress", "progress", "insert", "delete", "delete_summary"])
    if kind == "rename" and users:
        world.sql(i, "UPDATE kolibriauth_facilityuser SET full_name = ? WHERE id = ?",
                  (f"name-{rnd.randrange(1000)}", rnd.choice(users)))
    elif kind == "progress" and logs:
        world.sql(i, "UPDATE logger_contentsessionlog SET progress = ?, time_spent = ? WHERE id = ?",
                  (rnd.random(), rnd.random() * 100, rnd.choice(logs)))
    elif kind == "insert" and users and logs:
        world.sql(i, "INSERT INTO logger_contentsessionlog SELECT ?, ?, content_id, channel_id, start_timestamp, "
                  "end_timestamp, time_spent, progress, kind, extra_fields, dataset_id FROM logger_contentsessionlog "
                  "WHERE id = ?", (uuid.UUID(int=rnd.getrandbits(128)).hex, rnd.choice(users), rnd.choice(logs)))
    elif kind == "delete" and logs:
        world.sql(i, "DELETE FROM logger_contentsessionlog WHERE id = ?", (rnd.choice(logs),))
    else:
        world.sql(i, "DELETE FROM logger_contentsummarylog WHERE id = (SELECT min(id) FROM logger_contentsummarylog)")


def learner_edit(world: World, i: int, rnd: random.Random) -> None:
    """One edit on learner device i: its own logs, a new log, or an anonymous log (write-only for it)."""
    user = world.users[i]
    conn = world.devices[i].conn
    logs = [r[0] for r in conn.execute("SELECT id FROM logger_contentsessionlog WHERE user_id = ? ORDER BY id", (user,))]
    if not logs:
        return
    kind = rnd.choice(["progress", "insert", "anonymous"])
    if kind == "progress":
        world.sql(i, "UPDATE logger_contentsessionlog SET progress = ?, time_spent = ? WHERE id = ?",
                  (rnd.random(), rnd.random() * 100, rnd.choice(logs)))
    else:
        world.sql(i, "INSERT INTO logger_contentsessionlog SELECT ?, ?, content_id, channel_id, start_timestamp, "
                  "end_timestamp, time_spent, progress, kind, extra_fields, dataset_id FROM logger_contentsessionlog "
                  "WHERE id = ?", (uuid.UUID(int=rnd.getrandbits(128)).hex, user if kind == "insert" else None,
                                   rnd.choice(logs)))


def edit(world: World, i: int, rnd: random.Random) -> None:
    """One edit by "another program" on device i, within what that device may write."""
    if i in world.users:
        learner_edit(world, i, rnd)
    else:
        random_edit(world, i, rnd)
