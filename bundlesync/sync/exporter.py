"""Export: from tracked app changes to a verified bundle file in the output folder.

The pipeline is :class:`ExportWork`: one built-in operation per stage, run after
the plugins' operations of that stage (:meth:`PluginSet.run_stage`):

INITIALIZING   (write txn, with SERIALIZING) fix the filter (from the certificate scope) and
               the basis.
SERIALIZING    turn logged app changes into store versions with a new counter.
QUEUING        (read snapshot) compute the result FSIC and stream the versions the receiver
               lacks — above the basis, inside the filter — into ``<name>.partial``.
TRANSFERRING   (write txn, with CLEANUP) finish the file (fsync + rename), then read it back
               and verify it completely.
CLEANUP        record the transfer.

Changes committed after SERIALIZING stay in the change log for the next export. If
any stage fails, no bundle is left in the output folder.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bundlesync._version import __version__
from bundlesync.format import container as container
from bundlesync.replica import fsic as fsic_mod
from bundlesync.trust.crypto import SigningKey, verify
from bundlesync.replica.db import read_transaction, write_transaction
from bundlesync.trust.certs import Certificate
from bundlesync.device import Device
from bundlesync.errors import StateError, SyncError
from bundlesync.plugins.hooks import FacilityDataSyncHook
from bundlesync.format.manifest import Manifest
from bundlesync.format.records import LINE_SQL
from bundlesync.plugins.operations import EXPORT_STAGES, Stage, Step, SyncContext
from bundlesync.plugins.loader import PluginSet, Warn
from bundlesync.profile import Profile
from bundlesync.trust.receipts import find_receipts, read_receipt
from bundlesync.partitions import covered, prefix_sql
from bundlesync.trust.scope import scope_filters
from bundlesync.replica.store import current_counter, record_transfer, serialize_changes

__all__ = ["ExportResult", "ExportWork", "export_bundle", "outgoing_lines"]


@dataclass
class ExportResult:
    """What an export did; ``path`` is None when there was nothing to send."""

    path: Path | None
    bundle_id: str
    dataset_id: str
    filter: tuple[str, ...] = ()
    records: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    serialized: int = 0
    basis: dict[str, int] = field(default_factory=dict)
    basis_source: str = "none"
    result: dict[str, int] = field(default_factory=dict)
    size: int = 0


def _writers(conn: sqlite3.Connection, model: str) -> Iterator[str]:
    """Distinct writers of one table's records, by index skip-scan (cost follows their number)."""
    row = conn.execute("SELECT min(inst) FROM bundlesync_store WHERE model = ?", (model,)).fetchone()
    while row is not None and row[0] is not None:
        yield row[0]
        row = conn.execute("SELECT min(inst) FROM bundlesync_store WHERE model = ? AND inst > ?",
                           (model, row[0])).fetchone()


_LINE_SQL = f"SELECT {LINE_SQL} FROM bundlesync_store WHERE model = ? AND inst = ? AND ctr > ? AND {{prefixes}} ORDER BY rowid"


def outgoing_lines(
    conn: sqlite3.Connection, profile: Profile, prefixes: Sequence[str], basis: Mapping[str, int],
    counts: dict[str, int],
) -> Iterator[list[bytes]]:
    """Batches of record lines (``head JSON \\t data JSON \\n``) above ``basis`` inside the filter.

    Tables come in foreign-key order, parents first, so an importer can usually
    write each record's app row as soon as it has merged it.
    """
    where, params = prefix_sql(prefixes)
    sql = _LINE_SQL.format(prefixes=where)
    for table in profile.tables:
        for inst in list(_writers(conn, table.name)):
            cursor = conn.execute(sql, [table.name, inst, basis.get(inst, 0), *params])
            while rows := cursor.fetchmany(2000):
                counts[table.name] = counts.get(table.name, 0) + len(rows)
                yield [line for (line,) in rows]


class ExportWork(FacilityDataSyncHook):
    """bundlesync's own export work, one operation per stage."""

    def __init__(self, device: Device, chain: Sequence[Certificate], out_dir: Path, *, full: bool, user: str | None,
                 since: Path | None, plugins: PluginSet, now: datetime.datetime | None,
                 key: SigningKey | None = None) -> None:
        self.device, self.chain, self.out_dir = device, tuple(chain), out_dir
        self.full, self.user, self.since = full, user, since
        self.plugins, self.now = plugins, now
        self.skipped_receipts: list[str] = []
        self.key = key
        self.writer: container.BundleWriter | None = None
        self.path: Path | None = None
        self.result = ExportResult(None, uuid.uuid4().hex, "")
        self.initializing_operations = [Step("choose filter and basis", self.initialize)]
        self.serializing_operations = [Step("serialize changes", self.serialize)]
        self.queuing_operations = [Step("queue records into the bundle", self.queue)]
        self.transferring_operations = [Step("finish and read back the bundle", self.transfer)]
        self.cleanup_operations = [Step("record the transfer", self.record)]

    # INITIALIZING
    def initialize(self, ctx: SyncContext) -> None:
        assert ctx.dataset_id is not None
        mine = scope_filters(ctx.profile, ctx.dataset_id, self.chain[0].scope)
        if self.user is not None:
            prefixes = scope_filters(ctx.profile, ctx.dataset_id, f"user:{self.user}").read
            if not covered(prefixes, mine.read):
                raise StateError(f"this device's certificate ({mine.scope}) may not read user {self.user}'s data")
        elif self.chain[0].scope == "full":
            prefixes = mine.read
        else:
            prefixes = mine.write  # a single-user device only sends what it may sign for
        if not self.out_dir.is_dir():
            raise StateError(f"output folder {self.out_dir} does not exist: create it or mount the drive")
        ctx.filter = tuple(prefixes)
        self.result.dataset_id, self.result.filter = ctx.dataset_id, ctx.filter
        basis, source = self._choose_basis(ctx)
        self.result.basis, self.result.basis_source = dict(basis), source

    def _choose_basis(self, ctx: SyncContext) -> tuple[dict[str, int], str]:
        """What the receivers are assumed to hold already, and why.

        ``--full``: nothing. ``--since RECEIPT``: what that peer holds. Else, if the
        output folder holds receipts of peers: what the least up-to-date of them holds.
        Else the result of this device's last export of the same filter (a receiver
        that missed that one reports the gap).
        """
        assert ctx.dataset_id is not None
        if self.full:
            return {}, "full"
        if self.since is not None:
            receipt = read_receipt(self.since, self.device.keys)
            if receipt.dataset_id != ctx.dataset_id:
                raise StateError(f"receipt {self.since.name} is for another facility: pick one of {ctx.facility_id}")
            return dict(receipt.fsic), f"receipt of {receipt.instance_id[:8]}"
        receipts, skipped = find_receipts(self.out_dir, self.device.keys, ctx.dataset_id, ctx.instance_id)
        # A receipt speaks only for its own filter: a narrower one says nothing about the rest of ours.
        narrower = [r for r in receipts if not covered(ctx.filter, r.filter)]
        receipts = [r for r in receipts if r not in narrower]
        self.skipped_receipts = skipped + [
            f"receipt of {r.instance_id[:8]}: it covers {', '.join(r.filter)}, not this export's filter" for r in narrower
        ]
        if receipts:
            peers = ", ".join(sorted(r.instance_id[:8] for r in receipts))
            return fsic_mod.pointwise_min(r.fsic for r in receipts), f"receipts of {peers}"
        row = ctx.connection.execute(
            "SELECT result_fsic, bundle_id FROM bundlesync_transfers WHERE direction = 'export' AND dataset_id = ? "
            "AND filter = ? ORDER BY id DESC LIMIT 1",
            (ctx.dataset_id, "\n".join(ctx.filter)),
        ).fetchone()
        if row is None:
            return {}, "first export"
        return dict(json.loads(row[0])), f"since last export {row[1][:8]}"

    # SERIALIZING
    def serialize(self, ctx: SyncContext) -> None:
        self.result.serialized = serialize_changes(ctx.connection, ctx.profile).versions
        ctx.counts["serialized"] = self.result.serialized

    # QUEUING
    def queue(self, ctx: SyncContext) -> None:
        conn, me = ctx.connection, ctx.instance_id
        assert ctx.dataset_id is not None and ctx.facility_id is not None
        # What this device holds for *every* prefix of the filter: a receiver may claim no more.
        held = fsic_mod.held(fsic_mod.read_rows(conn), ctx.filter)
        counter = current_counter(conn)
        created = (self.now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        manifest = Manifest(
            bundle_id=self.result.bundle_id, created_at=created, generator=f"bundlesync/{__version__}",
            profile_name=ctx.profile.name, profile_version=ctx.profile.version, profile_digest=ctx.profile.digest,
            dataset_id=ctx.dataset_id, facility_id=ctx.facility_id, filter=ctx.filter,
            sender_instance=me, sender_counter=counter, chain=tuple(c.to_dict() for c in self.chain),
            basis_fsic=self.result.basis, result_fsic=held,
            operations=tuple(self.plugins.manifest_entries(EXPORT_STAGES)),
        )
        ctx.manifest = manifest
        self.result.result = held
        name = f"bundle-{ctx.dataset_id[:8]}-{me[:8]}-{counter:06d}-{self.result.bundle_id[:8]}.bsync"
        key = self.key or self.device.keys.signing_key(self.chain)
        self.writer = container.BundleWriter(self.out_dir, name, manifest.to_dict(), lambda d: key.sign("bundle", d))
        counts = self.result.counts
        for lines in outgoing_lines(conn, ctx.profile, ctx.filter, self.result.basis, counts):
            self.writer.write_records(lines)
        self.result.records = self.writer.records
        ctx.counts["records"], ctx.counts["by_model"] = self.result.records, counts

    # TRANSFERRING
    def transfer(self, ctx: SyncContext) -> None:
        assert self.writer is not None and ctx.dataset_id is not None
        self.path = self.writer.finish({"counts": self.result.counts})
        ctx.bundle_path = self.path
        info = container.read_info(self.path)
        container.verify_digest(info)
        verify(self.chain[0].subject_key, "bundle", info.digest, info.signature)
        seen = sum(len(batch) for batch in container.iter_record_batches(info))
        if seen != self.result.records:
            raise SyncError(f"bundle {self.path.name} read back {seen} records, wrote {self.result.records}: "
                            "the medium may be faulty; try another drive")
        self.result.size = info.size

    # CLEANUP
    def record(self, ctx: SyncContext) -> None:
        r = self.result
        record_transfer(
            ctx.connection, bundle_id=r.bundle_id, direction="export", dataset_id=r.dataset_id, prefixes=r.filter,
            peer_instance=ctx.instance_id, path=str(self.path),
            at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), records=r.records,
            stats={"counts": r.counts, "basis": r.basis, "basis_source": r.basis_source}, result_fsic=r.result,
        )

    def discard(self) -> None:
        """Leave no bundle behind after a failure."""
        if self.writer is not None:
            self.writer.abort()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def export_bundle(
    device: Device,
    facility: str,
    out_dir: Path,
    *,
    full: bool = False,
    user: str | None = None,
    since: Path | None = None,
    plugins: PluginSet | None = None,
    warn: Warn | None = None,
    now: datetime.datetime | None = None,
) -> ExportResult:
    """Export what the receiver lacks as one signed bundle in ``out_dir``."""
    plugins = plugins or PluginSet()
    conn = device.conn
    dataset_id, facility_id = device.resolve_facility(facility)
    chain = device.keys.device_chain(dataset_id)
    if chain is None:
        raise StateError(
            f"this device holds no certificate for facility {facility}: run `bundlesync facility provision` "
            "on the facility's authority, or `bundlesync cert request` here and `cert install` the grant"
        )
    # Before anything is written: a lost or replaced key would only make a bundle nobody accepts.
    key = device.keys.signing_key(chain)
    ctx = SyncContext("export", device.home, device.profile, conn, device.instance_id, dataset_id=dataset_id,
                      facility_id=facility_id, local_scope=chain[0].scope,
                      remote_scope=f"user:{user}" if user else None)
    work = ExportWork(device, chain, out_dir, full=full, user=user, since=since, plugins=plugins, now=now, key=key)
    plugins.transfer_hooks("pre_transfer", ctx, warn or (lambda _: None))
    try:
        with write_transaction(conn):
            plugins.run_stage(Stage.INITIALIZING, ctx, work)
            plugins.run_stage(Stage.SERIALIZING, ctx, work)
        # Queuing reads one snapshot without holding the write lock: the app keeps writing meanwhile.
        with read_transaction(conn):
            plugins.run_stage(Stage.QUEUING, ctx, work)
        if work.result.records:
            with write_transaction(conn):
                plugins.run_stage(Stage.TRANSFERRING, ctx, work)
                plugins.run_stage(Stage.CLEANUP, ctx, work)
        else:
            work.discard()
    except BaseException:
        work.discard()
        raise
    work.result.path = work.path
    for line in work.skipped_receipts:
        (warn or (lambda _: None))(f"warning: ignored receipt {line}")
    plugins.transfer_hooks("post_transfer", ctx, warn or (lambda _: None))
    return work.result
