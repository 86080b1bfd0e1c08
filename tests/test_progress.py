"""Progress bars on a terminal (pseudo-terminal), and none when stderr is not one or with --quiet."""

from __future__ import annotations

import os
import pty
import sqlite3
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, Pair, run_cli


def _run_on_pty(home: Path, *args: str) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal; returns (exit code, stdout, what the terminal showed)."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "BUNDLESYNC_HOME"}
    env.update(BUNDLESYNC_HOME=str(home), COLUMNS="120", TERM="xterm")
    proc = subprocess.Popen([sys.executable, "-m", "bundlesync", *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    shown = bytearray()
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    out, _ = proc.communicate(timeout=120)
    os.close(master)
    return proc.returncode, out.decode(), shown.decode("utf-8", "replace")


def test_progress_bar_on_a_terminal_only(pair: Pair) -> None:
    code, out, shown = _run_on_pty(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb))
    assert code == 0, shown
    bundle = out.strip().splitlines()[-1]
    assert "exporting" in shown and "records/s" in shown and "100%" in shown, shown
    code, _, shown = _run_on_pty(pair.b, "import", bundle)
    assert code == 0 and "importing" in shown and "records/s" in shown and "100%" in shown, shown
    # Not a terminal (cron, pipes): no bar, only the usual lines.
    conn = sqlite3.connect(pair.a_db)
    conn.execute("UPDATE kolibriauth_facilityuser SET full_name = 'p' WHERE rowid = 1")
    conn.commit()
    conn.close()
    piped = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb))
    assert "exporting" not in piped.err and "%" not in piped.err and "records/s" not in piped.err
    assert run_cli(pair.b, "import", piped.last_line).err.count("\n") == 1
    # --quiet on a terminal: nothing at all.
    conn = sqlite3.connect(pair.a_db)
    conn.execute("UPDATE kolibriauth_facilityuser SET full_name = 'q' WHERE rowid = 1")
    conn.commit()
    conn.close()
    code, out, shown = _run_on_pty(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), "-q")
    assert (code, out, shown) == (0, "", "")
