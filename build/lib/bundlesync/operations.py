"""The import path plugins use for operations: ``from bundlesync.operations import LocalOperation``.

The implementation lives in :mod:`bundlesync.plugins.operations`; this name is part of the
public plugin contract and stays stable.
"""

from bundlesync.plugins.operations import (
    EXPORT_STAGES,
    IMPORT_STAGES,
    LocalOperation,
    Stage,
    Step,
    SyncContext,
)

__all__ = ["EXPORT_STAGES", "IMPORT_STAGES", "LocalOperation", "Stage", "Step", "SyncContext"]
