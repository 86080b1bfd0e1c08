"""Merging a bundle's record stream into the store (the DEQUEUING stage).

Each record line is ``<head JSON>\\t<data JSON>\\n``. For each record this
module checks that it may be applied — the partition it claims is the one its
data yields, it lies in the signer's write scope (DESIGN invariant 4) and in
this device's read scope — and then joins it into the store with
:func:`bundlesync.merge.merge`. Refused records are counted and a few are named
for the report; the rest of the bundle still applies.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .errors import FormatError
from .merge import Outcome, Version, merge
from .profile import Profile
from .store import decode_data, fetch_versions, update_vectors, upsert_versions

__all__ = ["DequeueResult", "dequeue", "parse_record", "within"]

SAMPLE = 5
"""How many refused records a report names."""


def within(partition: str, prefixes: Sequence[str]) -> bool:
    """True if ``partition`` lies under one of the filter ``prefixes``."""
    return partition.startswith(tuple(prefixes))


@dataclass
class DequeueResult:
    """Counts by outcome, plus refusals."""

    received: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: {o.value: 0 for o in Outcome})
    out_of_scope: int = 0
    not_for_us: int = 0
    bad_partition: int = 0
    refused_sample: list[str] = field(default_factory=list)

    def refuse(self, kind: str, version: Version, why: str) -> None:
        """Count a refused record and keep a few for the report."""
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.refused_sample) < SAMPLE:
            self.refused_sample.append(f"{version.model} {version.id}: {why}")

    @property
    def conflicts(self) -> int:
        """True concurrent edits met in this bundle."""
        return self.outcomes[Outcome.CONFLICT.value]

    @property
    def refused(self) -> int:
        """Records not applied because their signer may not write them or the data lies."""
        return self.out_of_scope + self.bad_partition


def parse_record(line: bytes) -> Version:
    """Decode one record line; :class:`FormatError` if it is malformed."""
    head, tab, data = line.rstrip(b"\n").partition(b"\t")
    try:
        h = json.loads(head)
        flags = int(h["f"])
        version = Version(
            model=str(h["m"]), id=str(h["id"]), partition=str(h["p"]), data=data.decode("utf-8"),
            deleted=bool(flags & 1), purged=bool(flags & 2), hlc=int(h["h"]), inst=str(h["i"]),
            ctr=int(h["c"]), vv={str(k): int(v) for k, v in h["v"].items()},
        )
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise FormatError(f"malformed record in bundle ({exc!r}); the signer wrote a bad bundle: report it") from exc
    if not tab:
        raise FormatError("malformed record in bundle (no data part); the signer wrote a bad bundle: report it")
    return version


def _claims_true_partition(profile: Profile, version: Version) -> bool:
    if version.purged or not profile.has_table(version.model):
        return profile.has_table(version.model)
    try:
        return profile.table(version.model).partition_of(decode_data(version.data)) == version.partition
    except Exception:  # noqa: BLE001 - any failure to recompute means the claim is unproven
        return False


def dequeue(
    conn: sqlite3.Connection,
    profile: Profile,
    batches: Iterable[Sequence[bytes]],
    *,
    signer_write: Sequence[str],
    local_read: Sequence[str],
    bundle_id: str,
    detected_at: str,
) -> DequeueResult:
    """Merge every acceptable record into the store (inside the import's transaction)."""
    result = DequeueResult()
    for lines in batches:
        incoming: dict[tuple[str, str], Version] = {}
        for line in lines:
            version = parse_record(line)
            result.received += 1
            if not within(version.partition, signer_write):
                result.refuse("out_of_scope", version, f"partition {version.partition} is outside the signer's write scope")
            elif not _claims_true_partition(profile, version):
                result.refuse("bad_partition", version, f"data does not belong to partition {version.partition}")
            elif not within(version.partition, local_read):
                result.not_for_us += 1
            else:
                key = (version.model, version.id)
                earlier = incoming.get(key)
                incoming[key] = version if earlier is None else merge(earlier, version).result
        local = fetch_versions(conn, incoming)
        writes: list[tuple[Version, bool]] = []
        vectors: list[Version] = []
        losers: list[tuple[str, str, str, str, int, str, str]] = []
        purged: list[tuple[str, str]] = []
        for key, version in incoming.items():
            merged = merge(local.get(key), version)
            result.outcomes[merged.outcome.value] += 1
            if merged.incoming_won:
                writes.append((merged.result, True))
                if merged.result.purged:
                    purged.append(key)
            elif merged.result is not local.get(key):
                vectors.append(merged.result)
            if merged.loser is not None and not merged.result.purged:
                loser = merged.loser
                losers.append((
                    loser.model, loser.id,
                    json.dumps({"inst": loser.inst, "ctr": loser.ctr, "hlc": loser.hlc, "deleted": loser.deleted,
                                "partition": loser.partition, "data": json.loads(loser.data)},
                               separators=(",", ":"), ensure_ascii=False),
                    merged.result.inst, merged.result.ctr, bundle_id, detected_at,
                ))
        upsert_versions(conn, writes, bundle_id)
        update_vectors(conn, vectors)
        conn.executemany(
            "INSERT INTO bundlesync_conflicts (model, record_id, loser, winner_inst, winner_ctr, bundle_id, detected_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            losers,
        )
        # A purge erases the personal data everywhere, the conflict log included.
        conn.executemany("DELETE FROM bundlesync_conflicts WHERE model = ? AND record_id = ?", purged)
    return result
