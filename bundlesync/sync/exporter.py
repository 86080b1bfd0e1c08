"""Export: from tracked app changes to a verified bundle file in the output folder.

The pipeline is :class:`ExportWork`: one built-in operation per stage, run after
the plugins' operations of that stage (:meth:`PluginSet.run_stage`):

INITIALIZING   (one write transaction with its plugin operations) fix the filter (from the
               certificate scope) and the basis.
SERIALIZING    turn the app changes logged so far into store versions, in short write
               transactions (:class:`~bundlesync.replica.pacing.Pacer`), so the app keeps writing.
QUEUING        read this device's knowledge in one short snapshot, then stream the versions
               the receiver lacks — above the basis, inside the filter — into
               ``<name>.partial``, in short reads (no long snapshot: in rollback-journal mode
               a reader holds off every writer's commit).
TRANSFERRING   (no transaction) finish the file (fsync + rename), then read it back and
               verify it completely.
CLEANUP        (one write transaction with its plugin operations) record the transfer.

A stage's plugin operations run together in one transaction of their own just before
bundlesync's own work of that stage (QUEUING: a read snapshot), except at INITIALIZING and
CLEANUP, where they share bundlesync's one transaction. Changes logged after SERIALIZING
starts stay in the change log for the next export. If any stage fails, no bundle is left
in the output folder.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundlesync._version import __version__
from bundlesync.format import container as container
from bundlesync.format.volumes import DEFAULT_MAX_SIZE, remove_bundle_files
from bundlesync.sync import drive
from bundlesync.replica import fsic as fsic_mod
from bundlesync.replica import knowledge as kn
from bundlesync.replica.knowledge import Knowledge
from bundlesync.sync.basis import choose_basis
from bundlesync.sync.spool import MAX_PENDING, LineSpool
from bundlesync.trust.crypto import SigningKey, verify
from bundlesync.replica.db import fetch_all, q, read_transaction, write_transaction
from bundlesync.replica.pacing import Pacer
from bundlesync.trust.certs import Certificate, verify_chain
from bundlesync.trust.revocation import check_not_revoked
from bundlesync.device import Device
from bundlesync.errors import BundlesyncError, StateError, SyncError, TrustError
from bundlesync.plugins.hooks import FacilityDataSyncHook
from bundlesync.format.envelope import check_recipient
from bundlesync.format.manifest import Manifest
from bundlesync.plugins.operations import EXPORT_STAGES, Stage, Step, SyncContext
from bundlesync.plugins.loader import PluginSet, Warn
from bundlesync.format.records import data_hash
from bundlesync.replica.tracking import NOW_MS_SQL
from bundlesync.profile import Profile, TableSpec
from bundlesync.partitions import covered, prefix_sql
from bundlesync.trust.scope import scope_filters
from bundlesync.replica.store import (FROM_STORE, HEAD_SQL, SerializeResult, app_data, app_data_sql, current_counter,
                                      held_warning, last_change, name_id, record_transfer, serialize_changes)

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
    basis: Knowledge = field(default_factory=dict)
    basis_source: str = "none"
    result: Knowledge = field(default_factory=dict)
    size: int = 0
    removed_partials: list[str] = field(default_factory=list)
    already_on_drive: Path | None = None
    replaced: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        """The ``export --json`` report."""
        return {
            "path": str(self.path) if self.path else None, "bundle_id": self.bundle_id, "records": self.records,
            "counts": self.counts, "bytes": self.size, "basis": self.basis, "basis_source": self.basis_source,
            "result": self.result,
            "already_on_drive": str(self.already_on_drive) if self.already_on_drive else None,
            "replaced": self.replaced,
        }


def _most(knowledge: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for counters in knowledge.values():
        for inst, ctr in counters.items():
            out[inst] = max(out.get(inst, 0), ctr)
    return out


def _carries(basis: Mapping[str, Mapping[str, int]], result: Mapping[str, Mapping[str, int]], other_basis: Mapping[str, Mapping[str, int]],
             other_result: Mapping[str, Mapping[str, int]], prefixes: Sequence[str]) -> bool:
    """Whether a bundle (``basis`` -> ``result``) carries everything another carries, prefix by prefix."""
    return all(drive.covers(kn.flat(basis, (p,)), kn.flat(result, (p,)), kn.flat(other_basis, (p,)),
                            kn.flat(other_result, (p,))) for p in prefixes)


def _writers(conn: sqlite3.Connection, model: int) -> Iterator[tuple[int, str]]:
    """Distinct writers (id, name) of one table's records, by index skip-scan (cost follows their number)."""
    row = conn.execute("SELECT min(inst) FROM bundlesync_versions WHERE model = ?", (model,)).fetchone()
    while row is not None and row[0] is not None:
        inst = int(row[0])
        yield inst, conn.execute("SELECT name FROM bundlesync_writers WHERE n = ?", (inst,)).fetchone()[0]
        row = conn.execute("SELECT min(inst) FROM bundlesync_versions WHERE model = ? AND inst > ?",
                           (model, inst)).fetchone()


def _line_sql(table: TableSpec) -> str:
    """One stretch of a table's record heads with their data, or the values their data is encoded from."""
    columns, joins = app_data_sql(table, "s.id", "s.data IS NULL")
    return (f"SELECT {HEAD_SQL}, s.data, s.hash, s.id, {columns} FROM {FROM_STORE} {joins} "
            "WHERE s.model = ? AND s.inst = ? AND s.ctr = ? AND s.rowid > ? AND s.rowid <= ? AND {prefixes}{held} "
            "ORDER BY s.rowid")


def _lines(conn: sqlite3.Connection, table: TableSpec, rows: Sequence[Sequence[Any]]) -> list[bytes]:
    """Record lines from :func:`_line_sql` rows: a line's data is the store's, or its app row's encoding.

    A record whose app row no longer encodes to the stored hash was changed while tracking was off
    (nothing else changes it without keeping the prior row): it is logged as a change, so the next
    export sends it as a new version, and this export stops rather than send wrong data.
    """
    lines = []
    for head, data, digest, record_id, *app in rows:
        if data is None:
            data = app_data(conn, table, record_id, app)
            if data is None or data_hash(data) != digest:
                conn.execute(f"INSERT INTO bundlesync_changes (model, pk, at_ms) VALUES (?, ?, {NOW_MS_SQL}) "
                             "ON CONFLICT (model, pk) DO NOTHING", (table.name, record_id))
                raise SyncError(f"record {table.name} {record_id} no longer matches its stored version (its app row "
                                "changed while bundlesync's tracking was off); it is queued again: export again")
        lines.append(b"%s\t%s\n" % (head, data.encode("utf-8", "surrogatepass")))
    return lines


STRETCH = 2000
"""Versions (of one table and writer) one read statement looks at: every read stays short."""

_ROWID_MIN, _ROWID_MAX = -(2**63), 2**63 - 1


def _stretches(conn: sqlite3.Connection, model: int, inst: int, floor: int,
               below: int | None = None) -> Iterator[tuple[int, int, int]]:
    """``(counter, after rowid, up to rowid)``: one writer's versions above ``floor``, :data:`STRETCH` at a time.

    In index order (counter, then rowid), each found by a short statement on the
    ``(model, inst, ctr)`` index, so no statement holds a read lock for long. ``below``: only counters under it.
    """
    row = conn.execute("SELECT min(ctr) FROM bundlesync_versions WHERE model = ? AND inst = ? AND ctr > ?",
                       (model, inst, floor)).fetchone()
    while row[0] is not None and (below is None or row[0] < below):
        ctr, after = int(row[0]), _ROWID_MIN
        while True:
            end = conn.execute("SELECT rowid FROM bundlesync_versions WHERE model = ? AND inst = ? AND ctr = ? AND "
                               "rowid > ? ORDER BY rowid LIMIT 1 OFFSET ?",
                               (model, inst, ctr, after, STRETCH - 1)).fetchone()
            upto = _ROWID_MAX if end is None else int(end[0])
            yield ctr, after, upto
            if end is None:
                break
            after = upto
        row = conn.execute("SELECT min(ctr) FROM bundlesync_versions WHERE model = ? AND inst = ? AND ctr > ?",
                           (model, inst, ctr)).fetchone()


def _held_sql(floor: int, finer: Sequence[tuple[str, int]]) -> tuple[str, list[object]]:
    """``NOT (under P AND ctr <= C)`` terms for basis entries above one writer's ``floor``."""
    terms: list[str] = []
    params: list[object] = []
    for prefix, ctr in finer:
        if ctr > floor:
            where, args = prefix_sql([prefix], column="p.name")
            terms.append(f"({where} AND s.ctr <= ?)")
            params += [*args, ctr]
    return (" AND NOT (" + " OR ".join(terms) + ")") if terms else "", params


def outgoing_lines(
    conn: sqlite3.Connection, profile: Profile, prefixes: Sequence[str], basis: Mapping[str, Mapping[str, int]],
    counts: dict[str, int], spool: LineSpool | None = None,
) -> Iterator[list[bytes]]:
    """Batches of record lines (``head JSON \\t data JSON \\n``) inside the filter the basis does not hold.

    ``basis`` is per prefix (:mod:`bundlesync.replica.knowledge`): a record is left out when
    a prefix above its partition holds its writer's counter. For each writer, the lowest
    such counter over the filter's prefixes bounds an index range, and basis entries that
    say more for some prefix become exclusion terms. Tables come in foreign-key order,
    parents first, so an importer can usually write each record's app row as soon as it
    has merged it; within a table, each writer's versions come by counter, then by rowid.

    Each batch is read by its own short statements, outside any transaction (see
    :func:`_stretches`): the store only changes under the home's run lock (serialization,
    import, purge), which the export holds, so reading it piecewise reads one state of it.
    ``spool``: the lines of the versions this export serialized (its writer's counters from
    ``spool.first`` on), which come from there instead of the store, in their writer's place
    (by counter, then in the order they were serialized, not by rowid). The store's check of
    each line against its app row (:func:`_lines`) is not needed for them: a spooled line's data
    is the very text its stored hash was computed from, in the transaction that stored it.
    """
    where, params = prefix_sql(prefixes, column="p.name")
    at_filter = [kn.effective(basis, p) for p in prefixes]
    finer: dict[str, list[tuple[str, int]]] = {}
    for prefix, counters in sorted(basis.items()):
        for writer, ctr in counters.items():
            finer.setdefault(writer, []).append((prefix, ctr))
    for table in profile.tables:
        model = name_id(conn, "model", table.name)
        if model is None:
            continue
        line_sql = _line_sql(table)
        for inst, inst_name in list(_writers(conn, model)):
            floor = min(view.get(inst_name, 0) for view in at_filter)
            held, held_params = _held_sql(floor, finer.get(inst_name, []))
            sql = line_sql.format(prefixes=where, held=held)
            spooled = False
            if spool is not None and spool.first is not None and inst_name == spool.instance:
                mine = conn.execute("SELECT count(*) FROM bundlesync_versions WHERE model = ? AND inst = ? AND "
                                    "ctr >= ?", (model, inst, spool.first)).fetchone()[0]
                spooled = spool.holds(table.name, int(mine))
            below = spool.first if spool is not None and spooled else None
            for ctr, after, upto in _stretches(conn, model, inst, floor, below):
                rows = fetch_all(conn, sql, [model, inst, ctr, after, upto, *params, *held_params])
                if rows:
                    counts[table.name] = counts.get(table.name, 0) + len(rows)
                    yield _lines(conn, table, rows)
            if spool is not None and spooled:
                for lines in spool.lines(table.name):
                    counts[table.name] = counts.get(table.name, 0) + len(lines)
                    yield lines


Progress = Callable[[int, int], None]
"""Told (records done, records expected) as a sync goes; the CLI draws a progress bar with it."""

COMPRESSION_GUESS = 3
"""Record lines shrink at least this much in zstd (JSON rows shrink 5-10x): the free-space estimate."""

_HEAD_BYTES = 260
"""Bytes of a record line besides its data: the JSON head (ids, clock, version vector)."""


def estimate(conn: sqlite3.Connection, profile: Profile, basis: Mapping[str, int]) -> tuple[int, int]:
    """(records, raw bytes) an export above ``basis`` will write, at most; cheap (index counts, sampled sizes).

    The filter is ignored, so this is an upper bound for a narrower export.
    """
    records = raw = 0
    for table in profile.tables:
        count = 0
        model = name_id(conn, "model", table.name)
        if model is None:
            continue
        for inst, inst_name in list(_writers(conn, model)):
            count += conn.execute("SELECT count(*) FROM bundlesync_versions WHERE model = ? AND inst = ? AND ctr > ?",
                                  (model, inst, basis.get(inst_name, 0))).fetchone()[0]
        if count:
            # Data the store leaves to the app row is sized from that row: each value, its key and quotes.
            pk = q(table.primary_key)
            app_size = " + ".join(f"coalesce(length(CAST(t.{q(c)} AS BLOB)), 4) + {len(c) + 4}" for c in table.columns)
            avg = conn.execute(f"SELECT avg(coalesce(length(CAST(s.data AS BLOB)), {app_size or '2'})) FROM "
                               f"(SELECT id, data FROM bundlesync_versions WHERE model = ? LIMIT 256) s "
                               f"LEFT JOIN {q(table.name)} t ON t.{pk} = s.id", (model,)).fetchone()[0] or 0
            records += count
            raw += int(count * (avg + _HEAD_BYTES))
    return records, raw


class ExportWork(FacilityDataSyncHook):
    """bundlesync's own export work, one operation per stage."""

    def __init__(self, device: Device, chain: Sequence[Certificate], out_dir: Path, *, full: bool, user: str | None,
                 since: Path | None, plugins: PluginSet, now: datetime.datetime | None,
                 require_mount: bool = False, max_size: int | None = None, progress: Progress | None = None,
                 supersede: bool = False, encrypt: bool = True, encrypt_to: Sequence[str] = (),
                 key: SigningKey | None = None) -> None:
        self.device, self.chain, self.out_dir = device, tuple(chain), out_dir
        self.encrypt, self.encrypt_to = encrypt, tuple(encrypt_to)
        self.full, self.user, self.since = full, user, since
        self.plugins, self.now = plugins, now
        self.created = ""  # the bundle's creation time (UTC, ISO), set when its manifest is made
        self.require_mount, self.max_size, self.progress = require_mount, max_size, progress
        self.supersede = supersede
        self.skipped_receipts: list[str] = []
        self.scope_prefixes: tuple[str, ...] = ()
        self.on_drive: list[drive.DriveBundle] = []
        self.clock_warning: str | None = None
        self.key = key
        self.writer: container.BundleWriter | None = None
        self.spool: LineSpool | None = None
        self.spool_counter: int | None = None  # the counter the last serialization took
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
        if self.require_mount:
            drive.require_mount(self.out_dir, self.device.home)
        if not self.out_dir.is_dir():
            raise StateError(f"output folder {self.out_dir} does not exist: create it or mount the drive")
        ctx.filter = tuple(prefixes)
        self.result.dataset_id, self.result.filter = ctx.dataset_id, ctx.filter
        assert ctx.facility_id is not None
        basis = choose_basis(
            ctx.connection, self.device.keys, dataset_id=ctx.dataset_id, facility_id=ctx.facility_id,
            me=ctx.instance_id, prefixes=ctx.filter, user=self.user, full=self.full, since=self.since,
            out_dir=self.out_dir,
            profile=ctx.profile, on_receipt=lambda r: self._remember_signer(r.chain),
        )
        self.result.basis, self.result.basis_source = basis.knowledge, basis.source
        self.skipped_receipts = basis.skipped
        self.scope_prefixes = tuple(dict.fromkeys((*mine.read, *mine.write)))

    def _recipients(self, ctx: SyncContext) -> list[str]:
        """This device, every known device whose certificate may read the whole filter, and ``--encrypt-to``.

        Expired and revoked certificates are left out; so is a device that may read only
        part of the filter (a learner's tablet never receives other learners' data).
        """
        assert ctx.dataset_id is not None
        keys = self.device.keys
        revoked = {r.cert_id for r in keys.revocations(ctx.dataset_id)}
        moment = self.now or datetime.datetime.now(datetime.timezone.utc)
        found = {keys.recipient(), *self.encrypt_to}
        for cert in keys.peers(ctx.dataset_id):
            if cert.recipient is None or cert.has_expired(moment) or {cert.cert_id, cert.issuer_id} & revoked:
                continue
            if covered(ctx.filter, scope_filters(ctx.profile, ctx.dataset_id, cert.scope).read):
                found.add(cert.recipient)
        return sorted(found)

    def _remember_signer(self, chain: Sequence[Mapping[str, Any]]) -> None:
        """Keep a verified peer's certificate: later exports may be encrypted to it."""
        leaf = Certificate.from_dict(chain[0])
        if leaf.subject_key != self.chain[0].subject_key:
            self.device.keys.save_peer(leaf)

    # SERIALIZING
    def serialize(self, ctx: SyncContext) -> None:
        conn = ctx.connection
        # The changes logged so far; the app's edits from now on go out with the next export (a busy app
        # could otherwise keep this one serializing for ever).
        up_to = last_change(conn)
        pacer = Pacer(conn)
        serialized = SerializeResult(done=False)
        self.spool = LineSpool(self.device.staging, instance=ctx.instance_id, prefixes=ctx.filter,
                               basis=self.result.basis, sql_value=lambda sql, args: conn.execute(sql, args).fetchone()[0])
        pacer.meanwhile = self.spool.work  # the spool's lines are made while the export rests
        while not serialized.done:
            with pacer.transaction() as over:
                serialized.add(serialize_changes(conn, ctx.profile, until=over, up_to=up_to, on_batch=self.spool.add))
            if self.spool.pending > MAX_PENDING:  # rests too short for the spool (a busy app): catch up, holding no lock
                self.spool.finish()
        self.spool.finish()
        self.spool_counter = serialized.counter
        self.result.serialized = serialized.versions
        if serialized.clamped:
            self.clock_warning = (
                f"warning: this device's clock read a time outside 1970..4199 when {serialized.clamped} row(s) "
                "changed; their versions were stamped at the nearest limit: set the clock right"
            )
        ctx.counts["serialized"] = self.result.serialized

    # QUEUING
    def queue(self, ctx: SyncContext) -> None:
        conn, me = ctx.connection, ctx.instance_id
        assert ctx.dataset_id is not None and ctx.facility_id is not None
        # What this device holds for its scope, per prefix: readers learn it (a lower bound of what it
        # holds) and claim its part under the filter once they hold the basis (then they hold it all).
        # Knowledge and counter come from one snapshot, read before any record: the records are read
        # afterwards in short reads (no snapshot held across them), so the bundle could at most carry
        # more than it claims, never less. (Under the home's run lock, which this export holds,
        # nothing else changes the store or the knowledge meanwhile; the app only adds to the change
        # log, which the next export serializes.)
        with read_transaction(conn):
            held = kn.clip(fsic_mod.read_knowledge(conn), (*self.scope_prefixes, *ctx.filter))
            counter = current_counter(conn)
        if self.spool is not None and counter != self.spool_counter:
            # Something wrote versions since the serialization (a plugin operation of this stage can): the
            # spool may hold versions the store has replaced, so every line comes from the store.
            self.spool.close()
            self.spool = None
        result = kn.clip(held, ctx.filter)
        created = self.created = (self.now or datetime.datetime.now(datetime.timezone.utc)).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ")
        manifest = Manifest(
            bundle_id=self.result.bundle_id, created_at=created, generator=f"bundlesync/{__version__}",
            profile_name=ctx.profile.name, profile_version=ctx.profile.version, profile_digest=ctx.profile.digest,
            dataset_id=ctx.dataset_id, facility_id=ctx.facility_id, filter=ctx.filter,
            sender_instance=me, sender_counter=counter, chain=tuple(c.to_dict() for c in self.chain),
            # The flat fields, for readers that predate per-prefix knowledge: the most any prefix assumed,
            # the least every prefix holds.
            basis_fsic=_most(self.result.basis), result_fsic=kn.flat(result, ctx.filter),
            operations=tuple(self.plugins.manifest_entries(EXPORT_STAGES)),
            basis=self.result.basis, held=held,
            # Every revocation this device knows travels on: revocations spread like records.
            revocations=tuple(r.to_dict() for r in self.device.keys.revocations(ctx.dataset_id)),
            recipients=tuple(self._recipients(ctx)) if self.encrypt else None,
        )
        ctx.manifest = manifest
        self.result.result = result
        own = f"bundle-{ctx.dataset_id[:8]}-{me[:8]}-"
        name = drive.require_fat_safe(f"{own}{counter:06d}-{self.result.bundle_id[:8]}.bsync")
        # A killed run of this device left these; the home lock says no run of ours is writing them now.
        self.result.removed_partials = [p.name for p in drive.remove_stale_partials(self.out_dir, own)]
        self.on_drive = drive.own_bundles(self.out_dir, ctx.dataset_id, me, ctx.filter) if self.supersede else []
        for earlier in self.on_drive:
            m = earlier.manifest
            assert m is not None
            # While a reader's receipt is stale every run has the same basis: a bundle already on the
            # drive carries all of it, so another copy would change nothing.
            if _carries(m.basis, kn.clip(m.held, m.filter), self.result.basis, result, ctx.filter) \
                    and self._intact(earlier.path):
                self.result.already_on_drive = earlier.path
                return
        total, raw = estimate(conn, ctx.profile, kn.flat(self.result.basis, ctx.filter))
        if total:
            drive.check_free(self.out_dir, raw // COMPRESSION_GUESS)
        key = self.key or self.device.keys.signing_key(self.chain)
        self.writer = container.BundleWriter(
            self.out_dir, name, manifest.to_dict(), lambda d: key.sign("bundle", d), max_volume=self.max_size,
            encrypt_to=manifest.recipients or (), scratch_dir=self.device.staging)
        counts = self.result.counts
        try:
            for lines in outgoing_lines(conn, ctx.profile, ctx.filter, self.result.basis, counts, self.spool):
                self.writer.write_records(lines)
                if self.progress is not None:
                    self.progress(self.writer.records, max(total, self.writer.records))
        except ValueError as exc:  # a line over the container's limit: serialization should have held it back
            raise SyncError(f"a record cannot be written into the bundle ({exc}); nothing was exported: "
                            "report this with `bundlesync status --json`") from exc
        self.result.records = self.writer.records
        ctx.counts["records"], ctx.counts["by_model"] = self.result.records, counts

    def _intact(self, path: Path) -> bool:
        """Whether a bundle of ours on the drive reads back whole and signed by us."""
        try:
            info = container.read_info(path)
            container.verify_digest(info)
            verify(self.chain[0].subject_key, "bundle", info.digest, info.signature)
        except BundlesyncError:
            return False
        return True

    def replace_superseded(self) -> None:
        """Remove this device's earlier bundles on the drive whose whole content the new one carries."""
        r = self.result
        for earlier in self.on_drive:
            m = earlier.manifest
            assert m is not None
            if _carries(r.basis, r.result, m.basis, kn.clip(m.held, m.filter), r.filter):
                remove_bundle_files(earlier.path)
                r.replaced.append(earlier.name)

    # TRANSFERRING
    def transfer(self, ctx: SyncContext) -> None:
        assert self.writer is not None and ctx.dataset_id is not None
        # Per-table counts say how active a learner was: in the clear only when not encrypted.
        self.path = self.writer.finish({} if self.encrypt else {"counts": self.result.counts})
        ctx.bundle_path = self.path
        info = container.read_info(self.path)
        container.verify_digest(info)
        verify(self.chain[0].subject_key, "bundle", info.digest, info.signature)
        readable = info
        if self.encrypt:
            plain = self.device.staging / f"{self.path.name}.readback"
            readable = container.decrypt_payload(info, plain, self.device.keys.encryption_secret())
        try:
            seen = sum(len(batch) for batch in container.iter_record_batches(readable))
        finally:
            if readable is not info:
                readable.path.unlink(missing_ok=True)
        if seen != self.result.records:
            raise SyncError(f"bundle {self.path.name} read back {seen} records, wrote {self.result.records}: "
                            "the medium may be faulty; try another drive")
        self.result.size = info.size

    # CLEANUP
    def record(self, ctx: SyncContext) -> None:
        r = self.result
        record_transfer(
            ctx.connection, bundle_id=r.bundle_id, direction="export", dataset_id=r.dataset_id, prefixes=r.filter,
            # The bundle's own creation time: later bases compare it with when peers last spoke.
            peer_instance=ctx.instance_id, path=str(self.path), at=self.created, records=r.records,
            stats={"counts": r.counts, "basis": r.basis, "basis_source": r.basis_source}, result_fsic=r.result,
        )

    def discard(self) -> None:
        """Leave no bundle behind after a failure."""
        if self.writer is not None:
            self.writer.abort()
        if self.path is not None:
            remove_bundle_files(self.path)


EXPIRY_WARNING_DAYS = 30
"""An export (and ``status``) warns when the device's own certificate expires sooner than this."""


def check_own_certificate(device: Device, dataset_id: str, chain: Sequence[Certificate], warn: Warn, *,
                          now: datetime.datetime | None = None) -> None:
    """Refuse to sign with an expired or revoked certificate; warn when it expires soon.

    Raises:
        TrustError: The certificate (or one of its issuers) expired or is revoked.
    """
    root = device.keys.trusted_root(dataset_id)
    if root is None:
        raise StateError(f"this device trusts no root for dataset {dataset_id}: install the facility's grant again")
    try:
        verify_chain(chain, root, dataset_id=dataset_id, now=now)
    except TrustError as exc:
        raise TrustError(f"this device cannot sign bundles: {exc}") from exc
    check_not_revoked(chain, device.keys.revocations(dataset_id), what="this device's own certificate")
    message = expiry_warning(chain[0], now=now)
    if message:
        warn(f"warning: {message}")


def expiry_warning(cert: Certificate, *, now: datetime.datetime | None = None) -> str | None:
    """A one-line warning if ``cert`` expires within :data:`EXPIRY_WARNING_DAYS`, else None."""
    if cert.expires_at is None:
        return None
    moment = now or datetime.datetime.now(datetime.timezone.utc)
    left = datetime.datetime.fromisoformat(cert.expires_at.replace("Z", "+00:00")) - moment
    if left > datetime.timedelta(days=EXPIRY_WARNING_DAYS):
        return None
    return (f"this device's certificate {cert.cert_id} ({cert.scope}) expires at {cert.expires_at}, in "
            f"{max(left.days, 0)} day(s): run `bundlesync cert request` and have the authority issue a new one")


def _operations(plugins: PluginSet, stage: Stage, ctx: SyncContext, *, write: bool) -> None:
    """A stage's plugin operations, together in one transaction of their own (none if there are none)."""
    if plugins.operations(stage):
        with write_transaction(ctx.connection) if write else read_transaction(ctx.connection):
            plugins.run_operations(stage, ctx)


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
    require_mount: bool = False,
    max_size: int | None = DEFAULT_MAX_SIZE,
    progress: Progress | None = None,
    supersede: bool = False,
    encrypt: bool = True,
    encrypt_to: Sequence[str] = (),
) -> ExportResult:
    """Export what the receiver lacks as one signed bundle in ``out_dir``.

    ``require_mount``: refuse a folder that is not on a mounted drive (:func:`drive.require_mount`).
    ``max_size``: split the bundle into volumes of at most this many bytes (None: one file).
    ``progress``: called with (records written, records expected) as the bundle is written.
    ``supersede``: treat ``out_dir`` as a drive that carries this device's latest state: write
    nothing if a bundle of ours there already carries everything this export would, and remove
    our earlier bundles there that the new one carries (the CLI does; an archive folder must not).
    The payload is encrypted (age) to this device, every device it knows by certificate
    that may read the whole filter, and ``encrypt_to``; ``encrypt=False`` writes it in
    the clear (``--no-encrypt``). ``plugins``: None runs the device's own plugins (entry
    points, the home's config, the profile's), as the command line does; ``PluginSet()`` runs none.
    """
    for recipient in encrypt_to:
        check_recipient(recipient)
    plugins = PluginSet.for_device(device) if plugins is None else plugins
    conn = device.conn
    dataset_id, facility_id = device.resolve_facility(facility)
    chain = device.keys.device_chain(dataset_id)
    if chain is None:
        raise StateError(
            f"this device holds no certificate for facility {facility}: run `bundlesync facility provision` "
            "on the facility's authority, or `bundlesync cert request` here and `cert install` the grant"
        )
    check_own_certificate(device, dataset_id, chain, warn or (lambda _: None), now=now)
    # Before anything is written: a lost or replaced key would only make a bundle nobody accepts.
    key = device.keys.signing_key(chain)
    ctx = SyncContext("export", device.home, device.profile, conn, device.instance_id, dataset_id=dataset_id,
                      facility_id=facility_id, local_scope=chain[0].scope,
                      remote_scope=f"user:{user}" if user else None)
    work = ExportWork(device, chain, out_dir, full=full, user=user, since=since, plugins=plugins, now=now,
                      require_mount=require_mount, max_size=max_size, progress=progress, supersede=supersede,
                      encrypt=encrypt, encrypt_to=encrypt_to, key=key)
    plugins.transfer_hooks("pre_transfer", ctx, warn or (lambda _: None))
    try:
        with write_transaction(conn):
            plugins.run_stage(Stage.INITIALIZING, ctx, work)
        _operations(plugins, Stage.SERIALIZING, ctx, write=True)
        plugins.run_builtin(Stage.SERIALIZING, ctx, work)  # short write transactions of its own
        _operations(plugins, Stage.QUEUING, ctx, write=False)
        plugins.run_builtin(Stage.QUEUING, ctx, work)  # short reads: the app keeps writing meanwhile
        if work.result.records:
            _operations(plugins, Stage.TRANSFERRING, ctx, write=True)
            plugins.run_builtin(Stage.TRANSFERRING, ctx, work)  # the file only: no transaction held
            with write_transaction(conn):
                plugins.run_stage(Stage.CLEANUP, ctx, work)
        else:
            work.discard()
    except BaseException:
        work.discard()
        raise
    finally:
        if work.spool is not None:
            work.spool.close()
    work.result.path = work.path
    if work.path is not None:
        work.replace_superseded()  # only now: the new bundle is verified and its transfer recorded
    for line in work.skipped_receipts:
        (warn or (lambda _: None))(f"warning: ignored receipt {line}")
    for notice in (work.clock_warning, held_warning(conn)):
        if notice is not None:
            (warn or (lambda _: None))(notice)
    plugins.transfer_hooks("post_transfer", ctx, warn or (lambda _: None))
    return work.result
