"""Atomic file writes: a file appears complete at its final path, or not at all.

Every file bundlesync writes (bundles, certificate files, keys, ``config.yaml``) is
written as ``<name>.partial`` in the same directory, flushed and fsynced, renamed over
``<name>`` and then the directory is fsynced, so a crash or a pulled USB drive never
leaves half a file under the real name. A stale partial file from an interrupted run is
replaced. These functions raise plain :class:`OSError`; each caller turns it into its own
one-line error.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "PARTIAL_SUFFIX",
    "AtomicFile",
    "TargetExistsError",
    "atomic_write_bytes",
    "fsync_dir",
    "partial_path",
]

PARTIAL_SUFFIX = ".partial"
"""Suffix of a file that is still being written; it is renamed when complete."""

# Filesystems that cannot fsync a directory say so with one of these; nothing to do there.
_NO_DIR_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EBADF})


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
