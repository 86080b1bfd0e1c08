"""Partition prefixes: when a partition lies under a prefix, in Python and in SQL.

A partition is a colon-separated string computed from a row (``D:user-rw:U``); a filter
or a scope is a set of partition prefixes. Containment holds only at a ``:`` boundary,
so user ``u1``'s prefix never reaches user ``u12``. Every room that reasons about
partitions (scopes, knowledge, queuing, merging) uses these three functions.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["covered", "prefix_sql", "within"]


def within(partition: str, prefixes: Sequence[str]) -> bool:
    """True if ``partition`` lies under one of ``prefixes``, at a ``:`` boundary.

    ``D:user-rw:u1`` is under ``D`` and ``D:user-rw:u1`` but not under ``D:user-rw:u`` —
    a plain ``startswith`` would let user ``u1``'s scope reach user ``u12``. The empty
    prefix covers everything.
    """
    return any(partition == p or partition.startswith(p + ":") or not p for p in prefixes)


def prefix_sql(prefixes: Sequence[str], column: str = "partition") -> tuple[str, list[object]]:
    """SQL condition (and its parameters) equivalent to :func:`within` on ``column``."""
    clause = f"({column} = ? OR substr({column}, 1, ?) = ?)"
    return "(" + " OR ".join([clause] * len(prefixes)) + ")", [x for p in prefixes for x in (p, len(p) + 1, p + ":")]


def covered(prefixes: Sequence[str], by: Sequence[str]) -> bool:
    """True if every prefix lies under one of ``by`` (a filter is a subset of another)."""
    return all(within(p, by) for p in prefixes)
