"""`bundlesync schedule`: a correct crontab line, installed once per facility and folder."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

from conftest import Pair, run_cli

STAND_IN = """#!/bin/sh
# Stands in for crontab(1): keeps the table in $CRONTAB_FILE.
if [ "$1" = "-l" ]; then
  [ -f "$CRONTAB_FILE" ] || { echo "no crontab for $(id -un)" >&2; exit 1; }
  cat "$CRONTAB_FILE"
elif [ "$1" = "-" ]; then
  cat > "$CRONTAB_FILE"
else
  exit 2
fi
"""


def test_schedule_prints_a_cron_line(pair: Pair) -> None:
    res = run_cli(pair.a, "schedule", "--facility", pair.facility, "--out", "/media/usb", "--at", "02:30")
    line = res.last_line
    fields = line.split()
    assert fields[:5] == ["30", "2", "*", "*", "*"]
    command = shlex.split(line.split(" # ")[0])[5:]
    assert Path(command[0]).is_absolute() and (command[0].endswith("bundlesync") or command[1:3] == ["-m", "bundlesync"])
    assert command[command.index("--home") + 1] == str(pair.a)
    assert command[command.index("--out") + 1] == "/media/usb"
    assert {"export", "--require-mount", "--quiet"} <= set(command)
    assert command[command.index("--facility") + 1] == pair.facility
    every = run_cli(pair.a, "schedule", "--facility", pair.facility, "--out", "/media/usb", "--every", "6h").last_line
    assert every.split()[:5] == ["0", "*/6", "*", "*", "*"]
    for bad in (["--every", "5h"], ["--at", "25:00"], []):
        res = run_cli(pair.a, "schedule", "--facility", pair.facility, "--out", "/media/usb", *bad, check=False)
        assert res.code == 2 and len(res.err.strip().splitlines()) == 1, res


def test_install_replaces_the_line_for_the_same_facility_and_folder(pair: Pair, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "crontab"
    tool.write_text(STAND_IN)
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    table = tmp_path / "table"
    table.write_text("MAILTO=admin\n15 3 * * * /usr/bin/backup\n")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CRONTAB_FILE": str(table)}
    args = ["schedule", "--facility", pair.facility, "--out", "/media/usb", "--install"]
    run_cli(pair.a, *args, "--at", "02:00", env=env)
    run_cli(pair.a, *args, "--every", "6h", env=env)  # replaces, does not add
    other = run_cli(pair.a, "schedule", "--facility", pair.facility, "--out", "/media/usb2", "--install",
                    "--at", "04:00", env=env).last_line
    rows = table.read_text().splitlines()
    assert rows[:2] == ["MAILTO=admin", "15 3 * * * /usr/bin/backup"]
    ours = [r for r in rows if "bundlesync-schedule" in r]
    assert len(ours) == 2 and ours[0].startswith("0 */6 ") and ours[1] == other
    # The installed line really runs: cron's shell, a minimal PATH, a folder that is not a mounted drive.
    (tmp_path / "media").mkdir()
    command = ours[0].split(" # ")[0].split(None, 5)[5].replace("/media/usb", str(tmp_path / "media"))
    proc = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 8 and proc.stdout == "" and "not on a mounted drive" in proc.stderr
