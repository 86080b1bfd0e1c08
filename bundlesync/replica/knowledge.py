"""Per-prefix knowledge: what a device holds, as ``{prefix: {instance: counter}}``.

An entry ``K[p][i] = c`` says "for every partition under prefix ``p``, the holder has
everything instance ``i`` wrote up to counter ``c``" (Morango's FSIC v2 shape). A flat
``{instance: counter}`` for a whole filter loses what differs between its prefixes — a
learner holds the authority's writes in its own ``user-rw`` partition but nothing of the
``anonymous`` one it may only write — so bases, results, receipts and what is known of
peers all keep this shape. The functions here are pure; :mod:`bundlesync.replica.fsic`
stores a device's own knowledge.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from bundlesync.partitions import within

__all__ = [
    "Knowledge",
    "ancestors",
    "clip",
    "covers",
    "effective",
    "flat",
    "from_flat",
    "intersect",
    "join",
    "meet",
    "normalize",
    "strictly_under",
]

Knowledge = dict[str, dict[str, int]]
"""Prefix -> instance -> counter."""


def strictly_under(partition: str, prefix: str) -> bool:
    """True if ``partition`` lies under ``prefix`` and is not ``prefix`` itself."""
    return partition != prefix and within(partition, [prefix])


def ancestors(partition: str) -> list[str]:
    """The prefixes ``partition`` lies under: ``""`` and each ``:``-boundary prefix, itself included."""
    parts = partition.split(":") if partition else []
    return ["", *(":".join(parts[: n + 1]) for n in range(len(parts)))]


def effective(knowledge: Mapping[str, Mapping[str, int]], partition: str) -> dict[str, int]:
    """Per instance, what is held for ``partition``: the maximum over the prefixes above it."""
    out: dict[str, int] = {}
    for prefix in ancestors(partition):
        for inst, ctr in knowledge.get(prefix, {}).items():
            if out.get(inst, 0) < ctr:
                out[inst] = ctr
    return out


def covers(knowledge: Mapping[str, Mapping[str, int]], partition: str, inst: str, ctr: int) -> bool:
    """True if the holder has ``inst``'s write ``ctr`` for a record in ``partition``."""
    return effective(knowledge, partition).get(inst, 0) >= ctr


def normalize(knowledge: Mapping[str, Mapping[str, int]]) -> Knowledge:
    """The same knowledge without entries a prefix above already implies, nor empty prefixes."""
    out: Knowledge = {}
    for prefix in sorted(knowledge, key=len):
        above = effective(out, prefix)
        kept = {i: c for i, c in knowledge[prefix].items() if c > 0 and above.get(i, 0) < c}
        if kept:
            out[prefix] = kept
    return out


def clip(knowledge: Mapping[str, Mapping[str, int]], prefixes: Sequence[str]) -> Knowledge:
    """The part of ``knowledge`` that speaks for partitions under ``prefixes``.

    Entries above a prefix are brought down to it; entries below one are kept as they are.
    """
    out: Knowledge = {}
    for prefix in prefixes:
        at = effective(knowledge, prefix)
        if at:
            _raise(out, prefix, at)
        for below, counters in knowledge.items():
            if strictly_under(below, prefix):
                _raise(out, below, counters)
    return normalize(out)


def join(items: Iterable[Mapping[str, Mapping[str, int]]]) -> Knowledge:
    """What is held by someone who holds all of ``items`` (pointwise maximum)."""
    out: Knowledge = {}
    for knowledge in items:
        for prefix, counters in knowledge.items():
            _raise(out, prefix, counters)
    return normalize(out)


def meet(items: Iterable[Mapping[str, Mapping[str, int]]]) -> Knowledge:
    """What every one of ``items`` holds (pointwise minimum, per partition).

    Evaluated at every prefix any of them names: the deepest such prefix above a
    partition sees exactly what each holder holds for that partition.
    """
    listed = list(items)
    if not listed:
        return {}
    out: Knowledge = {}
    for prefix in {p for k in listed for p in k}:
        views = [effective(k, prefix) for k in listed]
        common = set(views[0]).intersection(*views[1:])
        counters = {i: min(v[i] for v in views) for i in common}
        if counters:
            out[prefix] = counters
    return normalize(out)


def flat(knowledge: Mapping[str, Mapping[str, int]], prefixes: Sequence[str]) -> dict[str, int]:
    """The flat view: per instance, what is held for *every* prefix (the minimum over them)."""
    result: dict[str, int] | None = None
    for prefix in prefixes:
        one = effective(knowledge, prefix)
        result = one if result is None else {i: min(c, one[i]) for i, c in result.items() if i in one}
    return result or {}


def from_flat(fsic: Mapping[str, int], prefixes: Sequence[str]) -> Knowledge:
    """Read a flat ``{instance: counter}`` claim as holding for each of ``prefixes``."""
    return normalize({p: dict(fsic) for p in prefixes})


def intersect(a: Sequence[str], b: Sequence[str]) -> tuple[str, ...]:
    """The prefixes covering exactly the partitions under both ``a`` and ``b``."""
    out = {x for x in a if within(x, b)} | {y for y in b if within(y, a)}
    return tuple(sorted(p for p in out if not any(strictly_under(p, q) for q in out)))


def _raise(out: Knowledge, prefix: str, counters: Mapping[str, int]) -> None:
    slot = out.setdefault(prefix, {})
    for inst, ctr in counters.items():
        if slot.get(inst, 0) < ctr:
            slot[inst] = ctr
