"""Receipts: a device's signed statement of what it holds, left on the drive.

After an import, a device writes ``receipt-<dataset8>-<instance8>.json`` next to
the bundle: its FSIC for the facility (what it holds, per writer), signed with its
device key and carrying its certificate chain. The next ``export`` into that folder
reads the receipts of known peers and sends exactly what the least up-to-date of
them lacks — Morango's FSIC exchange, done asynchronously over the drive
(like a Briar acknowledgement). ``export --since RECEIPT`` answers one peer.

A receipt can only lower what is sent to its own signer: it is believed only when its
instance id is the one its signer's certificate binds and its filter lies inside that
certificate's read scope, and the exporter takes the pointwise minimum of every receipt
it believes. So a stale receipt costs bandwidth, never data, and a forged one (another
device's instance, a wider filter, an untrusted, expired or revoked signer) is ignored
with a warning.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundlesync.format.container import canonical_json
from bundlesync.trust.certs import Certificate, verify_chain
from bundlesync.trust.crypto import SigningKey, verify
from bundlesync.errors import BundlesyncError, CertError, FormatError, ReceiptError, TrustError
from bundlesync.fsutil import atomic_write_bytes, read_regular
from bundlesync.trust.keystore import KeyStore
from bundlesync.format.manifest import fsic_from_json, knowledge_from_json
from bundlesync.partitions import covered
from bundlesync.profile import Profile
from bundlesync.trust.revocation import check_not_revoked
from bundlesync.trust.scope import scope_filters

__all__ = ["Receipt", "find_receipts", "read_receipt", "write_receipt"]

RECEIPT_KIND = "bundlesync-receipt"
RECEIPT_FORMAT = 1
MAX_RECEIPT_BYTES = 4 << 20


@dataclass(frozen=True)
class Receipt:
    """What one device held for one facility when it wrote the receipt."""

    dataset_id: str
    instance_id: str
    filter: tuple[str, ...]
    fsic: Mapping[str, int]
    created_at: str
    chain: tuple[Mapping[str, Any], ...]
    knowledge: Mapping[str, Mapping[str, int]] | None = None
    """Per prefix (``{prefix: {instance: counter}}``); receipts written before it have only ``fsic``."""

    def body(self) -> dict[str, Any]:
        """The signed part."""
        body = {
            "kind": RECEIPT_KIND, "format": RECEIPT_FORMAT, "dataset_id": self.dataset_id,
            "instance_id": self.instance_id, "filter": list(self.filter), "fsic": dict(self.fsic),
            "created_at": self.created_at, "chain": [dict(c) for c in self.chain],
        }
        if self.knowledge is not None:
            body["knowledge"] = {p: dict(c) for p, c in self.knowledge.items()}
        return body

    def held(self) -> dict[str, dict[str, int]]:
        """What the signer held, per prefix (the flat ``fsic`` holds for every prefix of ``filter``)."""
        if self.knowledge is not None:
            return {p: dict(c) for p, c in self.knowledge.items()}
        return {p: dict(self.fsic) for p in self.filter}


def receipt_name(dataset_id: str, instance_id: str) -> str:
    """One receipt per device and facility in a folder: the newest replaces the older."""
    return f"receipt-{dataset_id[:8]}-{instance_id[:8]}.json"


def write_receipt(out_dir: Path, receipt: Receipt, key: SigningKey) -> Path:
    """Sign and write a receipt atomically; returns its path."""
    body = receipt.body()
    signature = key.sign("receipt", canonical_json(body))
    path = out_dir / receipt_name(receipt.dataset_id, receipt.instance_id)
    atomic_write_bytes(path, canonical_json({"receipt": body, "signature": signature.hex()}))
    return path


def read_receipt(path: Path, keys: KeyStore, profile: Profile, *, now: datetime.datetime | None = None) -> Receipt:
    """Read and verify a receipt: its chain to the trusted root, its signature, and that it
    speaks only for its signer.

    A receipt is a claim about what one device holds. It is believed only when its
    instance id is the one its signer's certificate binds (so one device cannot speak for
    another) and its filter lies inside that certificate's read scope (so a learner's
    device cannot claim to hold the whole facility).

    Raises:
        ReceiptError: The file is not a readable receipt.
        TrustError: The signer is not trusted, or the receipt claims what its signer's
            certificate does not allow; the message names the file.
    """
    try:
        raw = read_regular(path, MAX_RECEIPT_BYTES)
    except OSError as exc:
        raise ReceiptError(f"cannot read receipt {path}: {exc.strerror or exc}; delete it or copy it again, "
                           "or export with --full") from exc
    try:
        doc = json.loads(raw)
        body, signature = doc["receipt"], bytes.fromhex(doc["signature"])
        if body.get("kind") != RECEIPT_KIND or body.get("format") != RECEIPT_FORMAT:
            raise ReceiptError(f"{path} is not a bundlesync receipt (format {RECEIPT_FORMAT})")
        receipt = Receipt(
            dataset_id=str(body["dataset_id"]), instance_id=str(body["instance_id"]),
            filter=tuple(str(p) for p in body["filter"]), fsic=fsic_from_json(body["fsic"], "fsic"),
            created_at=str(body["created_at"]), chain=tuple(body["chain"]),
            knowledge=(knowledge_from_json(body["knowledge"], "knowledge", str(body["dataset_id"]))
                       if "knowledge" in body else None),
        )
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, FormatError) as exc:
        detail = " ".join(str(exc).split())[:200]  # one line, whatever the file holds
        raise ReceiptError(f"cannot read receipt {path}: {detail}; copy it again or export with --full") from exc
    root = keys.trusted_root(receipt.dataset_id)
    if root is None:
        raise TrustError(f"receipt {path.name} is for facility dataset {receipt.dataset_id}, which this device does not trust")
    try:
        chain = [Certificate.from_dict(c) for c in receipt.chain]
        leaf = verify_chain(chain, root, dataset_id=receipt.dataset_id, now=now)
    except CertError as exc:
        raise TrustError(f"receipt {path.name} has a malformed certificate chain: {exc}") from exc
    except TrustError as exc:
        raise TrustError(f"receipt {path.name}: {exc}") from exc
    check_not_revoked(chain, keys.revocations(receipt.dataset_id), what=f"receipt {path.name}")
    try:
        verify(leaf.subject_key, "receipt", canonical_json(receipt.body()), signature)
    except TrustError as exc:
        raise TrustError(
            f"receipt {path.name} is not signed by the key of its certificate {leaf.cert_id} "
            "(altered or forged); delete it"
        ) from exc
    if leaf.instance_id is None:
        raise TrustError(
            f"receipt {path.name} is signed under certificate {leaf.cert_id}, which was issued before "
            "certificates named their device's instance id, so it cannot be bound to its signer; "
            "re-issue that device's certificate (`cert request` there, `cert issue` on the authority)"
        )
    if leaf.instance_id != receipt.instance_id:
        raise TrustError(
            f"receipt {path.name} claims instance {receipt.instance_id}, but its signer's certificate "
            f"{leaf.cert_id} is for instance {leaf.instance_id}: a device may only speak for itself; delete it"
        )
    readable = scope_filters(profile, receipt.dataset_id, leaf.scope).read
    if not receipt.filter or not covered(receipt.filter, readable):
        raise TrustError(
            f"receipt {path.name} claims filter {', '.join(receipt.filter) or '(none)'}, outside the read "
            f"scope {leaf.scope} of its signer's certificate {leaf.cert_id}; delete it"
        )
    return receipt


def find_receipts(
    folder: Path, keys: KeyStore, profile: Profile, dataset_id: str, me: str, *, now: datetime.datetime | None = None,
) -> tuple[list[Receipt], list[str]]:
    """Valid receipts of other devices for ``dataset_id`` in ``folder``, and why others were skipped.

    Of several valid receipts of one device, the newest counts.
    """
    found: dict[str, Receipt] = {}
    skipped: list[str] = []
    for path in sorted(folder.glob(f"receipt-{dataset_id[:8]}-*.json")):
        try:
            receipt = read_receipt(path, keys, profile, now=now)
        except BundlesyncError as exc:
            skipped.append(f"{path.name}: {exc}")
            continue
        if receipt.dataset_id != dataset_id or receipt.instance_id == me:
            continue
        newest = found.get(receipt.instance_id)
        if newest is None or receipt.created_at > newest.created_at:
            found[receipt.instance_id] = receipt
    return list(found.values()), skipped


def now_text() -> str:
    """Receipt timestamps: UTC, sortable."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def make_receipt(dataset_id: str, instance_id: str, prefixes: Sequence[str], fsic: Mapping[str, int],
                 chain: Sequence[Certificate], knowledge: Mapping[str, Mapping[str, int]] | None = None) -> Receipt:
    """A receipt for the current state."""
    return Receipt(dataset_id, instance_id, tuple(prefixes), dict(fsic), now_text(), tuple(c.to_dict() for c in chain),
                   None if knowledge is None else {p: dict(c) for p, c in knowledge.items()})
