"""The drive: mounted or refused, room checked, leftovers removed, FAT-safe names, volumes."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundlesync.errors import DriveError
from bundlesync.format.container import BundleWriter
from bundlesync.sync.drive import fat_safe
from conftest import ROOT, CliResult, Pair, dump_tables, run_cli


def _one_error_line(res: CliResult) -> str:
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.err, res.err
    return lines[0]


@contextlib.contextmanager
def tmpfs(where: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A real, tiny mounted filesystem (needs root: the test is skipped without it)."""
    where.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _export(pair: Pair, out: Path, *args: str, check: bool = True) -> CliResult:
    return run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(out), *args, check=check)


def test_require_mount_refuses_a_plain_folder(pair: Pair) -> None:
    res = _export(pair, pair.usb, "--require-mount", check=False)
    assert res.code == 8 and res.out == "", res
    line = _one_error_line(res)
    assert "not on a mounted drive" in line or "same filesystem" in line
    assert list(pair.usb.iterdir()) == []
    missing = _export(pair, pair.tmp / "media" / "usb", "--require-mount", check=False)
    assert missing.code == 8 and "not mounted" in _one_error_line(missing)
    # The refused runs did not consume the changes: a plain export still sends them all.
    assert Path(_export(pair, pair.usb).last_line).is_file()


def test_require_mount_accepts_a_mounted_drive(pair: Pair) -> None:
    drive = Path("/dev/shm")
    if not drive.is_dir() or drive.stat().st_dev == pair.tmp.stat().st_dev:
        pytest.skip("no separate filesystem at /dev/shm")
    out = drive / f"bundlesync-test-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    try:
        res = _export(pair, out, "--require-mount")
        assert Path(res.last_line).parent == out and Path(res.last_line).is_file()
    finally:
        shutil.rmtree(out)


def test_full_drive_is_refused_before_writing(pair: Pair) -> None:
    with tmpfs(pair.tmp / "stick", "96k") as stick:
        (stick / "filler").write_bytes(b"\0" * (40 << 10))
        res = _export(pair, stick, "--require-mount", check=False)
        left = sorted(p.name for p in stick.iterdir())
    assert res.code == 8 and res.out == "", res
    assert "free" in _one_error_line(res)
    assert left == ["filler"]  # no bundle, no partial file


def test_a_write_protected_drive_fails_the_export_with_exit_7(pair: Pair) -> None:
    """A stick whose write-protect switch is on (a read-only mount): the write itself fails, so the
    export could not complete (exit 7); the line says to check the drive, nothing changes at home."""
    def exports() -> int:
        with contextlib.closing(sqlite3.connect(pair.a_db)) as conn:
            return int(conn.execute("SELECT count(*) FROM bundlesync_transfers WHERE direction = 'export'")
                       .fetchone()[0])

    before, recorded = dump_tables(pair.a_db), exports()
    with tmpfs(pair.tmp / "locked", "1m", read_only=True) as stick:
        res = _export(pair, stick, "--require-mount", check=False)
        line = _one_error_line(res)
        assert res.code == 7, res.err
        assert "Read-only file system" in line and "writable" in line
        assert list(stick.iterdir()) == []
    assert dump_tables(pair.a_db) == before and exports() == recorded  # no export is recorded as sent


def test_drive_filling_up_while_writing_is_a_drive_error(tmp_path: Path) -> None:
    """The write itself fails (ENOSPC on a tiny tmpfs): one DriveError, nothing left behind."""
    with tmpfs(tmp_path / "stick", "64k") as stick:
        writer = BundleWriter(stick, "b.bsync", {"kind": "test"}, lambda d: b"\0" * 64, level=1)
        with pytest.raises(DriveError, match="drive is full"):
            writer.write_records(os.urandom(300).hex().encode() + b"\n" for _ in range(2000))
            writer.finish({})
        assert list(stick.iterdir()) == []


def test_file_size_limit_is_a_drive_error(tmp_path: Path) -> None:
    """RLIMIT_FSIZE stands in for FAT32's file size limit (EFBIG): the message points at --max-size."""
    script = (
        "import os, sys, resource\n"
        "from pathlib import Path\n"
        "from bundlesync.errors import DriveError\n"
        "from bundlesync.format.container import BundleWriter\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (32768, 32768))\n"
        "w = BundleWriter(Path(sys.argv[1]), 'b.bsync', {'kind': 'test'}, lambda d: b'0' * 64, level=1)\n"
        "try:\n"
        "    w.write_records(os.urandom(300).hex().encode() + b'\\n' for _ in range(2000))\n"
        "    w.finish({})\n"
        "except DriveError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--max-size" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_stale_partials_of_this_device_are_removed(pair: Pair) -> None:
    first = Path(_export(pair, pair.usb).last_line)
    ds8, me8 = first.name.split("-")[1:3]
    mine = pair.usb / f"bundle-{ds8}-{me8}-000009-deadbeef.bsync.partial"
    mine_volume = pair.usb / f"bundle-{ds8}-{me8}-000009-deadbeef.bsync.002.partial"
    other = pair.usb / f"bundle-{ds8}-ffffffff-000009-deadbeef.bsync.partial"
    for p in (mine, mine_volume, other):
        p.write_bytes(b"half a bundle")
    conn = sqlite3.connect(pair.a_db)
    conn.execute("UPDATE kolibriauth_facilityuser SET full_name = 'changed' WHERE rowid = 1")
    conn.commit()
    conn.close()
    _export(pair, pair.usb)
    assert not mine.exists() and not mine_volume.exists()
    assert other.exists()  # another device's run may still be writing it


def test_volumes_import_as_one_and_a_missing_one_is_refused(pair: Pair) -> None:
    res = _export(pair, pair.usb, "--max-size", "8K")
    first = Path(res.last_line)
    volumes = sorted(pair.usb.glob("bundle-*"))
    assert len(volumes) >= 3 and first == volumes[0]
    total = len(volumes)
    assert [re.sub(r"^.*\.bsync\.", "", v.name) for v in volumes] == [f"{i:03d}-of-{total:03d}"
                                                                     for i in range(1, total + 1)]
    assert all(v.stat().st_size <= 8192 for v in volumes)
    # One volume missing: one line naming it, nothing applied.
    hidden = volumes[1].rename(pair.tmp / volumes[1].name)
    before = dump_tables(pair.b_db)
    res = run_cli(pair.b, "import", str(first), check=False)
    assert res.code == 4 and f"volume 2 of {total}" in _one_error_line(res) and "missing" in res.err
    assert dump_tables(pair.b_db) == before
    hidden.rename(volumes[1])
    # Any volume names the set; the receiver ends up with the sender's rows.
    run_cli(pair.b, "import", str(volumes[-1]))
    assert dump_tables(pair.b_db) == dump_tables(pair.a_db)
    assert run_cli(pair.b, "verify", str(volumes[0])).code == 0


def test_every_name_on_the_drive_is_fat_safe(pair: Pair) -> None:
    bundle = _export(pair, pair.usb, "--max-size", "8K").last_line
    run_cli(pair.b, "import", bundle)
    conn = sqlite3.connect(pair.a_db)
    conn.execute("UPDATE kolibriauth_facilityuser SET full_name = 'again' WHERE rowid = 2")
    conn.commit()
    conn.close()
    _export(pair, pair.usb)
    names = [p.name for p in pair.usb.iterdir()]
    assert any(n.startswith("receipt-") for n in names) and len(names) >= 4
    assert all(fat_safe(n) and n.isascii() for n in names), names
    assert not fat_safe("a:b") and not fat_safe("x" * 256) and not fat_safe("trailing.")


def test_max_size_must_be_a_size(pair: Pair) -> None:
    res = _export(pair, pair.usb, "--max-size", "lots", check=False)
    assert res.code == 2 and "--max-size" in _one_error_line(res)

