"""The merge rule: how an incoming record version meets the local one.

Every stored record carries its winning *version* — who wrote it (instance id,
counter), when (a hybrid logical clock value, ``hlc``) and whether it is a
deletion or a purge — plus a version vector ``vv`` (per instance, the highest
counter whose writes this record has seen).

The rule is a join: the result keeps the version with the greatest
``(purged, hlc, wall, inst, ctr)`` and the pointwise maximum of both vectors.
``wall`` is the edit's own wall-clock time (``hlc >> 16`` for versions that predate
it): when two concurrent edits tie on ``hlc`` — which happens to every edit made
on top of a version stamped by a clock that ran ahead, since each is stamped
``previous + 1`` — the later edit wins, not the larger instance id. The key is
still a total order that every causal successor exceeds (its ``hlc`` is higher),
so the merge is still a join. A join
is commutative, associative and idempotent, so any set of versions delivered in
any order, any number of times, through any relays, ends in the same state
(idempotent and order-free). Version vectors only *classify* the meeting, so that a
truly concurrent loser can be kept for operators (``bundlesync conflicts``):

- NEW: no local record.
- ALREADY: the local vector already covers the incoming version (stale duplicate).
- FAST_FORWARD: the incoming vector covers the local version (it was written on top of it).
- CONFLICT: neither covers the other; the lower key loses and is logged.

Because a local edit always gets an ``hlc`` above the version it replaces,
a fast-forward always wins on the key too; the one exception is a purge, which
beats everything (a purged record never comes back).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from bundlesync.format.records import Version, VersionVector

__all__ = ["Outcome", "Version", "merge", "merge_vectors"]

class Outcome(enum.Enum):
    """How an incoming version related to the local one."""

    NEW = "new"
    ALREADY = "already"
    FAST_FORWARD = "fast_forward"
    CONFLICT = "conflict"
    PURGE_KEPT = "purge_kept"


def merge_vectors(a: VersionVector, b: VersionVector) -> VersionVector:
    """Pointwise maximum of two version vectors."""
    if not b:
        return dict(a)
    out = dict(a)
    for inst, ctr in b.items():
        if out.get(inst, 0) < ctr:
            out[inst] = ctr
    return out


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What to store after a merge, and which version lost (only for true conflicts)."""

    outcome: Outcome
    result: Version
    incoming_won: bool
    loser: Version | None = None


def merge(local: Version | None, incoming: Version) -> MergeResult:
    """Join ``incoming`` into ``local`` (see the module docstring)."""
    if local is None:
        return MergeResult(Outcome.NEW, incoming, True)
    vv = merge_vectors(local.vv, incoming.vv)
    incoming_wins = incoming.key() > local.key()
    winner = incoming if incoming_wins else local
    merged = winner if winner.vv == vv else replace(winner, vv=vv)
    if local.covers(incoming.inst, incoming.ctr):
        return MergeResult(Outcome.ALREADY, merged, incoming_wins)
    if incoming.covers(local.inst, local.ctr):
        return MergeResult(Outcome.FAST_FORWARD if incoming_wins else Outcome.PURGE_KEPT, merged, incoming_wins)
    loser = local if incoming_wins else incoming
    return MergeResult(Outcome.CONFLICT, merged, incoming_wins, loser)
