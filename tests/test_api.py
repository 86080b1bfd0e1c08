"""The curated Python API: every exported name resolves, and a script can sync without the CLI."""

from __future__ import annotations

from pathlib import Path

import bundlesync
from conftest import Pair, dump_tables


def test_exported_names_resolve_and_are_sorted() -> None:
    assert bundlesync.__all__ == sorted(bundlesync.__all__, key=str.casefold)
    for name in bundlesync.__all__:
        assert getattr(bundlesync, name) is not None


def test_script_exports_and_imports_through_the_api(pair: Pair) -> None:
    with bundlesync.open_device(pair.a) as device:
        exported = bundlesync.export_bundle(device, pair.facility, pair.usb)
    assert exported.path is not None and exported.records > 0
    with bundlesync.open_device(pair.b) as device:
        verified = bundlesync.verify_bundle(device, exported.path)
        assert verified.manifest.bundle_id == exported.bundle_id
        report = bundlesync.import_bundle(device, exported.path)
    assert report.dequeue.received == exported.records
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)


def test_unknown_attribute_is_an_attribute_error() -> None:
    try:
        getattr(bundlesync, "no_such_name")
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")


def test_open_device_refuses_an_uninitialised_home(tmp_path: Path) -> None:
    try:
        bundlesync.open_device(tmp_path / "nothing")
    except bundlesync.BundlesyncError as exc:
        assert "bundlesync init" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected a BundlesyncError")
