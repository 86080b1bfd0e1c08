"""The drive an export writes to: is it really mounted, is there room, what is left over.

Cron runs an export whether or not the USB drive is plugged in. An unmounted
mountpoint is an ordinary empty folder on the system disk, so writing there "works"
and the bundle never travels. :func:`require_mount` refuses such a folder: it must lie
on a mounted filesystem that is neither the system's root filesystem nor the home's.
:func:`check_free` refuses to start a bundle that will not fit, :func:`remove_stale_partials`
clears what a killed run left, and :func:`fat_safe` keeps file names valid on FAT32/exFAT.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from bundlesync.errors import DriveError, SyncError
from bundlesync.fsutil import PARTIAL_SUFFIX

__all__ = ["check_free", "fat_safe", "mount_root", "remove_stale_partials", "require_fat_safe", "require_mount"]

MAX_NAME = 255
"""Longest file name FAT32 (long names) and exFAT accept, in UTF-16 units."""

_FAT_FORBIDDEN = re.compile(r'[\x00-\x1f"*/:<>?\\|]')

FREE_MARGIN = 256 << 10
"""Room kept free besides the bundle itself (receipts, the file system's own needs)."""


def fat_safe(name: str) -> bool:
    """Whether ``name`` is a valid file name on FAT32 and exFAT drives."""
    return (
        0 < len(name.encode("utf-16-le")) // 2 <= MAX_NAME
        and not _FAT_FORBIDDEN.search(name)
        and not name.endswith((" ", "."))
    )


def require_fat_safe(name: str) -> str:
    """``name`` itself, or :class:`SyncError` if a FAT32/exFAT drive could not hold it."""
    if not fat_safe(name):
        raise SyncError(f"file name {name!r} is not valid on FAT32/exFAT drives; report this as a bug")
    return name


def mount_root(path: Path) -> Path:
    """The mount point of the filesystem ``path`` lies on (walks up while the device stays the same)."""
    path = path.resolve()
    dev = path.stat().st_dev
    while path.parent != path and path.parent.stat().st_dev == dev:
        path = path.parent
    return path


def require_mount(folder: Path, home: Path) -> None:
    """Refuse ``folder`` unless it lies on a mounted drive other than the system disk and the home's.

    Raises:
        DriveError: The folder is missing, or it is on the root filesystem or on the home's.
    """
    if not folder.is_dir():
        raise DriveError(f"output folder {folder} does not exist: the drive is not mounted; plug it in "
                         "(and mount it) and run again")
    root = mount_root(folder)
    if root.parent == root:
        raise DriveError(f"output folder {folder} is on the system disk, not on a mounted drive (the drive is "
                         "probably not mounted): plug the drive in and mount it there")
    if folder.resolve().stat().st_dev == home.resolve().stat().st_dev:
        raise DriveError(f"output folder {folder} is on the same filesystem as the home {home}, not on a "
                         "separate drive: mount the drive there, or export without --require-mount")


def check_free(folder: Path, needed: int) -> int:
    """Refuse to start writing ``needed`` bytes into ``folder`` unless they fit; returns the free bytes.

    Raises:
        DriveError: Not enough free space.
    """
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise DriveError(f"cannot read the free space of {folder}: {exc.strerror or exc}: check the drive") from exc
    if free < needed + FREE_MARGIN:
        raise DriveError(f"the drive at {folder} has {_mb(free)} free, the bundle needs about {_mb(needed)}: "
                         "free space on it or use another drive; nothing was written")
    return free


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def remove_stale_partials(folder: Path, prefix: str) -> list[Path]:
    """Remove ``<prefix>*.partial`` files (left by a killed run of this device); returns them.

    Only this device's own names are touched: another device may be writing its own.
    """
    removed = []
    for path in folder.glob(f"{prefix}*{PARTIAL_SUFFIX}"):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise DriveError(f"cannot remove the unfinished file {path} of an earlier run: "
                             f"{exc.strerror or exc}: delete it by hand") from exc
        removed.append(path)
    if removed:
        try:
            fd = os.open(folder, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError:
            pass  # best effort: the files are gone either way
    return removed
