"""Issue 3: plugin operations at every stage, fail-tolerant hooks, loading, through the CLI."""

from __future__ import annotations

import json
import shutil
import sqlite3
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, Pair, clone_device, dump_tables, masked_state, run_cli

EXAMPLE = ROOT / "examples" / "example_plugin"

# A test plugin: three operations per stage with different priorities, each appending
# "stage:priority" to a trace file; BSYNC_FAIL=<stage> makes that stage's operation raise,
# BSYNC_FAIL_HOOK=<pre_transfer|post_transfer> makes that hook raise.
TRACE_PLUGIN = textwrap.dedent('''
    import os
    from bundlesync.hooks import FacilityDataSyncHook, register_hook
    from bundlesync.operations import LocalOperation, Stage

    def trace(line):
        with open(os.environ["BSYNC_TRACE"], "a") as f:
            f.write(line + "\\n")

    class Traced(LocalOperation):
        def __init__(self, priority):
            self.priority = priority
        @property
        def name(self):
            return f"Traced{self.priority}"
        def handle_initial(self, context):
            trace(f"{context.direction}:{context.stage.value}:{self.priority}")
            if os.environ.get("BSYNC_FAIL") == context.stage.value and self.priority == 1:
                context.connection.execute("CREATE TABLE IF NOT EXISTS plugin_scribble (x)")
                raise RuntimeError("boom in " + context.stage.value)

    attrs = {f"{s.value}_operations": [Traced(1), Traced(9), Traced(5)] for s in Stage}

    def pre_transfer(self, dataset_id, local_single, remote_single, user, context):
        trace(f"{context.direction}:pre_transfer")
        if os.environ.get("BSYNC_FAIL_HOOK") == "pre_transfer":
            raise ValueError("pre hook broke")

    def post_transfer(self, dataset_id, local_single, remote_single, user, context):
        trace(f"{context.direction}:post_transfer")
        if os.environ.get("BSYNC_FAIL_HOOK") == "post_transfer":
            raise ValueError("post hook broke")

    attrs.update(pre_transfer=pre_transfer, post_transfer=post_transfer)
    TraceHook = register_hook(type("TraceHook", (FacilityDataSyncHook,), attrs))
''')


def _use_plugin(home: Path, module: str) -> None:
    config = home / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["plugins"] = [module]
    config.write_text(yaml.safe_dump(data))


@pytest.fixture
def traced(pair: Pair, tmp_path: Path) -> tuple[Pair, dict[str, str], Path]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "trace_plugin.py").write_text(TRACE_PLUGIN)
    trace = tmp_path / "trace.txt"
    _use_plugin(pair.a, "trace_plugin")
    _use_plugin(pair.b, "trace_plugin")
    return pair, {"PYTHONPATH": str(site), "BSYNC_TRACE": str(trace)}, trace


def _state(db: Path) -> dict[str, list[tuple[object, ...]]]:
    conn = sqlite3.connect(db)
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') ORDER BY name")]
    out = {n: sorted(conn.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr) for n in names}
    conn.close()
    return out


def test_operations_run_by_priority_at_every_stage(traced: tuple[Pair, dict[str, str], Path]) -> None:
    pair, env, trace = traced
    bundle = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), env=env).last_line
    run_cli(pair.b, "import", bundle, env=env)
    lines = trace.read_text().split()
    expected = ["export:pre_transfer"]
    for stage in ["initializing", "serializing", "queuing", "transferring", "cleanup"]:
        expected += [f"export:{stage}:9", f"export:{stage}:5", f"export:{stage}:1"]
    expected += ["export:post_transfer", "import:pre_transfer"]
    for stage in ["initializing", "transferring", "serializing", "dequeuing", "deserializing", "cleanup"]:
        expected += [f"import:{stage}:9", f"import:{stage}:5", f"import:{stage}:1"]
    expected += ["import:post_transfer"]
    assert lines == expected
    manifest = json.loads(run_cli(None, "inspect", bundle, "--json").out)["manifest"]
    assert {(o["operation"], o["stage"]) for o in manifest["operations"]} >= {("Traced9", "queuing")}


@pytest.mark.parametrize("stage", ["transferring", "serializing", "dequeuing", "deserializing", "cleanup"])
def test_failing_import_operation_stops_the_import_before_it_is_recorded(
    traced: tuple[Pair, dict[str, str], Path], stage: str
) -> None:
    """The operation's own transaction rolls back; what earlier stages applied stays; a new import completes it."""
    pair, env, _ = traced
    bundle = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), env=env).last_line
    ref_home, ref_db = clone_device(pair.b, pair.b_db, pair.tmp / "reference")
    run_cli(ref_home, "import", "--no-receipt", bundle, env=env)  # the same import, uninterrupted
    before = _state(pair.b_db)

    res = run_cli(pair.b, "import", "--no-receipt", bundle, env={**env, "BSYNC_FAIL": stage}, check=False)
    assert res.code == 6
    err = res.err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in res.err
    assert f"failed at {stage.upper()}" in err[0] and "trace_plugin" in err[0] and "Traced1" in err[0]
    assert "import the bundle again" in err[0]
    now = _state(pair.b_db)
    assert "plugin_scribble" not in now  # the failing operation's own write was rolled back
    assert now["bundlesync_transfers"] == [] and now["bundlesync_fsic"] == before["bundlesync_fsic"]
    assert now["bundlesync_peers"] == [] and now["bundlesync_applying"] == []
    # DEQUEUING's own work (every record merged) ran before a DESERIALIZING or CLEANUP operation failed.
    merged = stage in ("deserializing", "cleanup")
    assert len(now["bundlesync_store"]) == (len(_state(ref_db)["bundlesync_store"]) if merged else 0)
    app = dump_tables(pair.b_db)
    if stage == "cleanup":
        assert app == dump_tables(ref_db)  # every row is in; only the recording was rolled back
    elif not merged:
        assert all(rows == before[name] for name, rows in app.items())  # nothing of the bundle is applied
    assert list((pair.b / "staging").iterdir()) == []

    run_cli(pair.b, "import", "--no-receipt", bundle, env=env)  # and the next import completes it
    assert masked_state(pair.b_db, runs=False) == masked_state(ref_db, runs=False)


@pytest.mark.parametrize("stage", ["initializing", "serializing", "queuing", "transferring", "cleanup"])
def test_failing_export_operation_leaves_no_bundle(traced: tuple[Pair, dict[str, str], Path], stage: str) -> None:
    pair, env, _ = traced
    res = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb),
                  env={**env, "BSYNC_FAIL": stage}, check=False)
    assert res.code == 6 and res.out == ""
    assert len(res.err.strip().splitlines()) == 1 and f"failed at {stage.upper()}" in res.err
    assert [p.name for p in pair.usb.iterdir() if "bundle" in p.name] == []
    ok = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), env=env)
    assert Path(ok.last_line).is_file()


@pytest.mark.parametrize("hook", ["pre_transfer", "post_transfer"])
def test_failing_hook_warns_and_sync_succeeds(traced: tuple[Pair, dict[str, str], Path], hook: str) -> None:
    pair, env, _ = traced
    bad = {**env, "BSYNC_FAIL_HOOK": hook}
    exported = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), env=bad)
    assert f"{hook} hook TraceHook of plugin trace_plugin failed" in exported.err
    imported = run_cli(pair.b, "import", exported.last_line, env=bad)
    assert "ValueError" in imported.err and "the sync went on" in imported.err
    b = sqlite3.connect(pair.b_db)
    assert b.execute("SELECT count(*) FROM kolibriauth_facilityuser").fetchone()[0] > 0


def test_no_plugins_flag_and_listing(traced: tuple[Pair, dict[str, str], Path]) -> None:
    pair, env, trace = traced
    listed = json.loads(run_cli(pair.a, "plugins", "--json", env=env).out)
    assert [p["name"] for p in listed] == ["trace_plugin"] and listed[0]["hooks"] == ["TraceHook"]
    assert "no plugins loaded" in run_cli(pair.a, "--no-plugins", "plugins", env=env).err
    run_cli(pair.a, "--no-plugins", "export", "--facility", pair.facility, "--out", str(pair.usb), env=env)
    assert not trace.exists()


def test_plugin_that_fails_to_load_is_one_clear_line(pair: Pair, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "broken_plugin.py").write_text("raise ImportError('needs numpy')\n")
    _use_plugin(pair.a, "broken_plugin")
    res = run_cli(pair.a, "status", check=True, env={"PYTHONPATH": str(site)})
    assert res.code == 0  # status does not load plugins
    res = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb),
                  env={"PYTHONPATH": str(site)}, check=False)
    assert res.code == 6 and "Traceback" not in res.err
    assert res.err.strip().splitlines() == [res.err.strip()] and "broken_plugin" in res.err and "--no-plugins" in res.err
    _use_plugin(pair.a, "no_such_module_anywhere")
    res = run_cli(pair.a, "plugins", check=False)
    assert res.code == 6 and "no_such_module_anywhere" in res.err


def _example_site(tmp_path: Path) -> Path:
    """Install the example plugin as a distribution with an entry point (a .dist-info on the path)."""
    site = tmp_path / "example-site"
    shutil.copytree(EXAMPLE / "bundlesync_example_plugin", site / "bundlesync_example_plugin")
    info = site / "bundlesync_example_plugin-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bundlesync-example-plugin\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[bundlesync.plugins]\nexample = bundlesync_example_plugin\n")
    (info / "top_level.txt").write_text("bundlesync_example_plugin\n")
    return site


def _check_example_ran(pair: Pair, env: dict[str, str]) -> None:
    bundle = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), env=env).last_line
    run_cli(pair.b, "import", bundle, env=env)
    b = sqlite3.connect(pair.b_db)
    counts = dict(b.execute("SELECT user_id, logs FROM example_user_log_counts").fetchall())
    expected = dict(b.execute("SELECT user_id, count(*) FROM logger_contentsessionlog WHERE user_id IS NOT NULL "
                              "GROUP BY user_id").fetchall())
    assert counts == expected and sum(counts.values()) > 0
    log = (pair.b / "example-transfers.log").read_text().splitlines()
    assert len(log) == 1 and "import" in log[0] and Path(bundle).name in log[0]


def test_example_plugin_through_an_entry_point(pair: Pair, tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(_example_site(tmp_path))}
    listed = json.loads(run_cli(pair.b, "plugins", "--json", env=env).out)
    assert listed[0]["name"] == "example" and listed[0]["version"] == "0.1.0"
    assert listed[0]["source"] == "entry point"
    _check_example_ran(pair, env)


def test_example_plugin_through_config_yaml(pair: Pair) -> None:
    env = {"PYTHONPATH": str(EXAMPLE)}
    _use_plugin(pair.a, "bundlesync_example_plugin")
    _use_plugin(pair.b, "bundlesync_example_plugin")
    listed = json.loads(run_cli(pair.b, "plugins", "--json", env=env).out)
    assert listed[0]["name"] == "bundlesync_example_plugin" and listed[0]["version"] == "0.1.0"
    assert listed[0]["operations"] == {"cleanup": ["UpdateUserLogCounts"]}
    _check_example_ran(pair, env)


def test_importer_warns_about_operations_it_lacks(traced: tuple[Pair, dict[str, str], Path]) -> None:
    pair, env, _ = traced
    bundle = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), env=env).last_line
    res = run_cli(pair.b, "--no-plugins", "import", bundle, env=env)
    assert "operation Traced9 of plugin trace_plugin" in res.err and "not loaded here" in res.err
