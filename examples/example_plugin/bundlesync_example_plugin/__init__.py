"""Example bundlesync plugin, one of each integration style (see docs/plugins.md).

- :class:`UpdateUserLogCounts` is a *sync operation*: after an import writes app rows,
  it refreshes ``example_user_log_counts`` (content session logs per user) inside the
  import's last transaction, so the counts commit together with the import's record: an
  import is never recorded with counts out of step with the logs.
- :meth:`TransferLogHook.post_transfer` is a *hook*: it appends one line per transfer to
  ``<home>/example-transfers.log``. If that fails (disk full, read-only home), the sync
  still succeeds and bundlesync prints a warning.
"""

from __future__ import annotations

import datetime

from bundlesync.hooks import FacilityDataSyncHook, register_hook
from bundlesync.operations import LocalOperation, SyncContext

__version__ = "0.1.0"

COUNTS_TABLE = "example_user_log_counts"
LOG_NAME = "example-transfers.log"


class UpdateUserLogCounts(LocalOperation):
    """Recompute per-user log counts after an import (runs at CLEANUP, in the import's last transaction)."""

    priority = 5

    def handle_initial(self, context: SyncContext) -> None:
        if context.is_export:
            return
        conn = context.connection
        conn.execute(f"CREATE TABLE IF NOT EXISTS {COUNTS_TABLE} (user_id TEXT PRIMARY KEY, logs INTEGER NOT NULL)")
        conn.execute(f"DELETE FROM {COUNTS_TABLE}")
        conn.execute(
            f"INSERT INTO {COUNTS_TABLE} (user_id, logs) SELECT user_id, count(*) FROM logger_contentsessionlog "
            "WHERE user_id IS NOT NULL GROUP BY user_id"
        )


@register_hook
class TransferLogHook(FacilityDataSyncHook):
    """Keeps the counts current and logs every transfer."""

    cleanup_operations = [UpdateUserLogCounts()]

    def post_transfer(self, dataset_id, local_is_single_user, remote_is_single_user, single_user_id, context):  # type: ignore[no-untyped-def]
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        bundle = context.bundle_path.name if context.bundle_path else "-"
        with open(context.home / LOG_NAME, "a", encoding="utf-8") as log:
            log.write(f"{when} {context.direction} dataset={dataset_id} bundle={bundle} "
                      f"records={context.counts.get('records', context.counts.get('received', 0))}\n")
