"""Certificate scopes as partition filters.

A certificate's scope (``full`` or ``user:ID``) names one of the profile's scope
templates (Kolibri's scope definitions); filled in with the dataset and user
ids, it yields the partition prefixes the holder may read and may write.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bundlesync.trust.certs import parse_scope
from bundlesync.errors import StateError
from bundlesync.profile import Profile

__all__ = ["ScopeFilters", "scope_filters"]


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
