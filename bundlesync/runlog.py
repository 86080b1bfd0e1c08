"""The home's run log: one timestamped line per export and import, size-bounded.

Nobody watches a nightly cron run, so each export and import (and each failure of one)
appends a line to ``<home>/bundlesync.log``; ``bundlesync log`` prints it. The standard
library's :class:`~logging.handlers.RotatingFileHandler` keeps it bounded: at
:data:`MAX_BYTES` the file moves to ``bundlesync.log.1`` (older ones shift up to
:data:`BACKUPS`) and a new one starts, so the log never fills a small disk.
"""

from __future__ import annotations

import logging
import logging.handlers
import time
from pathlib import Path


__all__ = ["BACKUPS", "LOG_NAME", "MAX_BYTES", "append", "read"]

LOG_NAME = "bundlesync.log"
MAX_BYTES = 256 << 10
BACKUPS = 3


class _Handler(logging.handlers.RotatingFileHandler):
    """Records whether the write failed instead of printing logging's traceback."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging API
        self.failed = True


def _formatter() -> logging.Formatter:
    formatter = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime  # the log is read across time zones: UTC, marked Z
    return formatter


def append(home: Path, message: str, *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> bool:
    """Append ``<UTC time> <message>`` to the home's log; False if the log cannot be written.

    A log that cannot be written (read-only home, full disk) never fails the run it records;
    nothing is written into a folder that is not an initialised home.
    """
    from bundlesync.device import CONFIG_NAME  # here: `bundlesync --version` must not load the device machinery

    if not (home / CONFIG_NAME).is_file():
        return False
    record = logging.LogRecord("bundlesync", logging.INFO, __file__, 0, " ".join(message.split()), None, None)
    try:
        handler = _Handler(home / LOG_NAME, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True)
    except OSError:
        return False
    try:
        handler.setFormatter(_formatter())
        handler.emit(record)
    finally:
        handler.close()
    return not handler.failed


def read(home: Path, *, backups: int = BACKUPS) -> list[str]:
    """Every line still kept, oldest first (rotated files included)."""
    lines: list[str] = []
    for n in range(backups, -1, -1):
        path = home / (LOG_NAME if n == 0 else f"{LOG_NAME}.{n}")
        try:
            lines += path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            continue
    return lines
