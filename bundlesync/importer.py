"""Import: verify a bundle completely, then apply it in one transaction.

Stages (DESIGN "How the stages map onto files"):

TRANSFERRING   copy the bundle off the medium into the home's staging folder, hashing as
               it goes, so what is verified is exactly what is applied (the drive may be
               pulled or changed afterwards).
INITIALIZING   check everything before any write: structure, digest, signature,
               certificate chain to the facility root this device trusts, profile, and a
               full decompression pass (record count and sizes).
DEQUEUING      (one write transaction from here) serialize pending local edits first, then
               merge every acceptable record into the store by version vectors.
DESERIALIZING  write the changed store rows into the app tables, parents first.
CLEANUP        advance knowledge (FSIC) where contiguous, record gaps and the transfer;
               commit; remove the staged copy.

A crash or ``kill -9`` at any instant leaves the database as before or as after:
every write above happens in one SQLite transaction.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import bundle as container
from . import fsic as fsic_mod
from .certs import Certificate, verify_chain
from .crypto import verify
from .db import write_transaction
from .dequeue import DequeueResult, dequeue
from .deserialize import DeserializeResult, deserialize
from .device import Device
from .errors import BundleError, CertError, FormatError, ProfileMismatchError, TrustError
from .manifest import Manifest
from .scope import ScopeFilters, covered, scope_filters
from .store import serialize_changes
from .tracking import suppressed

__all__ = ["ImportResult", "VerifiedBundle", "import_bundle", "verify_bundle"]

ProgressFn = Callable[[str, int], None]


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed every check, with what the checks established."""

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


def verify_bundle(device: Device, path: Path, *, info: container.BundleInfo | None = None) -> VerifiedBundle:
    """Everything import checks, without writing anything. Raises a :class:`BundleError`."""
    if info is None:
        if not path.is_file():
            raise FormatError(f"{path} is not a file: check the path (a bundle is named bundle-….bsync)")
        info = container.read_info(path)
        container.verify_digest(info)
    manifest = Manifest.from_dict(info.manifest)
    profile = device.profile
    if (manifest.profile_name, manifest.profile_version) != (profile.name, profile.version):
        raise ProfileMismatchError(
            f"bundle was written for profile {manifest.profile_name} v{manifest.profile_version}, this device "
            f"uses {profile.name} v{profile.version}: upgrade the older device so both use the same profile"
        )
    root = device.keyring.trusted_root(manifest.dataset_id)
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
    verify(signer.subject_key, "bundle", info.digest, info.signature)
    scope = scope_filters(profile, manifest.dataset_id, signer.scope)
    if not covered(list(manifest.filter), [manifest.dataset_id]):
        raise TrustError(f"bundle filter {list(manifest.filter)} reaches outside its facility: refusing it")
    # Decompress once before trusting the stream: truncated frames or wrong counts fail here, not mid-apply.
    for _ in container.iter_record_batches(info):
        pass
    return VerifiedBundle(info, manifest, signer, scope)


def _already_imported(device: Device, bundle_id: str) -> bool:
    row = device.conn.execute(
        "SELECT 1 FROM bundlesync_transfers WHERE bundle_id = ? AND direction = 'import'", (bundle_id,)
    ).fetchone()
    return row is not None


def _local_read_scope(device: Device, dataset_id: str) -> tuple[str, ...]:
    chain = device.keyring.device_chain(dataset_id)
    if chain is None:
        # Trusting the root without a certificate of our own (not expected): accept the facility.
        return (dataset_id,)
    return scope_filters(device.profile, dataset_id, chain[0].scope).read


def import_bundle(device: Device, path: Path, *, progress: ProgressFn | None = None) -> ImportResult:
    """Verify, then apply one bundle atomically; a re-import is a no-op."""
    if not path.is_file():
        raise FormatError(f"{path} is not a file: check the path (a bundle is named bundle-….bsync)")
    head = container.read_info(path)
    staged = device.staging / f"{path.name}.importing"
    try:
        info = container.copy_verified(path, staged)
        if info.digest != head.digest:
            raise BundleError(f"{path} changed while it was being read: copy it again and retry")
        verified = verify_bundle(device, staged, info=info)
        manifest = verified.manifest
        result = ImportResult(manifest.bundle_id, path)
        if _already_imported(device, manifest.bundle_id):
            result.already = True
            return result
        _apply(device, verified, result, progress)
        return result
    finally:
        staged.unlink(missing_ok=True)


def _apply(device: Device, verified: VerifiedBundle, result: ImportResult, progress: ProgressFn | None) -> None:
    conn, profile, manifest = device.conn, device.profile, verified.manifest
    local_read = _local_read_scope(device, manifest.dataset_id)
    signer_write = verified.signer_scope.write
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with write_transaction(conn):
        # Local edits become versions first, so they meet incoming ones in the merge, not in the app table.
        result.local_serialized = serialize_changes(conn, profile).versions
        with suppressed(conn):
            result.dequeue = dequeue(
                conn, profile, container.iter_record_batches(verified.info),
                signer_write=signer_write, local_read=local_read, bundle_id=manifest.bundle_id, detected_at=now,
            )
            if progress:
                progress("dequeued", result.dequeue.received)
            result.deserialize = deserialize(conn, profile)
        advance = tuple(
            p for p in manifest.filter if covered([p], list(signer_write)) and covered([p], list(local_read))
        )
        result.advanced = advance
        if advance:
            result.gaps = fsic_mod.advance(conn, advance, manifest.basis_fsic, manifest.result_fsic)
        _record(conn, verified, result, now)


def _record(conn: sqlite3.Connection, verified: VerifiedBundle, result: ImportResult, now: str) -> None:
    manifest = verified.manifest
    for inst, (have, need) in result.gaps.items():
        conn.execute(
            "INSERT INTO bundlesync_gaps (dataset_id, inst, have, need, bundle_id, at) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (dataset_id, inst) DO UPDATE SET have = excluded.have, need = max(need, excluded.need), "
            "bundle_id = excluded.bundle_id, at = excluded.at",
            (manifest.dataset_id, inst, have, need, manifest.bundle_id, now),
        )
    held = fsic_mod.held(fsic_mod.read_rows(conn), [manifest.dataset_id])
    for inst, need in conn.execute(
        "SELECT inst, need FROM bundlesync_gaps WHERE dataset_id = ?", (manifest.dataset_id,)
    ).fetchall():
        if held.get(inst, 0) >= need:
            conn.execute("DELETE FROM bundlesync_gaps WHERE dataset_id = ? AND inst = ?", (manifest.dataset_id, inst))
    stats = {
        "outcomes": result.dequeue.outcomes,
        "out_of_scope": result.dequeue.out_of_scope,
        "bad_partition": result.dequeue.bad_partition,
        "not_for_us": result.dequeue.not_for_us,
        "written": result.deserialize.written,
        "deleted": result.deserialize.deleted,
        "waiting": result.deserialize.waiting,
        "failed": result.deserialize.failed,
        "gaps": {k: list(v) for k, v in result.gaps.items()},
    }
    conn.execute(
        "INSERT INTO bundlesync_transfers (bundle_id, direction, dataset_id, filter, peer_instance, path, at, records, stats, result_fsic) "
        "VALUES (?, 'import', ?, ?, ?, ?, ?, ?, ?, ?)",
        (manifest.bundle_id, manifest.dataset_id, "\n".join(manifest.filter), manifest.sender_instance,
         str(result.path), now, result.dequeue.received, json.dumps(stats), json.dumps(manifest.result_fsic)),
    )
