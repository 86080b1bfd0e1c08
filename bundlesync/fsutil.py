"""Safe file reads and atomic file writes.

Reading: a path given by a user or found on a drive may be a FIFO (an ``open`` that never
returns), a device such as ``/dev/zero`` (a read that never ends) or a symlink to one.
:func:`open_regular` and :func:`read_regular` only ever read a regular file: they ``stat``
first, open with ``O_NONBLOCK`` (so opening a FIFO cannot block), check again with
``fstat`` on the open descriptor (the path may have been swapped in between), and
:func:`read_regular` reads at most a given number of bytes. Every read of a user-given or
drive path goes through them.

Writing: a file appears complete at its final path, or not at all.

Every file bundlesync writes (bundles, certificate files, keys, ``config.yaml``) is
written as ``<name>.partial`` in the same directory, flushed and fsynced, renamed over
``<name>`` and then the directory is fsynced, so a crash or a pulled USB drive never
leaves half a file under the real name. A stale partial file from an interrupted run is
replaced. These functions raise plain :class:`OSError`; each caller turns it into its own
one-line error.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "PARTIAL_SUFFIX",
    "AtomicFile",
    "FileTooLargeError",
    "NotRegularFileError",
    "TargetExistsError",
    "atomic_write_bytes",
    "fsync_dir",
    "open_regular",
    "partial_path",
    "read_regular",
]

PARTIAL_SUFFIX = ".partial"
"""Suffix of a file that is still being written; it is renamed when complete."""

# Filesystems that cannot fsync a directory say so with one of these; nothing to do there.
_NO_DIR_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EBADF})


# --------------------------------------------------------------------------- reading


class NotRegularFileError(OSError):
    """The path is not a regular file (a directory, FIFO, device or socket): it is not read."""


class FileTooLargeError(OSError):
    """The file is larger than the caller's bound: it is not read."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder (directory)"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _not_regular(path: Path, mode: int) -> NotRegularFileError:
    return NotRegularFileError(errno.EINVAL, f"{_kind(mode)}, not a regular file", str(path))


def open_regular(path: Path) -> io.BufferedReader:
    """Open ``path`` for binary reading if, and only if, it is a regular file.

    Symlinks are followed, but the file they lead to must be regular too.

    Raises:
        NotRegularFileError: A folder, FIFO, device or socket (nothing was read).
        OSError: The file does not exist or cannot be opened.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode  # the path may have been replaced since the stat above
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path, limit: int) -> bytes:
    """The whole content of the regular file ``path``, which must be at most ``limit`` bytes.

    Raises:
        NotRegularFileError: ``path`` is not a regular file.
        FileTooLargeError: ``path`` holds more than ``limit`` bytes (at most ``limit + 1`` are read).
        OSError: The file does not exist or cannot be read.
    """
    with open_regular(path) as file:
        if os.fstat(file.fileno()).st_size > limit:
            raise FileTooLargeError(errno.EFBIG, f"larger than the {limit} byte limit", str(path))
        data = file.read(limit + 1)  # the file may grow after the fstat
    if len(data) > limit:
        raise FileTooLargeError(errno.EFBIG, f"larger than the {limit} byte limit", str(path))
    return data


# --------------------------------------------------------------------------- writing


def partial_path(path: Path) -> Path:
    """Where ``path`` is written until it is complete: ``<path>.partial``."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


class TargetExistsError(FileExistsError):
    """An exclusive :meth:`AtomicFile.publish` found the target already there."""


def fsync_dir(directory: Path, *, best_effort: bool = False) -> None:
    """Make a rename in ``directory`` durable (POSIX only: Windows cannot open a directory).

    Args:
        directory: The directory that holds the renamed file.
        best_effort: Ignore every failure instead of only "not supported by this filesystem".

    Raises:
        OSError: The directory cannot be opened or synced (unless ``best_effort``).
    """
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if not best_effort and exc.errno not in _NO_DIR_FSYNC:
            raise


class AtomicFile:
    """``<path>.partial``, open for writing, published over ``path`` by :meth:`publish`.

    Use :attr:`file` to write, then :meth:`sync` and :meth:`publish` (and
    :func:`fsync_dir`); on failure :meth:`discard`.

    Attributes:
        path: The final path.
        partial: The file being written.
        file: Its binary file object.
    """

    def __init__(self, path: Path, *, mode: int = 0o666) -> None:
        """Create ``<path>.partial`` (replacing a stale one) with ``mode``.

        The umask narrows ``mode`` as usual, except that a private mode (no group or other
        bits, e.g. 0o600 for keys) is set exactly.

        Raises:
            OSError: The file cannot be created.
        """
        self.path = path
        self.partial = partial_path(path)
        # A stale partial may carry wider permissions, which O_CREAT would keep.
        self.partial.unlink(missing_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        fd = os.open(self.partial, flags, mode)
        try:
            if os.name == "posix" and not mode & 0o077:
                os.fchmod(fd, mode)
            self.file: BinaryIO = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            self.partial.unlink(missing_ok=True)
            raise

    def sync(self) -> None:
        """Flush, fsync and close the partial file."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def publish(self, *, exclusive: bool = False) -> None:
        """Rename the synced partial file to :attr:`path`.

        Args:
            exclusive: Never replace an existing file: two processes racing to create
                the same file (a key) cannot silently replace each other's.

        Raises:
            TargetExistsError: ``exclusive`` and :attr:`path` exists.
            OSError: The rename failed.
        """
        if not exclusive:
            os.replace(self.partial, self.path)
            return
        try:
            os.link(self.partial, self.path)  # fails if the target exists
        except FileExistsError:
            raise TargetExistsError(errno.EEXIST, "file exists", str(self.path)) from None
        except OSError:
            # No hard links (FAT, some FUSE mounts): check, then rename; the window for a
            # race is tiny and only on such filesystems.
            if os.path.lexists(self.path):
                raise TargetExistsError(errno.EEXIST, "file exists", str(self.path)) from None
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink()

    def discard(self) -> None:
        """Close and remove the partial file; idempotent.

        Raises:
            OSError: The partial file exists but cannot be removed.
        """
        try:
            self.file.close()
        except OSError:
            pass  # the file is being thrown away; its flush error does not matter
        self.partial.unlink(missing_ok=True)


def atomic_write_bytes(
    path: Path, data: bytes, *, mode: int = 0o644, exclusive: bool = False
) -> None:
    """Write ``data`` to ``path`` atomically and durably (the directory must exist).

    Args:
        path: The final path.
        data: The whole content.
        mode: Permission bits of the new file (see :class:`AtomicFile`).
        exclusive: Refuse to replace an existing file (see :meth:`AtomicFile.publish`).

    Raises:
        TargetExistsError: ``exclusive`` and ``path`` exists; nothing was changed.
        OSError: The file cannot be written; no partial file is left behind.
    """
    out = AtomicFile(path, mode=mode)
    try:
        out.file.write(data)
        out.sync()
        out.publish(exclusive=exclusive)
    except BaseException:
        out.discard()
        raise
    fsync_dir(path.parent, best_effort=True)
