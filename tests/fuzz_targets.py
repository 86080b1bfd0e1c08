"""Fuzz targets over the bundle reader and the receipt reader, shared by the suite and scripts/fuzz.py.

Each target takes a valid file, damages it, and reads it the way ``verify`` / ``export``
read such files. It may fail only with bundlesync's own errors (one line each); anything
else — a traceback, a hang, unbounded memory — is a bug. Damaged bundles come in two kinds:
as found on a drive (the digest no longer matches) and re-signed by a legitimate key after
the damage (a device that writes garbage), which reaches the payload and record parsers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from bundlesync.errors import BundlesyncError
from bundlesync.format import container
from bundlesync.format.records import parse_record
from bundlesync.profile import Profile, load_profile
from bundlesync.trust.crypto import SigningKey
from bundlesync.trust.keystore import KeyStore
from bundlesync.trust.receipts import read_receipt

__all__ = ["Mutation", "Seeds", "mutate", "read_bundle", "read_receipt_file"]

_PROFILE_PATH = Path(__file__).resolve().parent.parent / "fixtures" / "facility_profile.yaml"
_profile: Profile | None = None


def _fixture_profile() -> Profile:
    """The reference profile (receipts are checked against its scopes); loaded once."""
    global _profile
    if _profile is None:
        _profile = load_profile(_PROFILE_PATH)
    return _profile


@dataclass(frozen=True)
class Mutation:
    """Bytes to write at ``at`` (replacing ``cut`` bytes there), as a fraction of the file."""

    at: float
    cut: int
    insert: bytes


@dataclass(frozen=True)
class Seeds:
    """Valid files to damage, and the keys and home that make them valid."""

    bundle: bytes
    receipt: bytes
    key: SigningKey
    home: Path


def mutate(data: bytes, mutations: list[Mutation], *, start: int = 0, end: int | None = None) -> bytes:
    """Apply ``mutations`` inside ``data[start:end]`` (the rest is kept)."""
    end = len(data) if end is None else end
    body = bytearray(data[start:end])
    for m in mutations:
        at = min(len(body), int(m.at * len(body)))
        body[at : at + m.cut] = m.insert
    return data[:start] + bytes(body) + data[end:]


def _resign(data: bytes, key: SigningKey) -> bytes:
    """Rebuild the footer of damaged bundle bytes as a legitimate signer would."""
    if len(data) < container.FOOTER.size + container.PREAMBLE.size:
        return data
    body, footer = data[: -container.FOOTER.size], data[-container.FOOTER.size :]
    payload_len, summary_len, _, _, _ = container.FOOTER.unpack(footer)
    digest = hashlib.sha256(body).digest()
    return body + container.Footer(payload_len, summary_len, digest, key.sign("bundle", digest)).to_bytes()


def read_bundle(seeds: Seeds, mutations: list[Mutation], resign: bool, tmp: Path) -> None:
    """Read a damaged bundle completely; raises only :class:`BundlesyncError`."""
    data = mutate(seeds.bundle, mutations, end=len(seeds.bundle) - container.FOOTER.size if resign else None)
    if resign:
        data = _resign(data, seeds.key)
    path = tmp / "fuzz.bsync"
    path.write_bytes(data)
    try:
        info = container.read_info(path)
        container.verify_digest(info)
        for batch in container.iter_record_batches(info):
            for line in batch:
                parse_record(line)
    except BundlesyncError as exc:
        assert "\n" not in str(exc), str(exc)


def read_receipt_file(seeds: Seeds, mutations: list[Mutation], field: str | None, value: object, tmp: Path) -> None:
    """Read a damaged receipt (bytes damaged, or one field replaced and re-signed); only BundlesyncError."""
    data = mutate(seeds.receipt, mutations)
    if field is not None:
        doc = json.loads(seeds.receipt)
        doc["receipt"][field] = value
        try:
            body = container.canonical_json(doc["receipt"])
        except ValueError:
            body = b"{}"
        doc["signature"] = seeds.key.sign("receipt", body).hex()
        data = json.dumps(doc).encode()
    path = tmp / "receipt-fuzz.json"
    path.write_bytes(data)
    try:
        read_receipt(path, KeyStore(seeds.home), _fixture_profile())
    except BundlesyncError as exc:
        assert "\n" not in str(exc), str(exc)
