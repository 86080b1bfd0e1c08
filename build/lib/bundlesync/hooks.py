"""The import path plugins use for hook classes: ``from bundlesync.hooks import FacilityDataSyncHook``.

The implementation lives in :mod:`bundlesync.plugins.hooks`; this name is part of the
public plugin contract and stays stable.
"""

from bundlesync.plugins.hooks import FacilityDataSyncHook, register_hook, registered_hooks

__all__ = ["FacilityDataSyncHook", "register_hook", "registered_hooks"]
