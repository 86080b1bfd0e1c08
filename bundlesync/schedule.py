"""Nightly exports under cron: the crontab line, and installing it in the user's crontab.

The line runs the export the way an unattended run must: absolute paths (cron's PATH is
minimal and its working directory is the user's home), the device home spelled out,
``--quiet`` (cron mails any output, so a success must print nothing), ``--require-mount``
(an unplugged drive must not turn into a folder on the system disk). Each run leaves a line
in the home's run log (``bundlesync log``); a failure also prints one ``error:`` line,
which cron mails. A trailing marker comment names the facility and folder, so installing
again replaces the earlier line for the same pair instead of adding a second one.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from bundlesync.errors import ConfigError, EnvError

__all__ = ["cron_line", "install", "marker", "program"]

_EVERY = re.compile(r"^(\d+)([hm])$")


def program() -> list[str]:
    """The absolute command that runs this bundlesync."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "bundlesync" and argv0.exists():
        return [str(argv0.resolve())]
    beside = Path(sys.executable).parent / "bundlesync"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("bundlesync")
    if found:
        return [str(Path(found).resolve())]
    return [str(Path(sys.executable).absolute()), "-m", "bundlesync"]


def when(at: str | None, every: str | None) -> str:
    """The five crontab time fields for ``--at HH:MM`` or ``--every 6h`` / ``--every 30m``."""
    if (at is None) == (every is None):
        raise ConfigError("give exactly one of --at HH:MM or --every INTERVAL (e.g. 6h, 30m)")
    if at is not None:
        m = re.match(r"^(\d{1,2}):(\d{2})$", at)
        if not m or int(m[1]) > 23 or int(m[2]) > 59:
            raise ConfigError(f"--at {at!r} is not a time of day: use HH:MM, e.g. 02:00")
        return f"{int(m[2])} {int(m[1])} * * *"
    assert every is not None
    m = _EVERY.match(every.strip().lower())
    if m is None:
        raise ConfigError(f"--every {every!r} is not an interval: use hours or minutes, e.g. 6h or 30m")
    n, unit = int(m[1]), m[2]
    if unit == "h" and 1 <= n <= 23 and 24 % n == 0:
        return f"0 */{n} * * *" if n > 1 else "0 * * * *"
    if unit == "m" and 1 <= n <= 59 and 60 % n == 0:
        return f"*/{n} * * * *"
    raise ConfigError(f"--every {every!r}: cron runs evenly only every 1, 2, 3, 4, 6, 8 or 12 hours, or a divisor "
                      "of 60 minutes; pick one of those")


def marker(facility: str, out_dir: Path) -> str:
    """The comment that identifies the line for one facility and folder."""
    return f"# bundlesync-schedule facility={facility} out={out_dir}"


def cron_line(home: Path, facility: str, out_dir: Path, *, at: str | None = None, every: str | None = None) -> str:
    """The crontab line for a scheduled export (``%`` escaped: cron treats it as a newline)."""
    command = [*program(), "--home", str(home), "export", "--facility", facility, "--out", str(out_dir),
               "--require-mount", "--quiet"]
    text = " ".join(shlex.quote(part) for part in command).replace("%", "\\%")
    return f"{when(at, every)} {text} {marker(facility, out_dir)}"


def install(line: str, facility: str, out_dir: Path) -> str:
    """Put ``line`` into the user's crontab, replacing an earlier line for the same facility and folder.

    Returns the new table. Raises :class:`EnvError` when there is no working ``crontab``.
    """
    crontab = shutil.which("crontab")
    if crontab is None:
        raise EnvError("no `crontab` command on this machine: install cron, or add the printed line by hand")
    current = subprocess.run([crontab, "-l"], capture_output=True, text=True)
    # `crontab -l` fails with "no crontab for USER" when the table is empty: that is an empty table.
    old = current.stdout if current.returncode == 0 else ""
    tag = marker(facility, out_dir)
    kept = [row for row in old.splitlines() if not row.rstrip().endswith(tag)]
    table = "\n".join([*kept, line]) + "\n"
    done = subprocess.run([crontab, "-"], input=table, capture_output=True, text=True)
    if done.returncode != 0:
        reason = " ".join(done.stderr.split()) or f"exit {done.returncode}"
        raise EnvError(f"crontab refused the new table ({reason}): add the printed line by hand with `crontab -e`")
    return table
