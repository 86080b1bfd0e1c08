"""Volumes: one bundle split into numbered files, each small enough for a FAT32 drive.

FAT32 cannot hold a file of 4 GiB or more, so a writer given a size limit cuts the
bundle's bytes into consecutive *volumes* named ``<name>.001-of-003``, ``<name>.002-of-003``…
(``<name>`` being the bundle's file name). Their concatenation, in order, is exactly the
one-file bundle: the digest and the signature cover it whole, so nothing about the
container changes. A bundle that fits in one volume keeps its plain name.

Readers name a volume set by any of its volumes; :func:`open_joined` opens the set as
one seekable file and refuses, with one line, a set that misses a volume.
"""

from __future__ import annotations

import bisect
import io
import os
import re
from pathlib import Path

from bundlesync.errors import FormatError
from bundlesync.fsutil import AtomicFile, open_regular, partial_path

__all__ = [
    "DEFAULT_MAX_SIZE",
    "JoinedFile",
    "VolumeSetWriter",
    "all_volume_paths",
    "base_name",
    "is_volume",
    "open_joined",
    "remove_bundle_files",
    "volume_name",
    "volume_paths",
]

DEFAULT_MAX_SIZE = 4000 << 20
"""Largest bundle file written by default: below FAT32's 4 GiB file limit, with room to spare."""

_VOLUME = re.compile(r"^(?P<base>.+)\.(?P<index>\d{3})-of-(?P<total>\d{3})$")
MAX_VOLUMES = 999


def volume_name(base: str, index: int, total: int) -> str:
    """``<base>.<index>-of-<total>``, both numbers three digits, counted from 1."""
    return f"{base}.{index:03d}-of-{total:03d}"


def is_volume(path: Path) -> bool:
    """Whether ``path`` is named as one volume of a set."""
    return _VOLUME.match(path.name) is not None


def base_name(path: Path) -> str:
    """The bundle's name without the volume suffix (the name itself for a one-file bundle)."""
    m = _VOLUME.match(path.name)
    return m["base"] if m else path.name


def volume_paths(path: Path) -> list[Path]:
    """Every volume of the set ``path`` belongs to, in order.

    Raises:
        FormatError: One of them is missing (one line naming it).
    """
    m = _VOLUME.match(path.name)
    if m is None:
        return [path]
    total = int(m["total"])
    paths = [path.with_name(volume_name(m["base"], i, total)) for i in range(1, total + 1)]
    for i, p in enumerate(paths, 1):
        if not p.is_file():
            raise FormatError(
                f"volume {i} of {total} of bundle {m['base']} is missing ({p.name} is not in {p.parent}): "
                "copy every volume of the bundle into the same folder"
            )
    return paths


def all_volume_paths(path: Path) -> list[Path]:
    """The files of the bundle ``path`` names, those that exist (no error for a missing volume)."""
    m = _VOLUME.match(path.name)
    if m is None:
        return [path]
    total = int(m["total"])
    return [p for i in range(1, total + 1) if (p := path.with_name(volume_name(m["base"], i, total))).exists()]


def remove_bundle_files(path: Path) -> None:
    """Delete a bundle: its one file, or every volume of its set."""
    for p in all_volume_paths(path):
        p.unlink(missing_ok=True)


class JoinedFile(io.RawIOBase):
    """Several files read as one, in order (read-only, seekable)."""

    def __init__(self, paths: list[Path]) -> None:
        super().__init__()
        self._files = []
        try:
            for p in paths:
                self._files.append(open_regular(p))  # closed in close(); only regular files are read
        except BaseException:
            self.close()
            raise
        self._starts = [0]
        for f in self._files:
            self._starts.append(self._starts[-1] + os.fstat(f.fileno()).st_size)
        self._pos = 0

    @property
    def size(self) -> int:
        """Total size of the joined files."""
        return self._starts[-1]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError(22, "negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: "memoryview | bytearray") -> int:  # type: ignore[override]
        if self._pos >= self.size or not len(buffer):
            return 0
        i = bisect.bisect_right(self._starts, self._pos) - 1
        f = self._files[i]
        f.seek(self._pos - self._starts[i])
        want = min(len(buffer), self._starts[i + 1] - self._pos)
        got = f.readinto(memoryview(buffer)[:want]) or 0
        self._pos += got
        return got

    def close(self) -> None:
        for f in getattr(self, "_files", []):
            f.close()
        super().close()


def open_joined(path: Path) -> io.BufferedReader:
    """Open a one-file bundle, or the whole volume set ``path`` belongs to, for reading.

    Raises:
        FormatError: A volume of the set is missing.
        OSError: A file cannot be opened.
    """
    if not is_volume(path):
        return open_regular(path)
    return io.BufferedReader(JoinedFile(volume_paths(path)), buffer_size=1 << 20)


class VolumeSetWriter:
    """Writes a bundle as volumes of at most ``max_bytes`` each; used like :class:`AtomicFile`.

    Every volume is written as ``*.partial`` and renamed only by :meth:`publish`, when the
    number of volumes is known (it is part of each name).
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.path, self.max_bytes = path, max_bytes
        self.partial = partial_path(path)
        self.volumes: list[AtomicFile] = [AtomicFile(path)]
        self._room = max_bytes
        self.file = self  # the writer is its own file object (write())

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        while len(view):
            if self._room == 0:
                if len(self.volumes) >= MAX_VOLUMES:
                    raise OSError(27, f"more than {MAX_VOLUMES} volumes: raise --max-size", str(self.path))
                self.volumes.append(AtomicFile(self.path.with_name(f"{self.path.name}.{len(self.volumes) + 1:03d}")))
                self._room = self.max_bytes
            n = min(self._room, len(view))
            self.volumes[-1].file.write(view[:n])
            self._room -= n
            view = view[n:]
        return len(data)

    def sync(self) -> None:
        """Flush, fsync and close every volume."""
        for volume in self.volumes:
            volume.sync()

    def publish(self, *, exclusive: bool = False) -> None:
        """Rename every volume to its final name (``<name>.<i>-of-<n>``, or ``<name>`` alone)."""
        total = len(self.volumes)
        if total > 1:
            for i, volume in enumerate(self.volumes, 1):
                volume.path = self.path.with_name(volume_name(self.path.name, i, total))
        for volume in self.volumes:
            volume.publish(exclusive=exclusive)
        if total > 1:
            self.path = self.volumes[0].path

    def discard(self) -> None:
        """Remove every volume written so far."""
        for volume in self.volumes:
            volume.discard()
