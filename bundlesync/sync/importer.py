"""Import: verify a bundle completely, then apply it in short transactions beside the running app.

The pipeline is :class:`ImportWork`: one built-in operation per stage, run after
the plugins' operations of that stage:

INITIALIZING   copy the bundle off the medium into the home's staging folder, hashing as it
               goes (so what is verified is exactly what gets applied, even if the drive is
               pulled or changed afterwards); check integrity first, then format, profile,
               the signer's certificate chain to the facility root this device trusts, and
               the signature. Plugins hear of the bundle only after these checks.
TRANSFERRING   decompress the staged copy and parse every record line before any write, so a
               malformed line never leaves a bundle half-applied.
SERIALIZING    pending local edits become versions first, so they meet incoming ones in the
               merge, not in the app table.
DEQUEUING      merge every acceptable record into the store by version vectors, and write
               the winners' app rows whose parents are in place (one decode per record). The
               lines are parsed and decoded ahead, while the import rests between transactions.
DESERIALIZING  write the rows still waiting — a parent later in the bundle, or rows left by
               earlier imports — table by table in foreign-key order.
CLEANUP        advance knowledge (FSIC) where contiguous, record gaps, peers and the transfer.

Transactions. The app keeps writing to the same database while an import runs, so
SERIALIZING, DEQUEUING and DESERIALIZING work in short write transactions (about
:data:`~bundlesync.replica.pacing.HOLD_S` each, paced by :class:`~bundlesync.replica.pacing.Pacer`
so a waiting app writer gets the lock between two of them). Every such transaction of
DEQUEUING and DESERIALIZING first turns the app's edits made since the last one into
versions, then applies its slice with tracking suppressed (the ``bundlesync_applying`` row
is set and cleared inside the transaction, so the app never sees it), so an app edit made
between two transactions meets the incoming version in the merge. The state after any
transaction is a state of the merge: the store is a join, and it does not matter which
part of the bundle's versions has arrived. Knowledge, gaps, peers learnt and the transfer
record (which makes a re-import a no-op) are written only in the last transaction, with
CLEANUP. A failure or ``kill -9`` at any point leaves a valid database (app rows consistent
with the store, nothing recorded), and importing the same bundle again completes it: the
records already merged are "already here", nothing is applied twice, no conflict is logged
twice.

Plugin operations: a stage's plugin operations run together in one write transaction of
their own, just before bundlesync's own work of that stage (at CLEANUP, in the last
transaction, before knowledge and transfer are recorded). A DEQUEUING operation sees no
record of this bundle merged yet (unless an interrupted run of the same bundle merged some),
a DESERIALIZING operation sees every record merged and the rows that could be written, a
CLEANUP operation sees everything. An operation that raises rolls back its own transaction
and stops the import before the transfer is recorded: what earlier stages applied stays
(a valid state), and importing the bundle again completes it.

The copy and the checks happen before any plugin runs or anything is written. A bundle
already imported is recognised by its id before the copy: it is checked where it lies
(digest, signer), neither copied nor decrypted, and changes nothing.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bundlesync.format import container as container
from bundlesync.replica import fsic as fsic_mod
from bundlesync.replica import knowledge as kn
from bundlesync.replica.peers import learn
from bundlesync.trust.certs import Certificate, verify_chain
from bundlesync.trust.crypto import verify
from bundlesync.replica.clock import SKEW_TOLERANCE_MS, iso_ms, now_ms, parse_iso_ms, skew_warning
from bundlesync.replica.db import write_transaction
from bundlesync.replica.pacing import Over, Pacer
from bundlesync.sync.dequeue import DequeueResult, Dequeuer, Prepared
from bundlesync.sync.deserialize import DeserializeResult, count_unplaced, placing
from bundlesync.device import Device
from bundlesync.errors import EXIT_PARTIAL, BundlesyncError, CertError, FormatError, ProfileMismatchError, StateError, TrustError
from bundlesync.plugins.hooks import FacilityDataSyncHook
from bundlesync.format.manifest import Manifest
from bundlesync.format.records import check_records
from bundlesync.plugins.operations import IMPORT_STAGES, LocalOperation, Stage, Step, SyncContext
from bundlesync.plugins.loader import PluginSet, Warn
from bundlesync.trust.receipts import make_receipt, write_receipt
from bundlesync.trust.revocation import Revocation, check_not_revoked, parse_revocations
from bundlesync.partitions import covered, within
from bundlesync.trust.scope import ScopeFilters, scope_filters
from bundlesync.replica.store import SerializeResult, held_warning, record_transfer, serialize_changes
from bundlesync.replica.tracking import suppressed

__all__ = [
    "ImportResult",
    "ImportWork",
    "VerifiedBundle",
    "bundles_to_import",
    "exit_rank",
    "failure_json",
    "import_bundle",
    "read_records",
    "verify_bundle",
]

Progress = Callable[[int, int], None]
"""Told (records applied, records in the bundle) as the import goes; the CLI draws a progress bar."""

STAGING_SUFFIX = ".importing"
"""Ends the name of a bundle's private copy in the home's ``staging/`` while it is imported."""

APPLY_BATCH_BYTES = 2 << 20
"""Record lines read from the payload at a time: bounds memory whatever the bundle size."""

SLICE_RECORDS = 250
"""Records merged per step: a short transaction takes steps until its time is up."""

PLACE_BATCH = 500
"""Waiting rows written per step of DESERIALIZING."""

AHEAD_RECORDS = 8000
"""Most records parsed ahead of the merge (during rests): about what one rest prepares; bounds the memory
it takes (~14 MB at 100k-record bundles: +17 MB peak RSS at 10,000)."""

_END = object()


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose manifest and signer passed every check."""

    info: container.BundleInfo
    manifest: Manifest
    signer: Certificate
    signer_scope: ScopeFilters
    revocations: tuple[Revocation, ...] = ()


@dataclass
class ImportResult:
    """What an import did."""

    bundle_id: str
    path: Path
    already: bool = False
    local_serialized: int = 0
    dequeue: DequeueResult = field(default_factory=DequeueResult)
    deserialize: DeserializeResult = field(default_factory=DeserializeResult)
    gaps: dict[str, tuple[int, int]] = field(default_factory=dict)
    advanced: tuple[str, ...] = ()
    warnings: list[str] = field(default_factory=list)
    receipt: Path | None = None
    own: bool = False
    """The bundle was written by this device: nothing was imported."""

    @property
    def complete(self) -> bool:
        """Every record of the bundle that concerns this device is in the app tables (or already was).

        Records refused (scope, partition), rows waiting for a parent or refused by the
        database, and gaps in a writer's history make the import incomplete.
        """
        if self.already or self.own:
            return True
        dq, ds = self.dequeue, self.deserialize
        return not (dq.refused or ds.waiting or ds.failed or self.gaps)

    @property
    def exit_code(self) -> int:
        """0, or :data:`~bundlesync.errors.EXIT_PARTIAL` when the import is not complete."""
        return 0 if self.complete else EXIT_PARTIAL

    def to_json(self) -> dict[str, object]:
        """The ``import --json`` report of this bundle."""
        dq, ds = self.dequeue, self.deserialize
        return {
            "path": str(self.path), "bundle_id": self.bundle_id, "already_imported": self.already,
            "own_bundle": self.own, "received": dq.received, "outcomes": dq.outcomes, "refused": dq.refused,
            "refused_sample": dq.refused_sample, "not_for_this_device": dq.not_for_us,
            "written": ds.written, "deleted": ds.deleted, "waiting": ds.waiting, "failed": ds.failed,
            "gaps": {k: {"have": h, "need": n} for k, (h, n) in self.gaps.items()},
            "receipt": str(self.receipt) if self.receipt else None,
            "local_changes_serialized": self.local_serialized,
            "complete": self.complete, "exit_code": self.exit_code, "error": None,
        }


def check_trust(device: Device, info: container.BundleInfo, *, shown_as: str | None = None) -> VerifiedBundle:
    """Manifest, profile, certificate chain and signature (not the payload bytes)."""
    manifest = Manifest.from_dict(info.manifest)
    profile = device.profile
    if (manifest.profile_name, manifest.profile_version) != (profile.name, profile.version):
        raise ProfileMismatchError(
            f"bundle was written for profile {manifest.profile_name} v{manifest.profile_version}, this device "
            f"uses {profile.name} v{profile.version}: upgrade the older device so both use the same profile"
        )
    root = device.keys.trusted_root(manifest.dataset_id)
    if root is None:
        raise TrustError(
            f"this device does not trust facility {manifest.facility_id} (dataset {manifest.dataset_id}) yet: "
            "run `bundlesync cert request` here, `cert issue` on its authority, then `cert install` the grant"
        )
    try:
        chain = [Certificate.from_dict(c) for c in manifest.chain]
    except CertError as exc:
        raise TrustError(f"bundle's certificate chain is malformed ({exc}); refusing it") from exc
    name = shown_as or info.path.name
    try:
        signer = verify_chain(chain, root, dataset_id=manifest.dataset_id)
    except TrustError as exc:
        raise TrustError(f"{name}: {exc}") from exc
    # Revocations this device holds, and those the bundle carries (verified against the root).
    carried = parse_revocations(list(manifest.revocations), root)
    check_not_revoked(chain, [*device.keys.revocations(manifest.dataset_id), *carried], what=f"bundle {name}")
    try:
        verify(signer.subject_key, "bundle", info.digest, info.signature)
    except TrustError as exc:
        raise TrustError(
            f"{shown_as or info.path.name}: the signature does not match its signer's certificate {signer.cert_id} "
            f"({signer.scope}): it was altered or forged; do not import it, ask the sender for a fresh export"
        ) from exc
    if not covered(list(manifest.filter), [manifest.dataset_id]):
        raise TrustError(f"bundle filter {list(manifest.filter)} reaches outside its facility: refusing it")
    encrypted = bool(info.flags & container.FLAG_ENCRYPTED)
    if encrypted != (manifest.recipients is not None):
        raise FormatError(f"{name}: its manifest and its flags disagree on whether it is encrypted; "
                          "ask the sender for a fresh export")
    if manifest.recipients is not None:
        mine = device.keys.recipient()
        if mine not in manifest.recipients:
            raise TrustError(
                f"{name} is encrypted to {', '.join(manifest.recipients)}, and this device ({mine}) is not one "
                f"of them: ask the sender to export again with --encrypt-to {mine}"
            )
    return VerifiedBundle(info, manifest, signer, scope_filters(profile, manifest.dataset_id, signer.scope),
                          tuple(carried))


def open_payload(device: Device, verified: VerifiedBundle, plain: Path, *, shown_as: str) -> VerifiedBundle:
    """The bundle as read for its records: an encrypted payload is decrypted into ``plain``
    (in the home's staging folder) and checked against the plaintext digest its signer signed."""
    if not verified.info.flags & container.FLAG_ENCRYPTED:
        return verified
    info = container.decrypt_payload(verified.info, plain, device.keys.encryption_secret(), shown_as=shown_as)
    return dataclasses.replace(verified, info=info)


def _require_file(path: Path) -> None:
    if not path.is_file():
        what = "a directory" if path.is_dir() else "not a file"
        hint = " and holds no bundle" if path.is_dir() else ""
        raise FormatError(f"{path} is {what}{hint}, not a bundle: check the path (a bundle is named bundle-….bsync)")


def _check_records(info: container.BundleInfo) -> None:
    """The payload pass with every record line parsed, exactly as import's DEQUEUING parses it."""
    for batch in container.iter_record_batches(info):
        check_records(batch)


@contextlib.contextmanager
def opened_bundle(device: Device, path: Path) -> Iterator[VerifiedBundle]:
    """Every check import makes, in the same order, without writing to the database.

    Import refuses a bundle for the same reasons: the container (structure, limits,
    digest), trust (profile, chain, signature, revocation) and the payload (frame, counts,
    and every record line parsed, clocks in range). Per-record refusals (scope, partition)
    are not refusals of the bundle; ``import`` reports them. Yields the readable bundle: an
    encrypted payload is decrypted into the home's staging folder for the duration.
    """
    _require_file(path)
    info = container.read_info(path)
    container.verify_digest(info)  # integrity first: damage must not be reported as a trust problem
    verified = check_trust(device, info)
    plain = device.staging / f"{path.name}.{secrets.token_hex(4)}.plain"
    try:
        readable = open_payload(device, verified, plain, shown_as=path.name)
        _check_records(readable.info)
        yield readable
    finally:
        plain.unlink(missing_ok=True)


def verify_bundle(device: Device, path: Path) -> VerifiedBundle:
    """Everything import checks, without writing anything. Raises a :class:`BundleError` or :class:`TrustError`."""
    with opened_bundle(device, path) as verified:
        return dataclasses.replace(verified, info=container.read_info(path))


def read_records(device: Device, path: Path) -> Iterator[bytes]:
    """The record lines of a bundle, after every check :func:`verify_bundle` makes."""
    with opened_bundle(device, path) as verified:
        yield from container.iter_records(verified.info)


class ImportWork(FacilityDataSyncHook):
    """bundlesync's own import work, one operation per stage."""

    def __init__(self, device: Device, path: Path, plugins: PluginSet, progress: Progress | None = None,
                 between: Callable[[], None] | None = None) -> None:
        self.device, self.source, self.plugins, self.progress = device, path, plugins, progress
        self.between = between
        self.staged = device.staging / _staging_name(path)
        self.plain = self.staged.with_name(self.staged.name + ".plain")  # the decrypted payload: never on the drive
        self.verified: VerifiedBundle | None = None
        self.result = ImportResult("", path)
        self.serialized = SerializeResult()
        self.pacer: Pacer | None = None
        self.now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.initializing_operations: list[LocalOperation] = [Step("check the signer", self.initialize)]
        self.transferring_operations: list[LocalOperation] = [Step("copy and verify the bundle", self.transfer)]
        self.serializing_operations: list[LocalOperation] = [Step("serialize local changes", self.serialize)]
        self.dequeuing_operations: list[LocalOperation] = [Step("merge records into the store", self.dequeue)]
        self.deserializing_operations: list[LocalOperation] = [Step("write app rows", self.deserialize)]
        self.cleanup_operations: list[LocalOperation] = [Step("advance knowledge, record", self.record)]

    def _verified(self) -> VerifiedBundle:
        assert self.verified is not None
        return self.verified

    def recognise_imported(self, conn: sqlite3.Connection) -> bool:
        """True for a bundle this device has imported before, checked where it lies (nothing to copy or decrypt).

        Its digest and signer are checked as for any bundle (the file must be the very bundle that was
        imported); its records are not read: importing it again changes nothing.
        """
        info = container.read_info(self.source)
        bundle_id = info.manifest.get("bundle_id")
        if not isinstance(bundle_id, str) or not _already_imported(conn, bundle_id):
            return False
        container.verify_digest(info)
        self.verified = check_trust(self.device, info, shown_as=self.source.name)
        return True

    def stage_and_check(self) -> None:
        """Copy the bundle off the medium (digest checked on the way), then check its signer."""
        info = container.copy_verified(self.source, self.staged)
        verified = check_trust(self.device, info, shown_as=self.source.name)
        self.verified = open_payload(self.device, verified, self.plain, shown_as=self.source.name)

    # INITIALIZING
    def initialize(self, ctx: SyncContext) -> None:
        # The bundle itself was checked by stage_and_check() before any stage ran.
        known = {(op.get("plugin"), op.get("operation")) for op in self.plugins.manifest_entries(list(Stage))}
        missing: set[tuple[object, object]] = set()
        for op in self._verified().manifest.operations:
            key = (op.get("plugin"), op.get("operation"))
            if key not in known and key not in missing:
                missing.add(key)
                self.result.warnings.append(
                    f"warning: the bundle was exported with operation {op.get('operation')} of plugin "
                    f"{op.get('plugin')} {op.get('version') or ''}, which is not loaded here; install it if its "
                    "effects matter on this device"
                )

    def describe(self, ctx: SyncContext) -> None:
        """Fill the context from the verified manifest."""
        verified = self._verified()
        m = verified.manifest
        ctx.manifest, ctx.dataset_id, ctx.facility_id, ctx.filter = m, m.dataset_id, m.facility_id, m.filter
        ctx.remote_scope = verified.signer.scope
        chain = self.device.keys.device_chain(m.dataset_id)
        ctx.local_scope = chain[0].scope if chain else None
        self.result.bundle_id = m.bundle_id

    def run(self, ctx: SyncContext) -> None:
        """Every stage after the checks, each in its own transactions (see the module docstring)."""
        conn = ctx.connection
        self.pacer = Pacer(conn, between=self.between)
        for stage in IMPORT_STAGES:
            if stage is Stage.CLEANUP:
                with write_transaction(conn):
                    # Another run may have recorded the same bundle meanwhile (runs of one home take turns
                    # under its lock; a program calling import_bundle itself may not).
                    if _already_imported(conn, self.result.bundle_id):
                        self.result.already = True
                        return
                    self.plugins.run_stage(stage, ctx, self)
                continue
            if self.plugins.operations(stage):
                with write_transaction(conn):
                    self.plugins.run_operations(stage, ctx)
            self.plugins.run_builtin(stage, ctx, self)

    def _serialize_pending(self, ctx: SyncContext, over: Over) -> bool:
        """Turn the app's logged edits into versions, in the caller's transaction; False if time ran out first."""
        serialized = serialize_changes(ctx.connection, ctx.profile, until=over)
        self.serialized.add(serialized)
        self.result.local_serialized = self.serialized.versions
        return serialized.done

    def _apply(self, ctx: SyncContext, steps: Iterator[None], begin: Callable[[], None]) -> None:
        """Take ``steps`` in short write transactions, each on top of the app's latest edits.

        Each transaction first serializes what the app logged since the previous one (a
        transaction that runs out of time doing so applies nothing), then calls ``begin``
        and takes steps, with tracking suppressed, until its time is up.
        """
        assert self.pacer is not None
        conn = ctx.connection
        more = True
        while more:
            with self.pacer.transaction() as over:
                if not self._serialize_pending(ctx, over):
                    continue
                begin()
                # The applying row is set and cleared inside this transaction: the app never sees it, so its
                # edits between two transactions are tracked.
                with suppressed(conn):
                    while True:
                        if next(steps, _END) is _END:
                            more = False
                            break
                        if over():
                            break

    # TRANSFERRING
    def transfer(self, ctx: SyncContext) -> None:
        # Parse every line now: a malformed one must stop the import before anything is applied.
        _check_records(self._verified().info)

    # SERIALIZING
    def serialize(self, ctx: SyncContext) -> None:
        assert self.pacer is not None
        done = False
        while not done:
            with self.pacer.transaction() as over:
                done = self._serialize_pending(ctx, over)

    # DEQUEUING
    def dequeue(self, ctx: SyncContext) -> None:
        assert self.pacer is not None
        verified = self._verified()
        merger = Dequeuer(
            ctx.connection, ctx.profile, signer_write=verified.signer_scope.write, local_read=self._local_read(ctx),
            bundle_id=self.result.bundle_id, detected_at=self.now, written=self.result.deserialize,
            signer_may_purge=verified.signer.scope == "full",
        )
        self.result.dequeue = merger.result
        ahead = _Ahead(merger.prepare, _slices(container.iter_record_batches(verified.info, APPLY_BATCH_BYTES)))
        # Slices are parsed and checked ahead while the pacer rests (no lock held), not while the app waits.
        self.pacer.meanwhile = ahead.fill
        try:
            self._apply(ctx, self._merged(merger, ahead), merger.new_transaction)
        finally:
            self.pacer.meanwhile = None
        ctx.counts["received"] = self.result.dequeue.received
        ctx.counts["outcomes"] = dict(self.result.dequeue.outcomes)

    def _merged(self, merger: Dequeuer, ahead: _Ahead) -> Iterator[None]:
        """One step per slice: each ``next()`` merges the next prepared slice, then tells :attr:`progress`."""
        total = int(str(self._verified().info.summary.get("records", 0)))
        done = 0
        for prepared, count in ahead:
            merger.merge_prepared(prepared)
            done += count
            if self.progress is not None:
                self.progress(done, max(total, done))
            yield

    def _local_read(self, ctx: SyncContext) -> tuple[str, ...]:
        assert ctx.dataset_id is not None
        if ctx.local_scope is None:
            return (ctx.dataset_id,)
        return scope_filters(ctx.profile, ctx.dataset_id, ctx.local_scope).read

    # DESERIALIZING
    def deserialize(self, ctx: SyncContext) -> None:
        self._apply(ctx, placing(ctx.connection, ctx.profile, self.result.deserialize, PLACE_BATCH), lambda: None)
        ctx.counts["written"] = self.result.deserialize.written
        ctx.counts["deleted"] = self.result.deserialize.deleted

    # CLEANUP (the last transaction)
    def record(self, ctx: SyncContext) -> None:
        verified, conn, r = self._verified(), ctx.connection, self.result
        m = verified.manifest
        count_unplaced(conn, r.deserialize)
        local_read = self._local_read(ctx)
        # Knowledge advances where the bundle's records could all land: inside its filter, the
        # signer's write scope (else refused) and this device's read scope (else skipped).
        r.advanced = kn.intersect(kn.intersect(m.filter, verified.signer_scope.write), local_read)
        if r.advanced:
            r.gaps = fsic_mod.advance_knowledge(conn, r.advanced, m.basis, m.held, dataset_id=m.dataset_id,
                                                bundle_id=m.bundle_id)
        # The signer held at least this when it wrote the bundle: what later exports may assume of it.
        learn(conn, m.dataset_id, m.sender_instance, scope=verified.signer.scope, read=verified.signer_scope.read,
              knowledge=m.held, source=f"bundle {m.bundle_id[:8]}", at=m.created_at)
        for inst, (have, need) in r.gaps.items():
            conn.execute(
                "INSERT INTO bundlesync_gaps (dataset_id, inst, have, need, bundle_id, at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (dataset_id, inst) DO UPDATE SET have = excluded.have, need = max(need, excluded.need), "
                "bundle_id = excluded.bundle_id, at = excluded.at",
                (m.dataset_id, inst, have, need, m.bundle_id, self.now),
            )
        # A gap closes once every claim that waited on it has been taken (see fsic.advance_knowledge).
        still = fsic_mod.pending_instances(conn, m.dataset_id)
        conn.executemany("DELETE FROM bundlesync_gaps WHERE dataset_id = ? AND inst = ?",
                         [(m.dataset_id, inst) for (inst,) in conn.execute(
                             "SELECT inst FROM bundlesync_gaps WHERE dataset_id = ?", (m.dataset_id,)).fetchall()
                          if inst not in still])
        r.gaps = {inst: gap for inst, gap in r.gaps.items() if inst in still}
        dq, ds = r.dequeue, r.deserialize
        stats = {
            "outcomes": dq.outcomes, "out_of_scope": dq.out_of_scope, "bad_partition": dq.bad_partition,
            "not_for_us": dq.not_for_us, "written": ds.written, "deleted": ds.deleted, "waiting": ds.waiting,
            "failed": ds.failed, "gaps": {k: list(v) for k, v in r.gaps.items()},
        }
        record_transfer(
            conn, bundle_id=m.bundle_id, direction="import", dataset_id=m.dataset_id, prefixes=m.filter,
            peer_instance=m.sender_instance, path=str(r.path), at=self.now, records=dq.received, stats=stats,
            result_fsic=m.result_fsic,
        )


def _slices(batches: Iterator[list[bytes]]) -> Iterator[list[bytes]]:
    """The batches cut into slices of :data:`SLICE_RECORDS`."""
    for batch in batches:
        for start in range(0, len(batch), SLICE_RECORDS):
            yield batch[start : start + SLICE_RECORDS]


class _Ahead:
    """Slices prepared ahead (:meth:`Dequeuer.prepare`: no database), at most :data:`AHEAD_RECORDS` records.

    Iterating yields ``(prepared slice, records in it)`` in order, from what :meth:`fill`
    prepared during rests first, preparing the next slice on the spot when none is ready.
    """

    def __init__(self, prepare: Callable[[list[bytes]], Prepared], slices: Iterator[list[bytes]]) -> None:
        self.prepare, self.slices = prepare, slices
        self.ready: collections.deque[tuple[Prepared, int]] = collections.deque()
        self.records = 0  # in self.ready
        self.exhausted = False

    def _one(self) -> tuple[Prepared, int] | None:
        lines = next(self.slices, None)
        if lines is None:
            self.exhausted = True
            return None
        return self.prepare(lines), len(lines)

    def fill(self, until: float) -> bool:
        """Prepare slices until ``until`` (see :data:`~bundlesync.replica.pacing.Meanwhile`)."""
        while not self.exhausted and self.records < AHEAD_RECORDS:
            if time.monotonic() >= until:
                return True
            item = self._one()
            if item is not None:
                self.ready.append(item)
                self.records += item[1]
        return False

    def __iter__(self) -> Iterator[tuple[Prepared, int]]:
        while self.ready or not self.exhausted:
            if self.ready:
                prepared, count = self.ready.popleft()
                self.records -= count
                yield prepared, count
            elif (item := self._one()) is not None:
                yield item


def leave_receipt(device: Device, dataset_id: str, folder: Path) -> Path:
    """Write this device's signed receipt for ``dataset_id`` into ``folder`` (e.g. the drive)."""
    chain = device.keys.device_chain(dataset_id)
    if chain is None:
        raise StateError(f"this device holds no certificate for dataset {dataset_id}, so it cannot sign a receipt")
    prefixes = scope_filters(device.profile, dataset_id, chain[0].scope).read
    knowledge = kn.clip(fsic_mod.read_knowledge(device.conn), prefixes)
    receipt = make_receipt(dataset_id, device.instance_id, prefixes, kn.flat(knowledge, prefixes), chain, knowledge)
    return write_receipt(folder, receipt, device.keys.signing_key(chain))


def failure_json(path: Path, exc: BaseException) -> dict[str, object]:
    """The ``import --json`` entry of a bundle that could not be imported (nothing of it was applied)."""
    if isinstance(exc, BundlesyncError):
        return {"path": str(path), "error": f"error: {exc}", "exit_code": exc.exit_code, "complete": False}
    return {"path": str(path), "error": f"error: {path}: {exc}; check the path and permissions", "exit_code": 1,
            "complete": False}


def exit_rank(code: int) -> int:
    """How serious an exit code is: success, then a partial import, then failures by code."""
    return 0 if code == 0 else 1 if code == EXIT_PARTIAL else 2 + code


def bundles_to_import(names: Sequence[str]) -> list[Path]:
    """The bundles named on the command line, each folder replaced by the bundles in it.

    A folder's bundles (``*.bsync``, or the first volume of a split one; ``*.partial`` files are
    unfinished writes) come in the
    order that avoids needless waits and gaps: by sender, then by the sender's counter, so
    each writer's history arrives in the order it was written. Files whose header cannot be
    read come last (importing them reports why).
    """
    out: list[Path] = []
    for name in names:
        path = Path(name)
        if not path.is_dir():
            out.append(path)
            continue
        keyed: list[tuple[tuple[int, str, int, str], Path]] = []
        # A bundle split into volumes is imported once, through its first volume.
        for bundle in sorted({*path.glob("*.bsync"), *path.glob("*.bsync.001-of-[0-9][0-9][0-9]")}):
            try:
                m = Manifest.from_dict(container.read_info(bundle).manifest)
                key = (0, m.sender_instance, m.sender_counter, m.created_at)
            except (BundlesyncError, OSError):
                key = (1, "", 0, bundle.name)
            keyed.append((key, bundle))
        # A folder without a bundle stays in the list: importing it says it is not a bundle.
        out.extend([bundle for _, bundle in sorted(keyed)] or [path])
    return out


def _clock_warnings(manifest: Manifest, dq: DequeueResult) -> list[str]:
    """Say so when the bundle or its records come from far in this device's future (a wrong clock)."""
    lines = []
    created = parse_iso_ms(manifest.created_at)
    now = now_ms()
    if created is not None and created > now + SKEW_TOLERANCE_MS:
        lines.append(f"warning: this bundle was created at {iso_ms(created)} UTC by the sender's clock, "
                     f"{(created - now) // 86_400_000} day(s) ahead of this device's: the sender's clock (or this "
                     "one) is wrong; set it right on that device")
    if dq.ahead:
        lines.append(skew_warning(dq.ahead, dq.ahead_max_hlc, "in this bundle"))
    return lines


def _already_imported(conn: sqlite3.Connection, bundle_id: str) -> bool:
    return conn.execute("SELECT 1 FROM bundlesync_transfers WHERE bundle_id = ? AND direction = 'import'",
                        (bundle_id,)).fetchone() is not None


def _staging_name(source: Path) -> str:
    """A private staging name per run: two runs importing the same bundle never share a copy."""
    return f"{source.name}.{os.getpid()}-{secrets.token_hex(4)}{STAGING_SUFFIX}"


def sweep_staging(staging: Path) -> None:
    """Remove copies left by import runs that died (``kill -9``, power cut); live runs' copies stay."""
    for leftover in staging.glob(f"*{STAGING_SUFFIX}*"):
        # <bundle name>.<pid>-<random>.importing[.partial]
        stem = leftover.name.split(STAGING_SUFFIX)[0]
        pid_part = stem.rsplit(".", 1)[-1].split("-", 1)[0]
        if pid_part.isdigit() and _alive(int(pid_part)):
            continue
        try:
            leftover.unlink(missing_ok=True)
        except OSError:  # not a file of ours (a folder someone made): leave it, it is in nobody's way
            continue


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


def import_bundle(device: Device, path: Path, *, plugins: PluginSet | None = None,
                  warn: Warn | None = None, receipt: bool = True, progress: Progress | None = None,
                  between: Callable[[], None] | None = None) -> ImportResult:
    """Verify, then apply one bundle in short transactions, recorded in the last; a re-import is a no-op.

    ``between`` is called after each of the import's short transactions commits, while the
    import holds no lock on the database: a program that runs the import in its own
    process can let its own writers in there (the next transaction serializes their edits).

    ``plugins``: None runs the device's own plugins (entry points, the home's config, the
    profile's), as the command line does; ``PluginSet()`` runs none.
    """
    _require_file(path)
    plugins = PluginSet.for_device(device) if plugins is None else plugins
    warn = warn or (lambda _: None)
    conn = device.conn
    ctx = SyncContext("import", device.home, device.profile, conn, device.instance_id, bundle_path=path)
    sweep_staging(device.staging)
    work = ImportWork(device, path, plugins, progress, between)
    try:
        # Integrity and signer are checked before plugins hear of the bundle (their hooks get its facility).
        if not work.recognise_imported(conn):
            work.stage_and_check()
        work.describe(ctx)
        work.result.own = work._verified().manifest.sender_instance == device.instance_id
        if work.result.own:
            return work.result  # its records are this device's own: nothing to apply, no receipt for itself
        work.result.already = _already_imported(conn, work.result.bundle_id)
        if not work.result.already:
            plugins.transfer_hooks("pre_transfer", ctx, warn)
            work.run(ctx)
    finally:
        work.staged.unlink(missing_ok=True)
        work.plain.unlink(missing_ok=True)
    # After the commit: what the verified bundle taught us about the facility's devices.
    verified = work._verified()
    for rev in verified.revocations:
        device.keys.save_revocation(rev)
    try:
        mine: bytes | None = device.keys.device_key().public_key
    except BundlesyncError:  # a missing or damaged key is reported by the receipt below; the data is in
        mine = None
    if verified.signer.subject_key != mine:
        device.keys.save_peer(verified.signer)
    if receipt and ctx.dataset_id is not None:
        try:
            work.result.receipt = leave_receipt(device, ctx.dataset_id, path.parent)
        except (OSError, BundlesyncError) as exc:
            work.result.warnings.append(f"warning: could not leave a receipt next to {path.name}: {exc}")
    if not work.result.already and work.verified is not None:
        work.result.warnings.extend(_clock_warnings(work.verified.manifest, work.result.dequeue))
    held = held_warning(conn)
    if held is not None:
        work.result.warnings.append(held)
    for line in work.result.warnings:
        warn(line)
    if not work.result.already:
        plugins.transfer_hooks("post_transfer", ctx, warn)
    return work.result
