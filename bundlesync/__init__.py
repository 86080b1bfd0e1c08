"""bundlesync: signed, file-based sync of partitioned SQLite data between offline devices.

The curated Python API (what an app such as Kolibri, or a script, calls)::

    import bundlesync

    with bundlesync.open_device("/path/to/home") as device:
        result = bundlesync.export_bundle(device, facility_id, Path("/media/usb"))
        report = bundlesync.import_bundle(device, Path("/media/usb/bundle-….bsync"))
        bundlesync.verify_bundle(device, path)

Every failure is a :class:`BundlesyncError` (see :mod:`bundlesync.errors` for the tree and
the exit code of each kind). The command line (:mod:`bundlesync.cli`) is a thin skin over
these functions. The package is organised in rooms: ``format`` (the bundle file), ``trust``
(keys, certificates, receipts, scopes), ``replica`` (the app database, tracking, the store,
knowledge, the merge rule), ``sync`` (the export and import pipelines) and ``plugins``
(the plugin API); see ``docs/architecture.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bundlesync._version import __version__

if TYPE_CHECKING:  # the names below are imported on first use, so `bundlesync --version` starts fast
    from bundlesync.device import Device
    from bundlesync.errors import BundlesyncError
    from bundlesync.sync.exporter import ExportResult, export_bundle
    from bundlesync.sync.importer import ImportResult, VerifiedBundle, import_bundle, verify_bundle

__all__ = [
    "__version__",
    "BundlesyncError",
    "Device",
    "export_bundle",
    "ExportResult",
    "import_bundle",
    "ImportResult",
    "open_device",
    "VerifiedBundle",
    "verify_bundle",
]

_LAZY = {
    "BundlesyncError": "bundlesync.errors",
    "Device": "bundlesync.device",
    "ExportResult": "bundlesync.sync.exporter",
    "export_bundle": "bundlesync.sync.exporter",
    "ImportResult": "bundlesync.sync.importer",
    "VerifiedBundle": "bundlesync.sync.importer",
    "import_bundle": "bundlesync.sync.importer",
    "verify_bundle": "bundlesync.sync.importer",
}


def open_device(home: str | Path | None = None) -> Device:
    """Open an initialised device home (``None``: ``$BUNDLESYNC_HOME``); close it when done."""
    from bundlesync.device import Device, resolve_home

    return Device.open(resolve_home(home))


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bundlesync' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
