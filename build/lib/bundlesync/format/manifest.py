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

__all__ = ["Manifest", "fsic_from_json"]

MANIFEST_KIND = "bundlesync-bundle"


def fsic_from_json(raw: object, what: str) -> dict[str, int]:
    """Check an ``{instance_id: counter}`` mapping read from a file."""
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in raw.items()
    ):
        raise FormatError(f"bundle manifest field {what} is not a map of instance ids to counters")
    return dict(raw)


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
            operations = raw.get("operations", [])
            if not isinstance(operations, list) or not all(isinstance(o, dict) for o in operations):
                raise FormatError("bundle manifest field operations is not a list")
            return cls(
                bundle_id=_text(raw["bundle_id"]),
                created_at=_text(raw["created_at"]),
                generator=_text(raw["generator"]),
                profile_name=_text(profile["name"]),
                profile_version=_int(profile["version"]),
                profile_digest=_text(profile["digest"]),
                dataset_id=_text(raw["dataset_id"]),
                facility_id=_text(raw["facility_id"]),
                filter=tuple(filt),
                sender_instance=_text(sender["instance_id"]),
                sender_counter=_int(sender["counter"]),
                chain=tuple(chain),
                basis_fsic=fsic_from_json(raw["basis_fsic"], "basis_fsic"),
                result_fsic=fsic_from_json(raw["result_fsic"], "result_fsic"),
                operations=tuple(operations),
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
