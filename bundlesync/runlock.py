"""One run at a time per home: an advisory lock on ``<home>/bundlesync.lock``.

Cron starts an export every night whether or not last night's is still running, and a
person may run an import by hand at the same moment. Two runs on one home would read
the same basis and write the same bundle twice, or interleave their transactions, so
every command that changes the home or its database holds this lock for its whole run.
A second run waits up to ``wait`` seconds, then stops with :class:`BusyError`.

The lock is ``flock(2)`` on a file that is never deleted: the kernel releases it when the
holder exits, even after ``kill -9``, so a crashed run never leaves the home locked.
While held, the file names the holder (pid, command, start time) for the busy message.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Iterator
from pathlib import Path

from bundlesync.errors import BusyError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: runs are not serialised there
    fcntl = None  # type: ignore[assignment]

__all__ = ["DEFAULT_WAIT_S", "LOCK_NAME", "home_lock"]

LOCK_NAME = "bundlesync.lock"
DEFAULT_WAIT_S = 5.0
"""How long a run waits for another run on the same home (``--wait``)."""

_POLL_S = 0.05


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return f" ({text})" if text else ""


@contextlib.contextmanager
def home_lock(home: Path, *, wait: float = DEFAULT_WAIT_S, what: str = "bundlesync") -> Iterator[None]:
    """Hold the home's run lock for the ``with`` block.

    A home that is not initialised is not locked, nor is anything created in it (the
    command itself reports it).

    Raises:
        BusyError: Another run held the lock for more than ``wait`` seconds.
    """
    from bundlesync.device import CONFIG_NAME  # here: `bundlesync --version` must not load the device machinery

    if fcntl is None or not (home / CONFIG_NAME).is_file():
        yield
        return
    path = home / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BusyError(
                        f"another bundlesync run{_holder(fd)} is using home {home}; waited {wait:g} s: "
                        "try again when it has finished, or pass --wait SECONDS"
                    ) from None
                time.sleep(_POLL_S)
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {what}, since {started}\n".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
