"""Import: verify a bundle completely, then apply it in one transaction.

The pipeline is :class:`ImportWork`: one built-in operation per stage, run after
the plugins' operations of that stage:

INITIALIZING   copy the bundle off the medium into the home's staging folder, hashing as it
               goes (so what is verified is exactly what gets applied, even if the drive is
               pulled or changed afterwards); check integrity first, then format, profile,
               the signer's certificate chain to the facility root this device trusts, and
               the signature. Plugins hear of the bundle only after these checks.
TRANSFERRING   decompress the staged copy once (record count and sizes) before any write.
SERIALIZING    (one write transaction from here on) pending local edits become versions
               first, so they meet incoming ones in the merge, not in the app table.
DEQUEUING      merge every acceptable record into the store by version vectors, and write
               the winners' app rows whose parents are in place (one decode per record).
DESERIALIZING  write the rows still waiting — a parent later in the bundle, or rows left by
               earlier imports — table by table in foreign-key order.
CLEANUP        advance knowledge (FSIC) where contiguous, record gaps and the transfer.

The copy and the checks happen before any plugin runs or anything is written. Then
every stage, plugin operations included, runs in one SQLite transaction: a failure or
``kill -9`` leaves the database as before or as after. A bundle already imported is
recognised after the checks and changes nothing.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

from bundlesync.format import container as container
from bundlesync.replica import fsic as fsic_mod
from bundlesync.trust.certs import Certificate, verify_chain
from bundlesync.trust.crypto import verify
from bundlesync.replica.db import write_transaction
from bundlesync.sync.dequeue import DequeueResult, dequeue
from bundlesync.sync.deserialize import DeserializeResult, deserialize
from bundlesync.device import Device
from bundlesync.errors import BundlesyncError, CertError, FormatError, ProfileMismatchError, StateError, TrustError
from bundlesync.plugins.hooks import FacilityDataSyncHook
from bundlesync.format.manifest import Manifest
from bundlesync.plugins.operations import IMPORT_STAGES, LocalOperation, Stage, Step, SyncContext
from bundlesync.plugins.loader import PluginSet, Warn
from bundlesync.trust.receipts import make_receipt, write_receipt
from bundlesync.partitions import covered, within
from bundlesync.trust.scope import ScopeFilters, scope_filters
from bundlesync.replica.store import record_transfer, serialize_changes
from bundlesync.replica.tracking import suppressed

__all__ = ["ImportResult", "ImportWork", "VerifiedBundle", "import_bundle", "verify_bundle"]

APPLY_BATCH_BYTES = 2 << 20
"""Record lines merged and written per batch: bounds memory (decoded rows) whatever the bundle size."""


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose manifest and signer passed every check."""

    info: container.BundleInfo
    manifest: Manifest
    signer: Certificate
    signer_scope: ScopeFilters


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
    signer = verify_chain(chain, root, dataset_id=manifest.dataset_id)
    try:
        verify(signer.subject_key, "bundle", info.digest, info.signature)
    except TrustError as exc:
        raise TrustError(
            f"{shown_as or info.path.name}: the signature does not match its signer's certificate {signer.cert_id} "
            f"({signer.scope}): it was altered or forged; do not import it, ask the sender for a fresh export"
        ) from exc
    if not covered(list(manifest.filter), [manifest.dataset_id]):
        raise TrustError(f"bundle filter {list(manifest.filter)} reaches outside its facility: refusing it")
    return VerifiedBundle(info, manifest, signer, scope_filters(profile, manifest.dataset_id, signer.scope))


def _check_payload(info: container.BundleInfo) -> None:
    """Decompress once before trusting the stream: bad frames or counts fail here, not mid-apply."""
    for _ in container.iter_record_batches(info):
        pass


def _require_file(path: Path) -> None:
    if not path.is_file():
        what = "a directory" if path.is_dir() else "not a file"
        raise FormatError(f"{path} is {what}, not a bundle: check the path (a bundle is named bundle-….bsync)")


def verify_bundle(device: Device, path: Path) -> VerifiedBundle:
    """Everything import checks, without writing anything. Raises a :class:`BundleError`."""
    _require_file(path)
    info = container.read_info(path)
    container.verify_digest(info)  # integrity first: damage must not be reported as a trust problem
    verified = check_trust(device, info)
    _check_payload(info)
    return verified


class ImportWork(FacilityDataSyncHook):
    """bundlesync's own import work, one operation per stage."""

    def __init__(self, device: Device, path: Path, plugins: PluginSet) -> None:
        self.device, self.source, self.plugins = device, path, plugins
        self.staged = device.staging / f"{path.name}.importing"
        self.verified: VerifiedBundle | None = None
        self.result = ImportResult("", path)
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

    def stage_and_check(self) -> None:
        """Copy the bundle off the medium (digest checked on the way), then check its signer."""
        info = container.copy_verified(self.source, self.staged)
        self.verified = check_trust(self.device, info, shown_as=self.source.name)

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

    # TRANSFERRING
    def transfer(self, ctx: SyncContext) -> None:
        _check_payload(self._verified().info)

    # SERIALIZING
    def serialize(self, ctx: SyncContext) -> None:
        self.result.local_serialized = serialize_changes(ctx.connection, ctx.profile).versions

    # DEQUEUING
    def dequeue(self, ctx: SyncContext) -> None:
        verified = self._verified()
        with suppressed(ctx.connection):
            self.result.dequeue = dequeue(
                ctx.connection, ctx.profile, container.iter_record_batches(verified.info, APPLY_BATCH_BYTES),
                signer_write=verified.signer_scope.write, local_read=self._local_read(ctx),
                bundle_id=self.result.bundle_id, detected_at=self.now, written=self.result.deserialize,
                signer_may_purge=verified.signer.scope == "full",
            )
        ctx.counts["received"] = self.result.dequeue.received
        ctx.counts["outcomes"] = dict(self.result.dequeue.outcomes)

    def _local_read(self, ctx: SyncContext) -> tuple[str, ...]:
        assert ctx.dataset_id is not None
        if ctx.local_scope is None:
            return (ctx.dataset_id,)
        return scope_filters(ctx.profile, ctx.dataset_id, ctx.local_scope).read

    # DESERIALIZING
    def deserialize(self, ctx: SyncContext) -> None:
        with suppressed(ctx.connection):
            deserialize(ctx.connection, ctx.profile, self.result.deserialize)
        ctx.counts["written"] = self.result.deserialize.written
        ctx.counts["deleted"] = self.result.deserialize.deleted

    # CLEANUP
    def record(self, ctx: SyncContext) -> None:
        verified, conn, r = self._verified(), ctx.connection, self.result
        m = verified.manifest
        local_read = self._local_read(ctx)
        r.advanced = tuple(p for p in m.filter if within(p, verified.signer_scope.write) and within(p, local_read))
        if r.advanced:
            r.gaps = fsic_mod.advance(conn, r.advanced, m.basis_fsic, m.result_fsic)
        for inst, (have, need) in r.gaps.items():
            conn.execute(
                "INSERT INTO bundlesync_gaps (dataset_id, inst, have, need, bundle_id, at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (dataset_id, inst) DO UPDATE SET have = excluded.have, need = max(need, excluded.need), "
                "bundle_id = excluded.bundle_id, at = excluded.at",
                (m.dataset_id, inst, have, need, m.bundle_id, self.now),
            )
        held = fsic_mod.held(fsic_mod.read_rows(conn), list(r.advanced or local_read))
        for inst, need in conn.execute("SELECT inst, need FROM bundlesync_gaps WHERE dataset_id = ?",
                                       (m.dataset_id,)).fetchall():
            if held.get(inst, 0) >= need:
                conn.execute("DELETE FROM bundlesync_gaps WHERE dataset_id = ? AND inst = ?", (m.dataset_id, inst))
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


def leave_receipt(device: Device, dataset_id: str, folder: Path) -> Path:
    """Write this device's signed receipt for ``dataset_id`` into ``folder`` (e.g. the drive)."""
    chain = device.keys.device_chain(dataset_id)
    if chain is None:
        raise StateError(f"this device holds no certificate for dataset {dataset_id}, so it cannot sign a receipt")
    prefixes = scope_filters(device.profile, dataset_id, chain[0].scope).read
    held = fsic_mod.held(fsic_mod.read_rows(device.conn), prefixes)
    receipt = make_receipt(dataset_id, device.instance_id, prefixes, held, chain)
    return write_receipt(folder, receipt, device.keys.signing_key(chain))


def import_bundle(device: Device, path: Path, *, plugins: PluginSet | None = None,
                  warn: Warn | None = None, receipt: bool = True) -> ImportResult:
    """Verify, then apply one bundle atomically; a re-import is a no-op."""
    _require_file(path)
    plugins = plugins or PluginSet()
    warn = warn or (lambda _: None)
    conn = device.conn
    ctx = SyncContext("import", device.home, device.profile, conn, device.instance_id, bundle_path=path)
    work = ImportWork(device, path, plugins)
    try:
        # Integrity and signer are checked before plugins hear of the bundle (their hooks get its facility).
        work.stage_and_check()
        work.describe(ctx)
        already = conn.execute("SELECT 1 FROM bundlesync_transfers WHERE bundle_id = ? AND direction = 'import'",
                               (work.result.bundle_id,)).fetchone()
        work.result.already = already is not None
        if not work.result.already:
            plugins.transfer_hooks("pre_transfer", ctx, warn)
            # Every stage, plugin operations included, commits or rolls back with the data.
            with write_transaction(conn):
                for stage in IMPORT_STAGES:
                    plugins.run_stage(stage, ctx, work)
    finally:
        work.staged.unlink(missing_ok=True)
    if receipt and ctx.dataset_id is not None:
        try:
            work.result.receipt = leave_receipt(device, ctx.dataset_id, path.parent)
        except (OSError, BundlesyncError) as exc:
            work.result.warnings.append(f"warning: could not leave a receipt next to {path.name}: {exc}")
    for line in work.result.warnings:
        warn(line)
    if not work.result.already:
        plugins.transfer_hooks("post_transfer", ctx, warn)
    return work.result
