"""Plugin hooks: the class a plugin subclasses and the decorator that registers it.

The shape follows Kolibri's ``FacilityDataSyncHook``:
a hook class lists operations per stage (``cleanup_operations = [...]``) for
work that is vital to the data (each stage's operations commit or roll back together,
and a failure stops the sync), and may define ``pre_transfer`` /
``post_transfer`` for fail-tolerant side effects, which run before the first
stage and after the last and whose failures are logged, never fatal.
"""

from __future__ import annotations

from typing import Any, TypeVar

from bundlesync.plugins.operations import LocalOperation, SyncContext

__all__ = ["FacilityDataSyncHook", "register_hook", "registered_hooks"]

_REGISTERED: list[type[FacilityDataSyncHook]] = []

H = TypeVar("H", bound="type[FacilityDataSyncHook]")


class FacilityDataSyncHook:
    """Subclass this, list operations per stage, optionally define the transfer hooks."""

    initializing_operations: list[LocalOperation] = []
    serializing_operations: list[LocalOperation] = []
    queuing_operations: list[LocalOperation] = []
    transferring_operations: list[LocalOperation] = []
    dequeuing_operations: list[LocalOperation] = []
    deserializing_operations: list[LocalOperation] = []
    cleanup_operations: list[LocalOperation] = []

    def pre_transfer(
        self,
        dataset_id: str,
        local_is_single_user: bool,
        remote_is_single_user: bool,
        single_user_id: str | None,
        context: SyncContext,
    ) -> Any:
        """Called before INITIALIZING; failures are logged and ignored."""

    def post_transfer(
        self,
        dataset_id: str,
        local_is_single_user: bool,
        remote_is_single_user: bool,
        single_user_id: str | None,
        context: SyncContext,
    ) -> Any:
        """Called after CLEANUP (after commit); failures are logged and ignored."""


def register_hook(cls: H) -> H:
    """Class decorator: make a hook class known to bundlesync when its module is imported."""
    if not (isinstance(cls, type) and issubclass(cls, FacilityDataSyncHook)):
        raise TypeError("@register_hook decorates subclasses of FacilityDataSyncHook")
    if cls not in _REGISTERED:
        _REGISTERED.append(cls)
    return cls


def registered_hooks() -> list[type[FacilityDataSyncHook]]:
    """Every hook class registered so far, in registration order."""
    return list(_REGISTERED)
