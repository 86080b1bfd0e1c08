"""Merging a bundle's record stream into the store (the DEQUEUING stage).

Each record line is ``<head JSON>\\t<data JSON>\\n``. For each record this
module checks that it may be applied — the partition it claims is the one its
data yields, it lies in the signer's write scope (scope is enforced per record) and in
this device's read scope — and then joins it into the store with
:func:`bundlesync.replica.merge.merge`. Records that won the merge have their app rows
written right away (the row was decoded once, for the partition check); rows
whose parent is not there yet stay dirty for the DESERIALIZING stage. Refused
records are counted and a few are named for the report; the rest of the bundle
still applies.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bundlesync.format.records import decode_data, line_key, parse_record
from bundlesync.sync.deserialize import DeserializeResult, TableWriter
from bundlesync.errors import FormatError
from bundlesync.format.records import Version
from bundlesync.replica.merge import MergeResult, Outcome, merge
from bundlesync.profile import Profile
from bundlesync.partitions import within
from bundlesync.replica.clock import ahead_hlc
from bundlesync.replica.store import (fetch_versions, holds_model, log_conflicts, loser_json, mark_waiting, same_line,
                                      settle, stored_lines, update_vectors, upsert_versions)

__all__ = ["DequeueResult", "Dequeuer", "dequeue"]

SAMPLE = 5
"""How many refused records a report names."""

_ALREADY = Outcome.ALREADY.value

Prepared = list[tuple[bytes, tuple[str, str] | None, tuple[Version, dict[str, Any] | None] | None]]
"""A slice as :meth:`Dequeuer.prepare` leaves it: each line, its key, and its version and checked row
(None where the line waits for the comparison with the store's copy)."""


@dataclass
class DequeueResult:
    """Counts by outcome, plus refusals."""

    received: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: {o.value: 0 for o in Outcome})
    out_of_scope: int = 0
    not_for_us: int = 0
    bad_partition: int = 0
    refused_sample: list[str] = field(default_factory=list)
    ahead: int = 0
    """Records whose clock is far ahead of this device's (a wrong clock somewhere)."""
    ahead_max_hlc: int = 0

    def refuse(self, kind: str, version: Version, why: str) -> None:
        """Count a refused record and keep a few for the report."""
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.refused_sample) < SAMPLE:
            self.refused_sample.append(f"{version.model} {version.id}: {why}")

    @property
    def refused(self) -> int:
        """Records not applied because their signer may not write them or the data lies."""
        return self.out_of_scope + self.bad_partition


def _decode_checked(profile: Profile, version: Version) -> dict[str, Any] | None:
    """The record's row if its claimed partition is the one its data yields, else None.

    Where the partition needs a lookup, the lookup's part is checked when the row is written
    (:class:`~bundlesync.sync.deserialize.TableWriter`), with the rows it is looked up from in place.
    """
    if not profile.has_table(version.model):
        return None
    if version.purged:
        return {}
    try:
        row = decode_data(version.data)
        return row if profile.table(version.model).partition_matches(row, version.partition) else None
    except Exception:  # noqa: BLE001 - any failure to recompute means the claim is unproven
        return None


def _loser_entry(merged: MergeResult, bundle_id: str, detected_at: str) -> tuple[str, str, str, str, int, str, str]:
    loser = merged.loser
    assert loser is not None
    text = loser_json(loser.inst, loser.ctr, loser.hlc, loser.deleted, loser.partition, loser.data)
    return (loser.model, loser.id, text, merged.result.inst, merged.result.ctr, bundle_id, detected_at)


class _Cached(dict[str, bool]):
    """A predicate on partitions, memoised (bounded: a bundle has few distinct partitions).

    Asked as ``cached[partition]``: a dict lookup in C, the test runs only for a partition not seen yet.
    """

    LIMIT = 100_000

    def __init__(self, test: Callable[[str], bool]) -> None:
        super().__init__()
        self.test = test

    def __missing__(self, partition: str) -> bool:
        if len(self) > self.LIMIT:
            self.clear()
        answer = self[partition] = self.test(partition)
        return answer


class _AppWriter:
    """Writes the app rows of records that won the merge, table by table in foreign-key order."""

    def __init__(self, conn: sqlite3.Connection, profile: Profile) -> None:
        self.conn, self.profile = conn, profile
        self.order = {t.name: i for i, t in enumerate(profile.tables)}
        self.writers: dict[str, TableWriter] = {}

    def write(self, won: list[tuple[Version, dict[str, Any]]], result: DeserializeResult) -> None:
        by_model: dict[str, list[tuple[Version, dict[str, Any]]]] = {}
        for version, row in won:
            by_model.setdefault(version.model, []).append((version, row))
        waiting: list[tuple[str, str, str, str]] = []
        for model in sorted(by_model, key=self.order.__getitem__):
            writer = self.writers.get(model)
            if writer is None:
                writer = self.writers[model] = TableWriter(self.conn, self.profile, self.profile.table(model))
            items = by_model[model]
            removals = [v.id for v, _ in items if v.deleted or v.purged]
            writer.remove(removals)
            errors = writer.place([(v.id, row, v.partition) for v, row in items if not (v.deleted or v.purged)])
            data = {v.id: v.data for v, _ in items}
            waiting.extend((reason, model, record_id, data[record_id]) for record_id, reason in errors.items())
            settle(self.conn, writer.table, [(v.id, v.data) for v, _ in items
                                             if not (v.deleted or v.purged or v.id in errors)], stored=False)
            result.deleted += len(removals)
            result.written += len(items) - len(removals) - len(errors)
            result.by_model[model] = result.by_model.get(model, 0) + len(items) - len(errors)
        # Rows not placed stay dirty in the store; DESERIALIZING retries them (their parent may come later).
        mark_waiting(self.conn, waiting)


class Dequeuer:
    """Merges record lines into the store slice by slice, each slice in whatever transaction the caller holds.

    Tracking must be suppressed by the caller. ``written`` collects the app-row counts
    (the DESERIALIZING stage adds its own to it). Call :meth:`new_transaction` at the
    start of every transaction after the first: what was learnt of present parents may
    no longer hold once the app has had the lock.
    """

    def __init__(self, conn: sqlite3.Connection, profile: Profile, *, signer_write: Sequence[str],
                 local_read: Sequence[str], bundle_id: str, detected_at: str, written: DeserializeResult,
                 signer_may_purge: bool) -> None:
        self.conn, self.profile, self.written = conn, profile, written
        self.bundle_id, self.detected_at, self.signer_may_purge = bundle_id, detected_at, signer_may_purge
        self.result = DequeueResult()
        self.app = _AppWriter(conn, profile)
        # Partitions repeat (one per user or facility), so scope answers are cached per partition.
        self.writable = _Cached(lambda p: within(p, signer_write))
        self.readable = _Cached(lambda p: within(p, local_read))
        self.future = ahead_hlc()
        # A store that held nothing when the import began (a new device) cannot hold a line of the bundle.
        self.look_up = bool(conn.execute("SELECT EXISTS (SELECT 1 FROM bundlesync_versions)").fetchone()[0])
        # Neither can a table the store held nothing of (a hint only: a line found nowhere goes the long way,
        # which is always right). Known up front, so that preparing a slice needs no database.
        self.empty_before: dict[str, bool] = {
            t.name: not holds_model(conn, t.name) for t in profile.tables} if self.look_up else {}

    def new_transaction(self) -> None:
        """Forget what earlier transactions found in the app tables."""
        self.app = _AppWriter(self.conn, self.profile)

    def apply(self, lines: Sequence[bytes]) -> None:
        """Merge one slice of record lines and write the winners' app rows."""
        self.merge_prepared(self.prepare(lines))

    def prepare(self, lines: Sequence[bytes]) -> Prepared:
        """The part of :meth:`apply` that needs no database: parse, decode and check the partition of each line.

        Lines the store may hold (their table was not empty when the import began) are left for
        :meth:`merge_prepared`, which first compares them with the stored copy. Pure: the import
        prepares slices ahead while it rests, holding no lock.
        """
        look_up, empty_before, writable, profile = self.look_up, self.empty_before, self.writable, self.profile
        out: Prepared = []
        for line in lines:
            key = line_key(line) if look_up else None
            if key is not None and not empty_before.get(key[0], False):
                out.append((line, key, None))
                continue
            version = parse_record(line)
            out.append((line, key, (version, _decode_checked(profile, version) if writable[version.partition]
                                    else None)))
        return out

    def merge_prepared(self, prepared: Prepared) -> None:
        """Merge one prepared slice into the store and write the winners' app rows (in the caller's transaction)."""
        conn, result, writable, readable = self.conn, self.result, self.writable, self.readable
        profile, future = self.profile, self.future
        incoming: dict[tuple[str, str], tuple[Version, dict[str, Any]]] = {}
        # A record held exactly as it comes (same version, vector, flags and data: the very line this store
        # would export) changes nothing: it is neither parsed, decoded nor merged. The checks that could
        # still refuse it or skip it are made on the stored copy; a purge goes the long way.
        wanted = [key for _, key, parsed in prepared if parsed is None and key is not None]
        held = stored_lines(conn, wanted) if wanted else {}
        for line, key, parsed in prepared:
            if parsed is None:
                stored = held.get(key) if key is not None else None
                if stored is not None and same_line(stored, line) and not stored[3] and writable[stored[2]] \
                        and readable[stored[2]]:
                    result.received += 1
                    if stored[1] > future:
                        result.ahead += 1
                        result.ahead_max_hlc = max(result.ahead_max_hlc, stored[1])
                    result.outcomes[_ALREADY] += 1
                    continue
                version = parse_record(line)
                row = _decode_checked(profile, version) if writable[version.partition] else None
            else:
                version, row = parsed
            result.received += 1
            if version.hlc > future:
                result.ahead += 1
                result.ahead_max_hlc = max(result.ahead_max_hlc, version.hlc)
            if not writable[version.partition]:
                result.refuse("out_of_scope", version, f"partition {version.partition} is outside the signer's write scope")
                continue
            if row is None:
                result.refuse("bad_partition", version, f"data does not belong to partition {version.partition}")
            elif not readable[version.partition]:
                result.not_for_us += 1
            else:
                key = (version.model, version.id)
                earlier = incoming.get(key)
                if earlier is not None:  # the same record twice in one slice: join them first
                    both = merge(earlier[0], version)
                    version, row = both.result, (row if both.incoming_won else earlier[1])
                incoming[key] = (version, row)
        local = fetch_versions(conn, incoming, self.profile)
        won: list[tuple[Version, dict[str, Any]]] = []
        vectors: list[Version] = []
        losers: list[tuple[str, str, str, str, int, str, str]] = []
        purged: list[tuple[str, str]] = []
        for key, (version, row) in incoming.items():
            mine = local.get(key)
            if mine is not None and not writable[mine.partition]:
                # The record as this device knows it is not the signer's to change, whatever it claims now.
                result.refuse("out_of_scope", version, f"the local record lies in {mine.partition}, outside the "
                              "signer's write scope")
                continue
            if version.purged and not self.signer_may_purge:
                result.refuse("out_of_scope", version, "only a full-facility certificate may purge records")
                continue
            merged = merge(mine, version)
            result.outcomes[merged.outcome.value] += 1
            if merged.incoming_won:
                won.append((merged.result, row))
                if merged.result.purged:
                    purged.append(key)
            elif merged.result is not local.get(key):
                vectors.append(merged.result)
            if merged.loser is not None and not merged.result.purged:
                losers.append(_loser_entry(merged, self.bundle_id, self.detected_at))
        upsert_versions(conn, [(v, False) for v, _ in won], self.bundle_id, to_app=True)
        self.app.write(won, self.written)
        update_vectors(conn, vectors)
        log_conflicts(conn, losers)
        # A purge erases the personal data everywhere, the conflict log included.
        conn.executemany("DELETE FROM bundlesync_conflicts WHERE model = ? AND record_id = ?", purged)


def dequeue(
    conn: sqlite3.Connection,
    profile: Profile,
    batches: Iterable[Sequence[bytes]],
    *,
    signer_write: Sequence[str],
    local_read: Sequence[str],
    bundle_id: str,
    detected_at: str,
    written: DeserializeResult,
    signer_may_purge: bool,
) -> DequeueResult:
    """Merge every acceptable record into the store and write the winners' app rows, in the caller's transaction.

    Tracking must be suppressed. ``written`` collects the app-row counts (the
    DESERIALIZING stage adds its own to it).
    """
    merger = Dequeuer(conn, profile, signer_write=signer_write, local_read=local_read, bundle_id=bundle_id,
                      detected_at=detected_at, written=written, signer_may_purge=signer_may_purge)
    for lines in batches:
        merger.apply(lines)
    return merger.result
