"""Bundles with records chosen by a test, signed by a real device's key and certificate chain.

What a peer holding a valid certificate could send if it were buggy or hostile: the
signature and chain check out, so only the per-record checks of import stand between such a
bundle and the database. The manifest (chain, filter, basis, result) is taken from a real
bundle the same device exported.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from bundlesync.format import container
from bundlesync.format.records import Version, parse_record
from bundlesync.trust.keystore import KeyStore


def record_line(v: Version) -> bytes:
    """The record line of ``v``, as an exporter writes it."""
    head = {"m": v.model, "id": v.id, "p": v.partition, "h": v.hlc, "i": v.inst, "c": v.ctr, "v": v.vv,
            "f": int(v.deleted) + 2 * int(v.purged)}
    return json.dumps(head, separators=(",", ":")).encode() + b"\t" + v.data.encode() + b"\n"


def versions_of(bundle: Path) -> list[Version]:
    """Every record version a bundle carries."""
    return [parse_record(line) for line in container.iter_records(container.read_info(bundle))]


def resign(template: Path, home: Path, lines: Iterable[bytes], out_dir: Path) -> Path:
    """A new bundle with ``template``'s manifest (new id) and ``lines``, signed by ``home``'s device key."""
    lines = list(lines)
    manifest = dict(container.read_info(template).manifest)
    bundle_id = hashlib.sha256(b"".join(lines) + template.name.encode()).hexdigest()[:32]
    manifest["bundle_id"] = bundle_id
    key = KeyStore(home).device_key()
    out_dir.mkdir(parents=True, exist_ok=True)
    with container.BundleWriter(out_dir, f"bundle-{bundle_id}.bsync", manifest,
                                lambda digest: key.sign("bundle", digest)) as writer:
        writer.write_records(lines)
        return writer.finish({"counts": {}})
