"""Hostile paths through the real CLI: FIFOs, devices and symlinks to them are refused at once.

Every user-given or drive path is only read if it is a regular file, and only up to a bound.
Each command runs in a subprocess with a time limit (a FIFO used to block forever) and an
address-space limit (``/dev/zero`` used to be read into memory until ``MemoryError``).
"""

from __future__ import annotations

import os
import resource
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, CliResult, Pair, run_cli

MEMORY_LIMIT = 1 << 30
"""Address space a hostile-path command may use (a Python process with our imports needs ~0.3 GiB)."""


def run_bounded(home: Path, *args: str, timeout: float = 30) -> CliResult:
    """Run the CLI with a time and memory limit; a hang or a blow-up fails the test, not the suite."""
    env = {k: v for k, v in os.environ.items() if k != "BUNDLESYNC_HOME"}
    env["BUNDLESYNC_HOME"] = str(home)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    try:
        proc = subprocess.run([sys.executable, "-m", "bundlesync", *args], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"bundlesync {' '.join(args)} did not finish in {timeout} s (blocked on a FIFO?)")
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def assert_one_line_error(result: CliResult, code: int, *words: str) -> None:
    assert result.code == code, result.err
    assert "Traceback" not in result.err and "MemoryError" not in result.err, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for word in words:
        assert word in lines[0], lines[0]


def dataset_prefix(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("SELECT dataset_id FROM kolibriauth_collection WHERE kind = 'facility'").fetchone()[0])[:8]
    finally:
        conn.close()


@pytest.fixture
def fifo(pair: Pair) -> Path:
    path = pair.usb / "something.bsync"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("command", ["inspect", "verify", "import", "cert-install", "export-since"])
def test_a_fifo_is_refused_not_waited_on(pair: Pair, fifo: Path, command: str) -> None:
    args = {
        "inspect": ("inspect", str(fifo)),
        "verify": ("verify", str(fifo)),
        "import": ("import", str(fifo)),
        "cert-install": ("cert", "install", str(fifo)),
        "export-since": ("export", "--facility", pair.facility, "--out", str(pair.usb), "--since", str(fifo)),
    }[command]
    result = run_bounded(pair.b if command != "export-since" else pair.a, *args)
    code = {"cert-install": 5}.get(command, 4)
    assert_one_line_error(result, code, str(fifo))
    assert not list(pair.usb.glob("bundle-*")), "no bundle is written after a refusal"


@pytest.mark.parametrize("target", ["/dev/zero", "symlink"])
def test_a_device_as_receipt_is_refused_without_reading_it(pair: Pair, target: str) -> None:
    since = Path("/dev/zero")
    if target == "symlink":
        since = pair.usb / "receipt-link.json"
        since.symlink_to("/dev/zero")
    result = run_bounded(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), "--since", str(since))
    assert_one_line_error(result, 4, "receipt", "device")


def test_a_bundle_symlinked_to_a_device_is_refused(pair: Pair) -> None:
    link = pair.usb / "bundle-zero.bsync"
    link.symlink_to("/dev/zero")
    assert_one_line_error(run_bounded(pair.b, "inspect", str(link)), 4, "device")
    assert_one_line_error(run_bounded(pair.b, "import", str(link)), 4, str(link))


def test_bad_receipts_on_the_drive_are_skipped_and_the_export_goes_on(pair: Pair) -> None:
    prefix = dataset_prefix(pair.a_db)
    os.mkfifo(pair.usb / f"receipt-{prefix}-fifo0000.json")
    (pair.usb / f"receipt-{prefix}-zero0000.json").symlink_to("/dev/zero")
    (pair.usb / f"receipt-{prefix}-junk0000.json").write_bytes(b"[" * 100_000)  # deeper than any JSON parser goes
    result = run_bounded(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb))
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    bundle = Path(result.last_line)
    assert bundle.is_file() and bundle.name.startswith("bundle-")
    warnings = [line for line in result.err.splitlines() if line.startswith("warning: ignored receipt")]
    for name in ("fifo0000", "zero0000", "junk0000"):
        assert any(name in line for line in warnings), result.err
    # The bundle is a full first export: the bad receipts lowered nothing.
    run_cli(pair.b, "import", str(bundle))
