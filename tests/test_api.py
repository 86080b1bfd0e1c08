"""The curated Python API: every exported name resolves, and a script can sync without the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import bundlesync
from bundlesync.format.container import read_info
from bundlesync.plugins.loader import PluginSet
from conftest import ROOT, Pair, dump_tables


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


def test_the_api_runs_the_devices_plugins_as_the_command_line_does(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """A script gets the plugins of the home's config (and of its profile) without naming them;
    ``PluginSet()`` runs none."""
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "example_plugin"))
    config = pair.a / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["plugins"] = ["bundlesync_example_plugin"]
    config.write_text(yaml.safe_dump(data))
    with bundlesync.open_device(pair.a) as device:
        default = bundlesync.export_bundle(device, pair.facility, pair.usb, full=True)
        (pair.tmp / "bare").mkdir()
        bare = bundlesync.export_bundle(device, pair.facility, pair.tmp / "bare", full=True, plugins=PluginSet())
    assert default.path is not None and bare.path is not None
    operations = read_info(default.path).manifest["operations"]
    assert isinstance(operations, list)
    ran = {op["plugin"] for op in operations}
    assert ran == {"bundlesync_example_plugin"}
    assert read_info(bare.path).manifest["operations"] == []
