"""Sync operations and the context they receive (the Kolibri/Morango shape).

An operation is an object with a ``priority`` and ``handle_initial(context)``,
listed in a hook's ``<stage>_operations``. Operations run *inside* the sync: a
stage's plugin operations run together in one SQLite transaction of their own, just
before bundlesync's own work of that stage (at CLEANUP, and at export's INITIALIZING,
in the transaction of that work), so their writes commit or roll back together. An
operation that raises rolls back that transaction and fails the sync; an import then
stops before it is recorded, and importing the bundle again completes it
(``docs/plugins.md``).

bundlesync's own stage work is written as operations too (see
:mod:`bundlesync.sync.exporter` and :mod:`bundlesync.sync.importer`), so each pipeline
reads as the list of its stages and what runs in each.
"""

from __future__ import annotations

import enum
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from bundlesync.format.manifest import Manifest
    from bundlesync.profile import Profile

__all__ = ["EXPORT_STAGES", "IMPORT_STAGES", "LocalOperation", "Stage", "Step", "SyncContext"]


class Stage(enum.Enum):
    """The stages of a transfer, in Morango's names."""

    INITIALIZING = "initializing"
    SERIALIZING = "serializing"
    QUEUING = "queuing"
    TRANSFERRING = "transferring"
    DEQUEUING = "dequeuing"
    DESERIALIZING = "deserializing"
    CLEANUP = "cleanup"

    @property
    def attribute(self) -> str:
        """The hook class attribute listing this stage's operations."""
        return f"{self.value}_operations"


EXPORT_STAGES = (Stage.INITIALIZING, Stage.SERIALIZING, Stage.QUEUING, Stage.TRANSFERRING, Stage.CLEANUP)
"""Export runs these, in this order."""

IMPORT_STAGES = (
    Stage.INITIALIZING, Stage.TRANSFERRING, Stage.SERIALIZING, Stage.DEQUEUING, Stage.DESERIALIZING, Stage.CLEANUP,
)
"""Import runs these, in this order (see :mod:`bundlesync.sync.importer` for their transactions)."""


@dataclass
class SyncContext:
    """What an operation or hook can see of the sync it runs in.

    ``connection`` is the device's open database connection; while operations run it is
    inside their transaction. ``counts`` holds
    the numbers the built-in stages report as they go (records per model, rows
    written…); ``extra`` is free space for plugins to pass data between stages.
    """

    direction: str
    home: Path
    profile: Profile
    connection: sqlite3.Connection
    instance_id: str
    stage: Stage | None = None
    dataset_id: str | None = None
    facility_id: str | None = None
    filter: tuple[str, ...] = ()
    bundle_path: Path | None = None
    manifest: Manifest | None = None
    local_scope: str | None = None
    remote_scope: str | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_export(self) -> bool:
        """True on the sending side."""
        return self.direction == "export"

    @property
    def database(self) -> sqlite3.Connection:
        """Alias of ``connection``."""
        return self.connection


class LocalOperation:
    """Base class of sync operations: override :meth:`handle_initial`.

    ``priority``: higher runs first within a stage (as in Kolibri).
    """

    priority: ClassVar[int] = 0

    def handle_initial(self, context: SyncContext) -> None:
        """Do this operation's work for ``context.stage``."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """The name reports and manifests use for this operation."""
        return type(self).__qualname__


class Step(LocalOperation):
    """A built-in stage step: bundlesync's own work runs through the same machinery as plugins'."""

    def __init__(self, name: str, run: Callable[[SyncContext], None]) -> None:
        self._name, self._run = name, run

    @property
    def name(self) -> str:
        """What the step does, for reports."""
        return self._name

    def handle_initial(self, context: SyncContext) -> None:
        """Run the step."""
        self._run(context)
