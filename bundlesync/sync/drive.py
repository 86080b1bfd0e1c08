"""The drive an export writes to: is it really mounted, is there room, what is left over.

Cron runs an export whether or not the USB drive is plugged in. An unmounted
mountpoint is an ordinary empty folder on the system disk, so writing there "works"
and the bundle never travels. :func:`require_mount` refuses such a folder: it must lie
on a mounted filesystem that is neither the system's root filesystem nor the home's.
:func:`check_free` refuses to start a bundle that will not fit, :func:`remove_stale_partials`
clears what a killed run left, and :func:`fat_safe` keeps file names valid on FAT32/exFAT.

It also reads what a drive holds (:func:`survey`, ``bundlesync drive``): bundles, receipts,
which bundles every known reader already holds, which a newer bundle of the same sender
carries, and removes those (:func:`clean`).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bundlesync.errors import BundlesyncError, DriveError, SyncError
from bundlesync.format import container
from bundlesync.format.manifest import Manifest
from bundlesync.format.volumes import all_volume_paths, base_name, remove_bundle_files
from bundlesync.fsutil import PARTIAL_SUFFIX
from bundlesync.profile import Profile
from bundlesync.trust.keystore import KeyStore
from bundlesync.trust.receipts import Receipt, read_receipt

__all__ = [
    "DriveBundle",
    "DriveReport",
    "check_free",
    "clean",
    "covers",
    "fat_safe",
    "holds",
    "list_bundles",
    "mount_root",
    "own_bundles",
    "remove_stale_partials",
    "require_fat_safe",
    "require_mount",
    "superseded",
    "survey",
]

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


# --------------------------------------------------------------------------- what is on a drive


def covers(basis: Mapping[str, int], result: Mapping[str, int], other_basis: Mapping[str, int],
           other_result: Mapping[str, int]) -> bool:
    """Whether a bundle (``basis`` → ``result``) carries everything another (``other_*``) carries.

    It must start no later for every writer and end no earlier: each writer's versions in
    ``(other_basis, other_result]`` lie in ``(basis, result]`` (a version the other carried and
    that was overwritten since is dominated by the newer one it carries instead).
    """
    starts = all(basis.get(inst, 0) <= other_basis.get(inst, 0) for inst in set(basis) | set(other_basis))
    ends = all(result.get(inst, 0) >= ctr for inst, ctr in other_result.items())
    return starts and ends


def holds(fsic: Mapping[str, int], result: Mapping[str, int]) -> bool:
    """Whether a reader holding ``fsic`` already has everything up to ``result``."""
    return all(fsic.get(inst, 0) >= ctr for inst, ctr in result.items())


@dataclass
class DriveBundle:
    """One bundle on a drive (a one-file bundle or a volume set), from its manifest and summary."""

    path: Path
    files: list[Path]
    size: int
    manifest: Manifest | None
    records: int
    complete: bool
    problem: str = ""

    @property
    def name(self) -> str:
        return base_name(self.path)


def list_bundles(folder: Path) -> list[DriveBundle]:
    """Every bundle in ``folder`` (volume sets once), oldest counter first; unreadable ones say why."""
    seen: set[str] = set()
    found: list[DriveBundle] = []
    for path in sorted(folder.glob("bundle-*")):
        if path.name.endswith(PARTIAL_SUFFIX) or not path.is_file():
            continue
        name = base_name(path)
        if name in seen:
            continue
        seen.add(name)
        files = all_volume_paths(path)
        size = sum(p.stat().st_size for p in files)
        try:
            info = container.read_info(files[0])
            manifest = Manifest.from_dict(info.manifest)
            records = int(str(info.summary.get("records", 0)))
        except BundlesyncError as exc:
            found.append(DriveBundle(files[0], files, size, None, 0, False, str(exc)))
            continue
        found.append(DriveBundle(files[0], files, size, manifest, records, True))
    return sorted(found, key=lambda b: (b.manifest.sender_counter if b.manifest else -1, b.name))


def own_bundles(folder: Path, dataset_id: str, instance_id: str, prefixes: Sequence[str]) -> list[DriveBundle]:
    """This device's complete bundles for exactly this filter."""
    return [
        b for b in list_bundles(folder)
        if b.manifest is not None and b.manifest.dataset_id == dataset_id
        and b.manifest.sender_instance == instance_id and tuple(b.manifest.filter) == tuple(prefixes)
    ]


def superseded(bundles: Sequence[DriveBundle]) -> dict[str, str]:
    """Bundles whose content another bundle of the same sender and filter carries: name -> by whom."""
    out: dict[str, str] = {}
    for old in bundles:
        for new in bundles:
            a, b = old.manifest, new.manifest
            if new is old or a is None or b is None or out.get(new.name) == old.name:
                continue
            if (a.dataset_id, a.sender_instance, tuple(a.filter)) != (b.dataset_id, b.sender_instance, tuple(b.filter)):
                continue
            if covers(b.basis_fsic, b.result_fsic, a.basis_fsic, a.result_fsic) and (
                not covers(a.basis_fsic, a.result_fsic, b.basis_fsic, b.result_fsic) or a.sender_counter < b.sender_counter
                or (a.sender_counter == b.sender_counter and old.name < new.name)
            ):
                out[old.name] = new.name
                break
    return out


@dataclass
class DriveReport:
    """What a drive holds and who needs what."""

    bundles: list[DriveBundle]
    receipts: list[Receipt]
    bad_receipts: list[str]
    held_by: dict[str, list[str]] = field(default_factory=dict)
    superseded_by: dict[str, str] = field(default_factory=dict)
    stale_partials: list[Path] = field(default_factory=list)

    def unneeded(self) -> dict[str, str]:
        """Bundles nobody needs, and why: every known reader holds them, or a newer one carries them."""
        why: dict[str, str] = {}
        for b in self.bundles:
            if b.manifest is None:
                continue
            readers = [r for r in self.receipts
                       if r.dataset_id == b.manifest.dataset_id and r.instance_id != b.manifest.sender_instance]
            if readers and len(self.held_by.get(b.name, [])) == len(readers):
                why[b.name] = "every known reader holds it: " + ", ".join(sorted(r.instance_id[:8] for r in readers))
            elif b.name in self.superseded_by:
                why[b.name] = f"superseded by {self.superseded_by[b.name]}"
        return why


STALE_PARTIAL_S = 600.0
"""A ``*.partial`` file untouched this long belongs to a run that died."""


def survey(folder: Path, keys: KeyStore, profile: Profile) -> DriveReport:
    """Read a drive: bundles, receipts (verified against the roots ``keys`` trusts), who holds what."""
    if not folder.is_dir():
        raise DriveError(f"{folder} does not exist or is not a folder: is the drive mounted?")
    bundles = list_bundles(folder)
    receipts: list[Receipt] = []
    bad: list[str] = []
    for path in sorted(folder.glob("receipt-*.json")):
        try:
            receipts.append(read_receipt(path, keys, profile))
        except BundlesyncError as exc:
            bad.append(f"{path.name}: {exc}")
    report = DriveReport(bundles, receipts, bad)
    for b in bundles:
        if b.manifest is not None:
            report.held_by[b.name] = sorted(
                r.instance_id for r in receipts
                if r.dataset_id == b.manifest.dataset_id and r.instance_id != b.manifest.sender_instance
                and holds(r.fsic, b.manifest.result_fsic)
            )
    report.superseded_by = superseded(bundles)
    now = time.time()
    report.stale_partials = [p for p in sorted(folder.glob(f"*{PARTIAL_SUFFIX}"))
                             if now - p.stat().st_mtime > STALE_PARTIAL_S]
    return report


def clean(folder: Path, keys: KeyStore, profile: Profile) -> tuple[DriveReport, list[str]]:
    """Remove the bundles nobody needs and stale partial files; returns what was removed."""
    report = survey(folder, keys, profile)
    removed: list[str] = []
    for b in report.bundles:
        if b.name in report.unneeded():
            remove_bundle_files(b.path)
            removed.append(b.name)
    for p in report.stale_partials:
        p.unlink(missing_ok=True)
        removed.append(p.name)
    return report, removed
