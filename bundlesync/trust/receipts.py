"""Receipts: a device's signed statement of what it holds, left on the drive.

After an import, a device writes ``receipt-<dataset8>-<instance8>.json`` next to
the bundle: its FSIC for the facility (what it holds, per writer), signed with its
device key and carrying its certificate chain. The next ``export`` into that folder
reads the receipts of known peers and sends exactly what the least up-to-date of
them lacks — Morango's FSIC exchange, done asynchronously over the drive
(like a Briar acknowledgement). ``export --since RECEIPT`` answers one peer.

A receipt can only lower what is sent (it is a basis); a forged or stale one
costs bandwidth, never data, and receipts from untrusted signers are ignored.
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
from bundlesync.format.manifest import fsic_from_json

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

    def body(self) -> dict[str, Any]:
        """The signed part."""
        return {
            "kind": RECEIPT_KIND, "format": RECEIPT_FORMAT, "dataset_id": self.dataset_id,
            "instance_id": self.instance_id, "filter": list(self.filter), "fsic": dict(self.fsic),
            "created_at": self.created_at, "chain": [dict(c) for c in self.chain],
        }


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


def read_receipt(path: Path, keys: KeyStore) -> Receipt:
    """Read and verify a receipt against the trusted root of its facility."""
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
        )
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, FormatError) as exc:
        detail = " ".join(str(exc).split())[:200]  # one line, whatever the file holds
        raise ReceiptError(f"cannot read receipt {path}: {detail}; copy it again or export with --full") from exc
    root = keys.trusted_root(receipt.dataset_id)
    if root is None:
        raise TrustError(f"receipt {path.name} is for facility dataset {receipt.dataset_id}, which this device does not trust")
    try:
        leaf = verify_chain([Certificate.from_dict(c) for c in receipt.chain], root, dataset_id=receipt.dataset_id)
    except CertError as exc:
        raise TrustError(f"receipt {path.name} has a malformed certificate chain: {exc}") from exc
    verify(leaf.subject_key, "receipt", canonical_json(receipt.body()), signature)
    return receipt


def find_receipts(folder: Path, keys: KeyStore, dataset_id: str, me: str) -> tuple[list[Receipt], list[str]]:
    """Valid receipts of other devices for ``dataset_id`` in ``folder``, and why others were skipped."""
    found: dict[str, Receipt] = {}
    skipped: list[str] = []
    for path in sorted(folder.glob(f"receipt-{dataset_id[:8]}-*.json")):
        try:
            receipt = read_receipt(path, keys)
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
                 chain: Sequence[Certificate]) -> Receipt:
    """A receipt for the current state."""
    return Receipt(dataset_id, instance_id, tuple(prefixes), dict(fsic), now_text(), tuple(c.to_dict() for c in chain))
