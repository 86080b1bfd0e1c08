"""Certificate scopes as partition filters.

A certificate's scope (``full`` or ``user:ID``) names one of the profile's scope
templates (Kolibri's scope definitions); filled in with the dataset and user
ids, it yields the partition prefixes the holder may read and may write.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .certs import parse_scope
from .errors import StateError
from .profile import Profile

__all__ = ["ScopeFilters", "covered", "prefix_sql", "scope_filters", "within"]


@dataclass(frozen=True)
class ScopeFilters:
    """The read and write partition prefixes of one certificate scope."""

    scope: str
    read: tuple[str, ...]
    write: tuple[str, ...]


def scope_filters(profile: Profile, dataset_id: str, scope: str) -> ScopeFilters:
    """Prefixes for ``scope`` in ``dataset_id`` under ``profile``'s templates."""
    kind, user_id = parse_scope(scope)
    template = profile.scopes.get(kind)
    if template is None:
        raise StateError(f"profile {profile.name} defines no '{kind}' scope; it cannot be used with this profile")
    params = {"dataset_id": dataset_id}
    if user_id is not None:
        params["user_id"] = user_id
    return ScopeFilters(scope, template.read_prefixes(**params), template.write_prefixes(**params))


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
