"""Clocks that are wrong: how far ahead of this device's clock a version or a bundle may be.

A device whose clock ran ahead stamps versions in the future. Because a later edit is always
stamped above the version it replaces, those future clocks live on in every version that
follows (the merge stays correct: see ``docs/sync-model.md``, "Clocks"). bundlesync says so
when it meets them: at import (records or a bundle created more than :data:`SKEW_TOLERANCE_MS`
ahead of this device's clock) and in ``status`` (versions in the store that far ahead).
"""

from __future__ import annotations

import datetime
import time
from typing import Final

__all__ = ["SKEW_TOLERANCE_MS", "ahead_hlc", "iso_ms", "now_ms", "parse_iso_ms", "skew_warning"]

SKEW_TOLERANCE_MS: Final = 24 * 3600 * 1000
"""A clock up to a day ahead is ordinary drift or a time zone set wrong; beyond is reported."""


def now_ms() -> int:
    """This device's clock, in ms since 1970."""
    return time.time_ns() // 1_000_000


def ahead_hlc(now: int | None = None) -> int:
    """Versions with an ``hlc`` above this are far ahead of this device's clock."""
    return ((now if now is not None else now_ms()) + SKEW_TOLERANCE_MS) << 16


def iso_ms(ms: int) -> str:
    """A time in ms as an ISO date and time (UTC), for messages."""
    try:
        return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    except (OverflowError, ValueError, OSError):
        return f"{ms} ms after 1970"


def parse_iso_ms(text: str) -> int | None:
    """A manifest or receipt time (``2026-12-02T15:52:48.123456Z``) in ms, or None if it is not one."""
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp() * 1000)


def skew_warning(records: int, max_hlc: int, where: str) -> str:
    """One line about ``records`` versions whose clocks run up to ``max_hlc``, far ahead of this device."""
    days = max(1, ((max_hlc >> 16) - now_ms()) // (24 * 3600 * 1000))
    return (f"warning: {records} record(s) {where} carry clocks up to {iso_ms(max_hlc >> 16)} UTC, {days} day(s) "
            "ahead of this device's clock: a device's clock is or was wrong; set it right (if it is this one, "
            "fix it before editing); edits made afterwards on correct clocks still win over older ones "
            "(docs/sync-model.md, Clocks)")
