"""The signed manifest every bundle carries, as a typed value.

The container (:mod:`bundlesync.format.container`) stores the manifest as canonical JSON;
this module defines which fields it has and checks them when reading, so the
rest of the engine never touches untyped dicts. Field meanings are documented
in ``docs/format.md`` ("Manifest fields").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bundlesync.errors import FormatError

__all__ = ["Manifest", "fsic_from_json", "knowledge_from_json"]

MANIFEST_KIND = "bundlesync-bundle"
ENCRYPTION_SCHEME = "age"


def fsic_from_json(raw: object, what: str) -> dict[str, int]:
    """Check an ``{instance_id: counter}`` mapping read from a file."""
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in raw.items()
    ):
        raise FormatError(f"bundle manifest field {what} is not a map of instance ids to counters")
    return dict(raw)


def knowledge_from_json(raw: object, what: str, dataset_id: str) -> dict[str, dict[str, int]]:
    """Check a ``{prefix: {instance_id: counter}}`` mapping; every prefix lies in ``dataset_id``."""
    if not isinstance(raw, dict):
        raise FormatError(f"bundle manifest field {what} is not a map of partition prefixes to counters")
    out: dict[str, dict[str, int]] = {}
    for prefix, counters in raw.items():
        if not isinstance(prefix, str) or not (prefix == dataset_id or prefix.startswith(dataset_id + ":")):
            raise FormatError(f"bundle manifest field {what} names a prefix outside its facility: {prefix!r}")
        out[prefix] = fsic_from_json(counters, what)
    return out


@dataclass(frozen=True)
class Manifest:
    """Who wrote the bundle, for which facility and filter, and relative to what."""

    bundle_id: str
    created_at: str
    generator: str
    profile_name: str
    profile_version: int
    profile_digest: str
    dataset_id: str
    facility_id: str
    filter: tuple[str, ...]
    sender_instance: str
    sender_counter: int
    chain: tuple[Mapping[str, Any], ...]
    basis_fsic: Mapping[str, int]
    result_fsic: Mapping[str, int]
    operations: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    basis: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    held: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    revocations: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    recipients: tuple[str, ...] | None = None
    """age recipients the payload is encrypted to; None for a bundle exported with --no-encrypt."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written into the bundle."""
        return {
            "kind": MANIFEST_KIND,
            "bundle_id": self.bundle_id,
            "created_at": self.created_at,
            "generator": self.generator,
            "profile": {"name": self.profile_name, "version": self.profile_version, "digest": self.profile_digest},
            "dataset_id": self.dataset_id,
            "facility_id": self.facility_id,
            "filter": list(self.filter),
            "sender": {"instance_id": self.sender_instance, "counter": self.sender_counter},
            "chain": [dict(c) for c in self.chain],
            "basis_fsic": dict(self.basis_fsic),
            "result_fsic": dict(self.result_fsic),
            "operations": [dict(o) for o in self.operations],
            "basis": {p: dict(c) for p, c in self.basis.items()},
            "held": {p: dict(c) for p, c in self.held.items()},
            **({"revocations": [dict(r) for r in self.revocations]} if self.revocations else {}),
            **({"encryption": {"scheme": ENCRYPTION_SCHEME, "recipients": list(self.recipients)}}
               if self.recipients is not None else {}),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Manifest:
        """Check and type a manifest read from a bundle; :class:`FormatError` if malformed."""
        try:
            if raw.get("kind") != MANIFEST_KIND:
                raise FormatError("the file's manifest is not a bundlesync bundle manifest")
            profile, sender = raw["profile"], raw["sender"]
            filt = raw["filter"]
            if not isinstance(filt, list) or not filt or not all(isinstance(p, str) for p in filt):
                raise FormatError("bundle manifest has no valid filter")
            chain = raw["chain"]
            if not isinstance(chain, list) or not chain or not all(isinstance(c, dict) for c in chain):
                raise FormatError("bundle manifest has no certificate chain")
            recipients = None
            if "encryption" in raw:
                enc = raw["encryption"]
                if not isinstance(enc, dict) or enc.get("scheme") != ENCRYPTION_SCHEME or set(enc) != {
                        "scheme", "recipients"}:
                    raise FormatError(f"bundle manifest field encryption is not {ENCRYPTION_SCHEME!r} with recipients: "
                                      "upgrade bundlesync on this device")
                listed = enc["recipients"]
                if not isinstance(listed, list) or not listed or not all(isinstance(r, str) for r in listed):
                    raise FormatError("bundle manifest lists no valid recipients")
                recipients = tuple(listed)
            revocations = raw.get("revocations", [])
            if not isinstance(revocations, list) or not all(isinstance(r, dict) for r in revocations):
                raise FormatError("bundle manifest field revocations is not a list")
            operations = raw.get("operations", [])
            if not isinstance(operations, list) or not all(isinstance(o, dict) for o in operations):
                raise FormatError("bundle manifest field operations is not a list")
            dataset_id = _text(raw["dataset_id"])
            basis_fsic = fsic_from_json(raw["basis_fsic"], "basis_fsic")
            result_fsic = fsic_from_json(raw["result_fsic"], "result_fsic")
            # Bundles written before per-prefix knowledge carry only the flat fields: each holds for every prefix.
            basis = (knowledge_from_json(raw["basis"], "basis", dataset_id) if "basis" in raw
                     else {p: dict(basis_fsic) for p in filt})
            held = (knowledge_from_json(raw["held"], "held", dataset_id) if "held" in raw
                    else {p: dict(result_fsic) for p in filt})
            return cls(
                bundle_id=_text(raw["bundle_id"]),
                created_at=_text(raw["created_at"]),
                generator=_text(raw["generator"]),
                profile_name=_text(profile["name"]),
                profile_version=_int(profile["version"]),
                profile_digest=_text(profile["digest"]),
                dataset_id=dataset_id,
                facility_id=_text(raw["facility_id"]),
                filter=tuple(filt),
                sender_instance=_text(sender["instance_id"]),
                sender_counter=_int(sender["counter"]),
                chain=tuple(chain),
                basis_fsic=basis_fsic,
                result_fsic=result_fsic,
                operations=tuple(operations),
                basis=basis,
                held=held,
                revocations=tuple(revocations),
                recipients=recipients,
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise FormatError(f"bundle manifest is missing or mangles field {exc}; the file is not usable") from exc


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise FormatError(f"bundle manifest has an invalid text field: {value!r}")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise FormatError(f"bundle manifest has an invalid number field: {value!r}")
    return value
