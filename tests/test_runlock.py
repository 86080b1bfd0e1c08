"""One run at a time per home, and another program's database lock: exit 8 with one line."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, CliResult, Pair, run_cli

# Slows QUEUING down so that two exports started together really overlap.
SLOW_PLUGIN = textwrap.dedent('''
    import time
    from bundlesync.hooks import FacilityDataSyncHook, register_hook
    from bundlesync.operations import LocalOperation

    class Slow(LocalOperation):
        def handle_initial(self, context):
            time.sleep(1.0)

    @register_hook
    class SlowHook(FacilityDataSyncHook):
        queuing_operations = [Slow()]
''')


@contextmanager
def held_lock(home: Path) -> Iterator[None]:
    fd = os.open(home / "bundlesync.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _one_error_line(res: CliResult) -> str:
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.err, res.err
    return lines[0]


def _add(db: Path, n: int = 3) -> None:
    conn = sqlite3.connect(db)
    conn.execute("UPDATE kolibriauth_facilityuser SET full_name = full_name || '!' WHERE rowid <= ?", (n,))
    conn.commit()
    conn.close()


@pytest.mark.parametrize("command", ["export", "import", "purge", "cert", "reidentify"])
def test_second_run_waits_then_exits_busy(pair: Pair, command: str) -> None:
    bundle = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb)).last_line
    args = {
        "export": ["export", "--facility", pair.facility, "--out", str(pair.usb), "--full"],
        "import": ["import", bundle],
        "purge": ["purge", "--facility", pair.facility, "--user", "nobody"],
        "cert": ["cert", "request", "--facility", pair.facility, "--scope", "full", "--out", str(pair.usb)],
        "reidentify": ["reidentify"],
    }[command]
    home = pair.b if command == "import" else pair.a
    identity = (home / "identity.json").read_text()
    with held_lock(home):
        res = run_cli(home, *args, "--wait", "0.5", check=False)
    assert res.code == 8, res
    line = _one_error_line(res)
    assert "another bundlesync run" in line and "--wait" in line
    assert res.out == ""
    if command == "export":
        assert len(list(pair.usb.glob("bundle-*.bsync"))) == 1  # nothing written by the refused run
    assert (home / "identity.json").read_text() == identity


def test_waiting_run_goes_on_when_the_lock_is_freed(pair: Pair) -> None:
    _add(pair.a_db)
    proc: subprocess.Popen[str]
    with held_lock(pair.a):
        env = {k: v for k, v in os.environ.items() if k != "BUNDLESYNC_HOME"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "bundlesync", "--home", str(pair.a), "export", "--facility", pair.facility,
             "--out", str(pair.usb), "--wait", "30"], cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        assert proc.returncode is None  # still waiting for the lock
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert Path(out.strip().splitlines()[-1]).is_file()


def test_overlapping_exports_write_exactly_one_bundle(pair: Pair, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "slow_plugin.py").write_text(SLOW_PLUGIN)
    config = pair.a / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["plugins"] = ["slow_plugin"]
    config.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != "BUNDLESYNC_HOME"}
    env["PYTHONPATH"] = str(site)
    cmd = [sys.executable, "-m", "bundlesync", "--home", str(pair.a), "export", "--facility", pair.facility,
           "--out", str(pair.usb), "--wait", "30"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    results = [(p.communicate(timeout=120), p.returncode) for p in procs]
    assert [code for _, code in results] == [0, 0], results
    bundles = sorted(pair.usb.glob("bundle-*.bsync"))
    assert len(bundles) == 1, bundles
    printed = [out.strip() for (out, _), _ in results if out.strip()]
    assert printed == [str(bundles[0])]
    assert any("nothing new" in err for (_, err), _ in results)


def test_exclusive_sqlite_lock_of_another_program_is_busy_not_a_bad_file(pair: Pair) -> None:
    other = sqlite3.connect(pair.a_db, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        res = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), "--wait", "0.5",
                      check=False)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert res.code == 8, res
    line = _one_error_line(res)
    assert "locked" in line and "SQLite file" not in line
    assert list(pair.usb.iterdir()) == []
