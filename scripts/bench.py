#!/usr/bin/env python3
"""Benchmark bundlesync's export, import, start-up, memory, store and bundle size (a benchmark, not a test).

``bench.py [--logs N | --sizes N1,N2,...] [--runs R] [--users U] [--seed S] [--changes C]
[--settle S] [--workdir DIR] [--skip-zstd] [--skip-live] [--profile DIR] [--json]``

For each size it writes a fixture facility (``scripts/make_facility_db.py``) and sets up
two devices the way the CLI does (A: the facility's authority; B: an empty device with a
full-scope certificate issued by A). Every timed step then runs as its own ``bundlesync``
process (``python -m bundlesync``, start-up included; a small launcher times it from its start
to its exit), ``--runs`` times (default 3), each run from a copy of the same starting state;
the table shows the median wall time, the CPU seconds (user + system) per 100k records and the
largest peak RSS of the runs:

1. the first export after ``init`` (every row serialized, then the bundle written and read back);
2. its import into the empty device B;
3. encryption cost (in this process: export --full with and without encryption, best of 2);
4. a full export after 10% of the records changed, imported into B as it was after step 2
   (a device that holds 90% of the bundle);
5. after a ``--settle`` pause (the CPU recovers from the long steps, as on a device cron wakes),
   ``--changes`` plain-SQL edits, ``bundlesync export`` (basis: B's receipt) and ``bundlesync
   import``;
6. start-up: ``bundlesync --version`` and an import of a bundle already imported (bundlesync's
   modules are compiled to bytecode first, as an installed package has them);
7. unless ``--skip-live``, the same first export and import run by the CLI on a third
   copy of the devices while an app writer (``scripts/app_writer.py``: small
   transactions, Python's default 5 s busy timeout) writes to the database being synced,
   in rollback-journal mode: the longest any app transaction waited, and how many failed;
8. unless ``--skip-zstd``, the bundle's size against ``zstd -19 -T1`` over the same record lines.

The store-size rows compare the app database after ``init`` and the full sync with the
fixture before ``init``. With two sizes or more, a last table compares peak memory of the
largest size with the smallest (memory must not grow with the data). ``--profile DIR``
adds one export and one import in this process under cProfile (``DIR/*.prof``).
Targets marked "at 1M" are defined for 1,000,000 records; the smaller sizes show the same
threshold for comparison.

Progress goes to stderr; the tables (or, with ``--json``, one JSON document) to stdout.
Exit status: 0 done (whether or not targets are met), 1 a step failed, 2 bad options.
"""

from __future__ import annotations

import argparse
import compileall
import cProfile
import gc
import json
import os
import platform
import pstats
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "fixtures" / "facility_profile.yaml"
FIXTURE_SCRIPT = ROOT / "scripts" / "make_facility_db.py"
APP_WRITER = ROOT / "scripts" / "app_writer.py"
CHANGED_TABLE = "logger_attemptlog"
CHANGED_COLUMN = "time_spent"

try:
    from bundlesync.format import container
    from bundlesync.device import Device, init_device
    from bundlesync.trust.authority import issue_grant, provision_facility
    from bundlesync.trust.enrolment import install_grant, request_certificate
    from bundlesync.trust.keystore import KeyStore
    from bundlesync.errors import BundlesyncError
    from bundlesync.sync.exporter import export_bundle
    from bundlesync.sync.importer import import_bundle
    from bundlesync.replica.store import pending_changes
except ImportError as _exc:  # pragma: no cover - set-up problem, not a bench result
    if isinstance(_exc, ModuleNotFoundError) and (_exc.name or "").split(".")[0] == "bundlesync":
        print("error: bundlesync is not installed in this Python; run with the project's venv: "
              ".venv/bin/python scripts/bench.py", file=sys.stderr)
    else:
        print(f"error: bundlesync cannot be imported ({_exc}); the package itself is broken or "
              "half-edited: fix it (or wait for the edit to finish) and run again", file=sys.stderr)
    sys.exit(2)

_T = TypeVar("_T")


class BenchError(Exception):
    """A benchmark step failed; the message says which and why."""


# --------------------------------------------------------------------------- results


@dataclass
class Metric:
    key: str
    label: str
    value: float | int | None
    unit: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""

    def shown(self) -> str:
        v = self.value
        if v is None:
            text = "n/a"
        elif self.unit == "s":
            text = f"{v:.3f} s"
        elif self.unit == "records/s":
            text = f"{v:,.0f} rec/s"
        elif self.unit == "MB":
            text = f"{v:,.1f} MB"
        elif self.unit == "x":
            text = f"{v:.3f}x"
        elif self.unit == "bytes":
            text = f"{int(v):,} B"
        elif self.unit == "bytes/record":
            text = f"{v:.1f} B/rec"
        elif isinstance(v, int):
            text = f"{v:,}" + (f" {self.unit}" if self.unit else "")
        else:
            text = f"{v:,.3f}" + (f" {self.unit}" if self.unit else "")
        return text

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "metric": self.label, "value": self.value, "unit": self.unit,
                "target": self.target or None, "met": self.met, "note": self.note or None}


@dataclass
class Run:
    logs: int
    users: int
    seed: int
    workdir: str
    metrics: list[Metric] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    done: bool = False

    def add(self, key: str, label: str, value: float | None, unit: str = "", *,
            target: tuple[str, float] | None = None, note: str = "") -> Metric:
        target_text, met = "", None
        if target is not None:
            op, limit = target
            shown_limit = f"{limit:,.0f}" if limit >= 1000 else f"{limit:g}"
            suffix = {"records/s": " rec/s", "s": " s", "ms": " ms", "MB": " MB", "x": "x"}.get(unit, "")
            target_text = f"{op} {shown_limit}{suffix}"
            if value is not None:
                met = {">=": value >= limit, "<": value < limit, "<=": value <= limit}[op]
        metric = Metric(key, label, value, unit, target_text, met, note)
        self.metrics.append(metric)
        say(f"    {label.strip()}: {metric.shown()}")  # a run killed later still leaves its numbers
        return metric

    def value(self, key: str) -> float | int | None:
        for m in self.metrics:
            if m.key == key:
                return m.value
        return None


def render_table(run: Run, title: str) -> str:
    headers = ("metric", "value", "target", "met?")
    rows = [(m.label, m.shown(), m.target + (f" ({m.note})" if m.note else ""),
             "" if m.met is None else ("yes" if m.met else "NO")) for m in run.metrics]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join((c.ljust(w) if i != 1 else c.rjust(w)) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [title, line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out += [f"note: {n}" for n in run.notes]
    return "\n".join(out)


# --------------------------------------------------------------------------- helpers


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], _T]) -> tuple[_T, float]:
    gc.collect()
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


@contextmanager
def profiled(profile_dir: Path | None, name: str) -> Iterator[None]:
    """Run the block under cProfile when ``--profile`` is given; dump and print the top."""
    if profile_dir is None:
        yield
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        out = profile_dir / f"{name}.prof"
        prof.dump_stats(str(out))
        say(f"profile of {name} written to {out}; top 25 by cumulative time:")
        stats = pstats.Stats(prof, stream=sys.stderr)
        stats.sort_stats("cumulative").print_stats(25)


def make_fixture(path: Path, *, users: int, logs: int, seed: int, schema_only: bool = False) -> str:
    args = [sys.executable, str(FIXTURE_SCRIPT), str(path)]
    args += ["--schema-only"] if schema_only else ["--users", str(users), "--logs", str(logs), "--seed", str(seed)]
    proc = subprocess.run(args, check=False, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise BenchError(f"fixture {path.name} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip()


def setup_pair(base: Path, a_db: Path, b_db: Path, facility: str) -> tuple[Path, Path, float, int]:
    """The CLI's set-up, in-process: init A, provision A, init B, request/issue/install.

    Returns (home A, home B, seconds of A's init, rows A's init queued).
    """
    home_a, home_b, usb = base / "devA", base / "devB", base / "usb"
    usb.mkdir(parents=True, exist_ok=True)
    gc.collect()
    start = time.perf_counter()
    init_device(home_a, a_db, PROFILE)
    init_s = time.perf_counter() - start
    with Device.open(home_a) as dev:
        queued = pending_changes(dev.conn)
        dataset_id, fac = dev.resolve_facility(facility)
        provision_facility(dev.keys, dataset_id=dataset_id, facility_id=fac, profile=dev.profile.name,
                           instance_id=dev.instance_id)
    init_device(home_b, b_db, PROFILE)
    with Device.open(home_b) as dev:
        try:
            dataset_id, fac = dev.resolve_facility(facility)
        except BundlesyncError:
            dataset_id, fac = "", facility  # as the CLI: a fresh device does not know the facility
        request = request_certificate(dev.keys, dataset_id=dataset_id, facility_id=fac, profile=dev.profile.name,
                                      scope="full", instance_id=dev.instance_id, out_dir=usb)
    with Device.open(home_a) as dev:
        grant = issue_grant(dev.keys, request, usb)
    with Device.open(home_b) as dev:
        install_grant(dev.keys, grant)
    return home_a, home_b, init_s, queued


def change_rows(db_path: Path, count: int) -> int:
    """Plain SQL, as any app would: UPDATE one column of ``count`` logger rows; returns rows changed."""
    conn = sqlite3.connect(str(db_path), timeout=30)
    try:
        with conn:
            cur = conn.execute(
                f"UPDATE {CHANGED_TABLE} SET {CHANGED_COLUMN} = {CHANGED_COLUMN} + 1.0 WHERE rowid IN "
                f"(SELECT rowid FROM {CHANGED_TABLE} ORDER BY id LIMIT ?)",
                (count,),
            )
            return cur.rowcount
    finally:
        conn.close()


@dataclass
class Measured:
    code: int
    out: str
    err: str
    wall: float
    maxrss_mb: float
    cpu: float


# A child's ru_maxrss starts from the memory of the process it was forked from (Linux keeps
# the old image's high-water mark across exec). Forked straight from this big benchmark
# process, every child would report at least this process's peak. So each command runs
# under a small launcher; the launcher forks the command and reads its rusage with wait4.
_LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump({"maxrss": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime, "wall": wall}, f)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_measured(args: Sequence[str], env: dict[str, str]) -> Measured:
    """Run one command and return its own wall time, CPU time and peak RSS (not the launcher's, not other children's)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        report = Path(tmp) / "rusage.json"
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(report), *args],
                                stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True)
        try:
            code = proc.wait()
        except BaseException:
            # Its own process group: stop the launcher and the command it runs, nothing else.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        try:
            usage = json.loads(report.read_text())
            maxrss, cpu = usage["maxrss"], float(usage["cpu"])
            # The command's own wall time, from its start to its exit, without the launcher's start-up.
            wall = float(usage["wall"])
        except (OSError, ValueError, KeyError) as exc:
            raise BenchError(f"could not read the measurements of {' '.join(args)} ({exc}); stderr: {stderr.strip()}") from exc
        # ru_maxrss is KiB on Linux, bytes on macOS.
        scale = 1 / (1 << 20) if sys.platform == "darwin" else 1 / 1024
        return Measured(code, stdout, stderr, wall, maxrss * scale, cpu)


def cli(home: Path, *args: str) -> Measured:
    env = {k: v for k, v in os.environ.items() if k != "BUNDLESYNC_HOME"}
    env["BUNDLESYNC_HOME"] = str(home)
    result = run_measured([sys.executable, "-m", "bundlesync", *args], env)
    if result.code != 0:
        raise BenchError(f"`bundlesync {' '.join(args)}` failed ({result.code}): {result.err.strip()}")
    return result


@contextmanager
def app_writing(db: Path, work: Path, tag: str) -> Iterator[dict[str, Any]]:
    """Run scripts/app_writer.py on ``db`` for the ``with`` block; the dict it yields gets its report."""
    conn = sqlite3.connect(str(db))
    try:
        dataset = conn.execute("SELECT id FROM kolibriauth_facilitydataset").fetchone()
        ids = [r[0] for r in conn.execute("SELECT id FROM logger_contentsessionlog ORDER BY id")][::20]
    finally:
        conn.close()
    ids_file, out, stop = work / f"{tag}.ids", work / f"{tag}.json", work / f"{tag}.stop"
    ids_file.write_text("\n".join(ids))
    proc = subprocess.Popen([sys.executable, str(APP_WRITER), str(db), dataset[0] if dataset else "", str(ids_file),
                             str(out), str(stop), tag], cwd=ROOT)
    report: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 30
        while not out.with_name(out.name + ".ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the app writer on {db.name} did not start")
            time.sleep(0.01)
        yield report
    finally:
        stop.touch()
        proc.wait(timeout=60)
    report.update(json.loads(out.read_text()))


def file_mb(*paths: Path) -> float:
    return sum(p.stat().st_size for p in paths if p.exists()) / 1e6


# --------------------------------------------------------------------------- one size


def snapshot(dst: Path, home: Path, db: Path) -> None:
    """Copy a device (its home and its app database) aside, to start later runs from the same state."""
    dst.mkdir(parents=True)
    shutil.copytree(home, dst / "home", symlinks=True)
    shutil.copyfile(db, dst / "db")


def restore(src: Path, home: Path, db: Path) -> None:
    """Put a device back as :func:`snapshot` saw it (home and database together: the home remembers the counter)."""
    shutil.rmtree(home)
    shutil.copytree(src / "home", home, symlinks=True)
    shutil.copyfile(src / "db", db)
    for extra in (db.with_name(db.name + "-journal"), db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        extra.unlink(missing_ok=True)


def clear(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def shown_runs(values: Sequence[float]) -> str:
    return "runs " + ", ".join(f"{v:.3g}" for v in values)


def cli_json(home: Path, *args: str) -> tuple[Measured, Any]:
    """Run ``bundlesync ARGS --json`` as its own process; its measurements and its JSON report."""
    measured = cli(home, *args, "--json")
    try:
        return measured, json.loads(measured.out)
    except ValueError as exc:
        raise BenchError(f"`bundlesync {' '.join(args)} --json` printed no JSON ({exc}): {measured.out[:200]!r}") from exc


def bench_size(run: Run, args: argparse.Namespace, base: Path) -> None:
    """Measure one size into ``run`` (filled as it goes, so a failure keeps what was measured)."""
    logs, users, seed, runs, changes = run.logs, run.users, run.seed, args.runs, args.changes
    tag = f"[{logs:,} logs]"
    profile_dir: Path | None = args.profile

    # Fixture: A with the facility, B schema-only.
    a_db, b_db = base / "a.sqlite3", base / "b.sqlite3"
    say(f"{tag} writing fixture ({users} users, {logs:,} logs) in {base}")
    facility, fixture_s = timed(lambda: make_fixture(a_db, users=users, logs=logs, seed=seed))
    make_fixture(b_db, users=users, logs=logs, seed=seed, schema_only=True)
    run.add("fixture_s", "fixture written (make_facility_db.py)", fixture_s, "s")
    app_mb = file_mb(a_db)
    run.add("fixture_db_mb", "app database size before init", app_mb, "MB")
    live = base / "live"
    if not args.skip_live:
        live.mkdir()
        shutil.copyfile(a_db, live / "a.sqlite3")
        shutil.copyfile(b_db, live / "b.sqlite3")

    # init, then the state every measured run starts from
    say(f"{tag} init + certificates")
    home_a, home_b, init_s, queued = setup_pair(base, a_db, b_db, facility)
    run.add("init_s", "init (triggers + queue existing rows)", init_s, "s")
    run.add("init_queued", "  rows queued by init", queued, "rows")
    snap_a, snap_b, snap_b_full = base / "snap-a", base / "snap-b", base / "snap-b-full"
    snapshot(snap_a, home_a, a_db)
    snapshot(snap_b, home_b, b_db)
    out = base / "out"

    # 1. the first export after init (serialization of every row + bundle), one process per run
    say(f"{tag} first full export x{runs} (one `bundlesync export` process each)")
    exports: list[Measured] = []
    report: Any = None
    for i in range(runs):
        if i:
            restore(snap_a, home_a, a_db)
        clear(out)
        measured, report = cli_json(home_a, "export", "--facility", facility, "--out", str(out))
        exports.append(measured)
    if not report or not report.get("path"):
        raise BenchError("the first export wrote no bundle (nothing to export?)")
    bundle_path = Path(report["path"])
    records = int(report["records"])
    size = int(report["bytes"])
    export_s = median([m.wall for m in exports])
    run.add("export_records", "records in the full bundle", records, "records")
    run.add("export_s", "full export (first after init): wall, median", export_s, "s", note=shown_runs([m.wall for m in exports]))
    run.add("export_rate", "  full export records/s", records / export_s, "records/s", target=(">=", 100_000), note="at 1M")
    run.add("export_cpu", "  CPU-s per 100k records", 1e5 * median([m.cpu for m in exports]) / records, "s")
    rss_export = max(m.maxrss_mb for m in exports)
    run.add("rss_export_mb", "  peak RSS of `bundlesync export`", rss_export, "MB", target=("<", 200))
    a_ratio = file_mb(a_db) / app_mb
    run.add("store_ratio_a", "app database after init + full export / before", a_ratio, "x", target=("<=", 1.6))
    run.add("bundle_bytes", "  bundle size", size, "bytes")
    run.add("bundle_bytes_per_record", "  bytes/record", size / records if records else None, "bytes/record")

    # 2. import into the empty device, one process per run
    say(f"{tag} full import into the empty device x{runs}")
    imports: list[Measured] = []
    for i in range(runs):
        restore(snap_b, home_b, b_db)
        measured, reports = cli_json(home_b, "import", str(bundle_path))
        imports.append(measured)
        rep = reports[0]
        if rep.get("waiting") or rep.get("failed") or rep.get("refused"):
            run.notes.append(f"full import left {rep.get('waiting')} waiting, {rep.get('failed')} failed, "
                             f"{rep.get('refused')} refused rows")
    import_s = median([m.wall for m in imports])
    run.add("import_s", "full import into an empty device: wall, median", import_s, "s", note=shown_runs([m.wall for m in imports]))
    run.add("import_rate", "  full import records/s", records / import_s, "records/s", target=(">=", 50_000), note="at 1M")
    run.add("import_cpu", "  CPU-s per 100k records", 1e5 * median([m.cpu for m in imports]) / records, "s")
    rss_import = max(m.maxrss_mb for m in imports)
    run.add("rss_import_mb", "  peak RSS of `bundlesync import`", rss_import, "MB", target=("<", 200))
    run.add("store_ratio_b", "receiving app database after the full import / sender's before init", file_mb(b_db) / app_mb,
            "x", target=("<=", 1.6))
    run.add("e2e_rate", "end to end (full export + full import) records/s", records / (export_s + import_s), "records/s",
            target=(">=", 27_000), note="at 1M")
    snapshot(snap_b_full, home_b, b_db)

    # 2b. the same export and import in this process under cProfile (timings inflated)
    if profile_dir is not None:
        say(f"{tag} profiled export and import (in this process)")
        restore(snap_a, home_a, a_db)
        clear(base / "prof-out")
        with Device.open(home_a) as dev, profiled(profile_dir, f"export-{logs}"):
            made = export_bundle(dev, facility, base / "prof-out")
        assert made.path is not None
        restore(snap_b, home_b, b_db)
        with Device.open(home_b) as dev, profiled(profile_dir, f"import-{logs}"):
            import_bundle(dev, made.path)
        restore(snap_b_full, home_b, b_db)
        run.notes.append("a cProfile run of export and import was made after the timed runs")

    # 3. what encryption costs: the same full export with and without it, and the decryption import adds
    say(f"{tag} encryption cost")
    secret_a = KeyStore(home_a).encryption_secret()
    enc_s = clear_s = float("inf")
    cost_out = base / "cost-out"
    clear(cost_out)
    with Device.open(home_a) as dev:
        # Alternating runs, best of two each, so cache warmth and a busy machine favour neither side.
        for _ in range(2):
            for encrypt in (False, True):
                made, took = timed(lambda: export_bundle(dev, facility, cost_out, full=True, encrypt=encrypt))
                if made.path is not None:
                    made.path.unlink()
                if encrypt:
                    enc_s = min(enc_s, took)
                else:
                    clear_s = min(clear_s, took)
    enc_info = container.read_info(bundle_path)
    _, decrypt_s = timed(lambda: container.decrypt_payload(enc_info, base / "cost.plain", secret_a))
    (base / "cost.plain").unlink(missing_ok=True)
    run.add("encrypt_export_s", "encryption: export --full, encrypted (default), best of 2", enc_s, "s")
    run.add("encrypt_export_clear_s", "  export --full --no-encrypt, best of 2", clear_s, "s")
    run.add("encrypt_export_cost_pct", "  encryption cost (encrypt + read-back decrypt), % of export wall", 100 * (enc_s - clear_s) / clear_s
            if clear_s else None, "%", target=("<=", 15))
    run.add("encrypt_decrypt_s", "  decrypting the payload (import's extra step)", decrypt_s, "s")
    run.add("encrypt_import_cost_pct", "  decryption, % of import wall", 100 * decrypt_s / (import_s - decrypt_s)
            if import_s > decrypt_s else None, "%", target=("<=", 15))

    # 4. a full bundle into a device that holds 90% of it: 10% of the records changed since
    tenth = max(1, records // 10)
    say(f"{tag} import of a full bundle into a device holding 90% of it x{runs}")
    changed = change_rows(a_db, tenth)
    clear(base / "out90")
    _, report90 = cli_json(home_a, "export", "--facility", facility, "--out", str(base / "out90"), "--full")
    bundle90 = Path(report90["path"])
    records90 = int(report90["records"])
    held: list[Measured] = []
    outcomes: dict[str, int] = {}
    for _ in range(runs):
        restore(snap_b_full, home_b, b_db)
        measured, reports = cli_json(home_b, "import", str(bundle90))
        held.append(measured)
        outcomes = reports[0].get("outcomes", {})
    held_s = median([m.wall for m in held])
    run.add("held_s", f"import, device holds 90% ({changed:,} rows changed since): wall, median", held_s, "s",
            note=shown_runs([m.wall for m in held]))
    run.add("held_rate", "  records/s", records90 / held_s, "records/s", target=(">=", 100_000), note="at 1M")
    run.add("held_cpu", "  CPU-s per 100k records", 1e5 * median([m.cpu for m in held]) / records90, "s")
    run.notes.append(f"90%-held import outcomes: {outcomes}")

    # 5. incremental: plain-SQL edits, `bundlesync export` (basis: the receiver's receipt), `bundlesync import`
    if args.settle:
        # A cron export starts on an idle device. This machine's CPUs slow down by about a third after
        # some seconds of full load and take a while to recover, so the short commands that follow the
        # long steps are timed after a pause, not on a CPU still throttled by the 90%-held imports.
        say(f"{tag} settling for {args.settle:g} s before the short commands")
        time.sleep(args.settle)
    say(f"{tag} incremental export and import of {changes:,} changes x{runs}")
    inc_out = base / "inc"
    clear(inc_out)
    # B's receipt of the 90% bundle is next to it: the drive the incremental exports go to.
    for receipt in (base / "out90").glob("receipt-*.json"):
        shutil.copy2(receipt, inc_out / receipt.name)
    inc_exports: list[Measured] = []
    inc_imports: list[Measured] = []
    inc_records: list[int] = []
    last_bundle: Path | None = None
    for _ in range(runs):
        change_rows(a_db, changes)
        measured, rep = cli_json(home_a, "export", "--facility", facility, "--out", str(inc_out))
        inc_exports.append(measured)
        inc_records.append(int(rep.get("records") or 0))
        if not rep.get("path"):
            raise BenchError("the incremental export wrote no bundle")
        last_bundle = Path(rep["path"])
        measured, _ = cli_json(home_b, "import", str(last_bundle))
        inc_imports.append(measured)
    run.add("incremental_records", f"incremental: {changes:,} rows changed by SQL ({CHANGED_TABLE}); records sent",
            median(inc_records), "records")
    inc_export_s = median([m.wall for m in inc_exports])
    inc_import_s = median([m.wall for m in inc_imports])
    run.add("incremental_export_s", "  `bundlesync export` wall (incl. start-up), median", inc_export_s, "s",
            target=("<", 0.5), note="1M store; " + shown_runs([m.wall for m in inc_exports]))
    run.add("incremental_import_s", "  `bundlesync import` wall (incl. start-up), median", inc_import_s, "s",
            target=("<", 0.5), note="1M store; " + shown_runs([m.wall for m in inc_imports]))

    # 6. start-up
    say(f"{tag} start-up: --version and a re-import x{runs}")
    versions = [cli(home_a, "--version") for _ in range(runs)]
    assert last_bundle is not None
    again = [cli(home_b, "import", str(last_bundle), "--quiet") for _ in range(runs)]
    run.add("version_s", "`bundlesync --version` wall, median", median([m.wall for m in versions]), "s",
            target=("<", 0.3), note=shown_runs([m.wall for m in versions]))
    run.add("reimport_s", "`bundlesync import` of an imported bundle, median", median([m.wall for m in again]), "s",
            target=("<", 0.3), note=shown_runs([m.wall for m in again]))
    run.add("rss_baseline_mb", "peak RSS of `bundlesync --version` (baseline)", max(m.maxrss_mb for m in versions), "MB")

    # 7. beside a running app: the app's longest wait while the CLI exports and imports
    if not args.skip_live:
        say(f"{tag} beside an app writer: set-up of a third device pair")
        lhome_a, lhome_b, _, _ = setup_pair(live, live / "a.sqlite3", live / "b.sqlite3", facility)
        (live / "out").mkdir()
        say(f"{tag} beside an app writer: bundlesync export")
        with app_writing(live / "a.sqlite3", live, "appa") as on_a:
            exp = cli(lhome_a, "export", "--facility", facility, "--out", str(live / "out"))
        lbundle = exp.out.strip().splitlines()[-1] if exp.out.strip() else ""
        if not lbundle:
            raise BenchError("`bundlesync export` beside the app writer printed no bundle path")
        say(f"{tag} beside an app writer: bundlesync import")
        with app_writing(live / "b.sqlite3", live, "appb") as on_b:
            imp = cli(lhome_b, "import", lbundle, "--quiet")
        for what, app, took in (("export", on_a, exp.wall), ("import", on_b, imp.wall)):
            run.add(f"live_{what}_wait_ms", f"beside an app (rollback journal): its longest wait, {what}",
                    app["max_wait"] * 1000, "ms", target=("<", 1000))
            run.add(f"live_{what}_failed", f"  app writes that failed during the {what}", app["failures"],
                    "writes", target=("<=", 0))
            run.add(f"live_{what}_p99_ms", "  99th percentile of its waits", app["p99_wait"] * 1000, "ms")
            run.add(f"live_{what}_s", f"  `bundlesync {what}` wall beside the app ({app['transactions']} app "
                    "transactions)", took, "s")

    # 8. size against zstd -19 over the same record lines
    if not args.skip_zstd:
        say(f"{tag} zstd -19 over the bundle's record lines (slow: ~1k records/s)")
        info = container.read_info(bundle_path)
        raw = base / "records.jsonl"
        plain_info = info
        if info.flags & container.FLAG_ENCRYPTED:
            plain_info = container.decrypt_payload(info, base / "zstd.plain", secret_a)
        with raw.open("wb") as f:
            f.writelines(container.iter_records(plain_info))
        (base / "zstd.plain").unlink(missing_ok=True)
        raw_bytes = raw.stat().st_size
        if raw_bytes != info.payload_raw_bytes:
            run.notes.append(f"JSON lines are {raw_bytes} bytes, the summary says {info.payload_raw_bytes}")
        zst = base / "records.jsonl.zst"
        proc, zstd_s = timed(lambda: subprocess.run(["zstd", "-19", "-T1", "-q", "-f", str(raw), "-o", str(zst)],
                                                    check=False, capture_output=True, text=True))
        if proc.returncode != 0:
            raise BenchError(f"zstd -19 failed ({proc.returncode}): {proc.stderr.strip()}")
        zst_bytes = zst.stat().st_size
        raw.unlink()
        zst.unlink()
        run.add("jsonl_bytes", "record lines (JSON lines, uncompressed)", raw_bytes, "bytes")
        run.add("zstd19_bytes", "zstd -19 -T1 of those lines", zst_bytes, "bytes")
        run.add("zstd19_s", "  zstd -19 time (for scale)", zstd_s, "s")
        run.add("bundle_vs_zstd19", "bundle bytes / zstd-19 bytes", size / zst_bytes, "x", target=("<=", 1.2))
        run.add("bundle_vs_raw", "  bundle bytes / raw JSON lines", size / raw_bytes, "x")


def across_sizes(runs: Sequence[Run]) -> Run | None:
    """Peak RSS of the largest size against the smallest: memory must not grow with the data."""
    done = [r for r in runs if r.value("rss_export_mb") and r.value("rss_import_mb")]
    if len(done) < 2:
        return None
    small, large = min(done, key=lambda r: r.logs), max(done, key=lambda r: r.logs)
    if small.logs == large.logs:
        return None
    out = Run(large.logs, large.users, large.seed, "")
    for key, what in (("rss_export_mb", "export"), ("rss_import_mb", "import")):
        a, b = small.value(key), large.value(key)
        assert a is not None and b is not None
        out.add(f"{key}_growth", f"peak RSS of {what}: {large.logs:,} logs / {small.logs:,} logs", b / a, "x",
                target=("<=", 1.2))
    return out


# --------------------------------------------------------------------------- options


def _count(text: str, *, minimum: int) -> int:
    cleaned = text.strip().replace("_", "").replace(",", "")
    try:
        value = int(cleaned)
    except ValueError:
        try:
            as_float = float(cleaned)  # 1e6
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not as_float.is_integer():
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        value = int(as_float)
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive(text: str) -> int:
    return _count(text, minimum=1)


def size_list(text: str) -> list[int]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if not parts:
        raise argparse.ArgumentTypeError("give at least one size, e.g. --sizes 100000,1000000")
    return [_count(p, minimum=1) for p in parts]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.py", description="Benchmark bundlesync: throughput, memory and bundle size (not a test).",
        epilog="Targets (1M records, median of 3 runs, one process each): full export >= 100k rec/s; full import "
               ">= 50k rec/s; import into a device holding 90%% >= 100k rec/s; export + import >= 27k rec/s; peak RSS "
               "< 200 MB and within 20%% from the smallest size to the largest; app database <= 1.6x after init and a "
               "full sync; 1,000 changes exported and imported < 0.5 s each; --version and a re-import < 0.3 s; "
               "bundle <= 1.2x zstd -19.")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--logs", type=positive, default=None, metavar="N",
                       help="logger rows in the fixture (default 100000)")
    sizes.add_argument("--sizes", type=size_list, default=None, metavar="N1,N2",
                       help="several --logs values, run one after another (e.g. 100000,1000000)")
    parser.add_argument("--users", type=positive, default=200, metavar="U", help="facility users (default 200)")
    parser.add_argument("--seed", type=int, default=1, help="fixture seed (default 1)")
    parser.add_argument("--changes", type=positive, default=1000, metavar="C",
                        help="rows changed with SQL before the incremental export (default 1000)")
    parser.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                        help="keep all files under DIR (default: a temporary folder, removed afterwards)")
    parser.add_argument("--runs", type=positive, default=3, metavar="R",
                        help="runs of each timed step; the median is shown (default 3)")
    parser.add_argument("--settle", type=float, default=20.0, metavar="SECONDS",
                        help="pause before timing the short commands (incremental, start-up), so they do not "
                             "run on a CPU still slowed by the long steps (default 20; 0: no pause)")
    parser.add_argument("--skip-zstd", action="store_true", help="skip the (slow) zstd -19 comparison")
    parser.add_argument("--skip-live", action="store_true",
                        help="skip the export and import beside a running app writer")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="run the in-process export and import under cProfile; write DIR/*.prof "
                             "and print the top functions (timings are then inflated)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--debug", action="store_true", help="print a traceback when a step fails")
    args = parser.parse_args(argv)
    args.size_list = args.sizes or [args.logs or 100_000]
    if not args.skip_zstd and shutil.which("zstd") is None:
        parser.error("the zstd command is not installed (needed for the size comparison); install it or pass --skip-zstd")
    if args.workdir is not None and args.workdir.exists() and not args.workdir.is_dir():
        parser.error(f"--workdir {args.workdir} exists and is not a directory")
    if args.profile is not None and args.profile.exists() and not args.profile.is_dir():
        parser.error(f"--profile {args.profile} exists and is not a directory")
    if not PROFILE.is_file() or not FIXTURE_SCRIPT.is_file():
        parser.error(f"missing {PROFILE} or {FIXTURE_SCRIPT}: run from a bundlesync checkout")
    return args


def machine() -> dict[str, Any]:
    import bundlesync
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "bundlesync": getattr(bundlesync, "__version__", "?"), "sqlite": sqlite3.sqlite_version}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            root, remove = args.workdir.resolve(), False
        else:
            root, remove = Path(tempfile.mkdtemp(prefix="bundlesync-bench-")), True
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot create the work folder: {exc}", file=sys.stderr)
        return 2
    # Every timed command imports bundlesync's modules: time them compiled, as an installed package has
    # them, not compiled afresh by each process (PYTHONDONTWRITEBYTECODE, an editable install).
    compileall.compile_dir(str(ROOT / "bundlesync"), quiet=1)
    runs: list[Run] = []
    summary: Run | None = None
    info = machine()
    status = 0

    def on_term(signum: int, _frame: object) -> None:
        raise _Terminated(f"stopped by signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        for logs in args.size_list:
            base = Path(tempfile.mkdtemp(prefix=f"logs{logs}-", dir=root))
            run = Run(logs, args.users, args.seed, str(base))
            runs.append(run)
            if args.profile is not None:
                run.notes.append("export and import ran under cProfile: their timings are inflated")
            load = os.getloadavg()[0]
            try:
                bench_size(run, args, base)
            finally:
                run.notes.append(f"1-min load average: {load:.2f} at start, {os.getloadavg()[0]:.2f} at end "
                                 f"({info['cpus']} CPUs; other processes distort timings)")
            _show(run, info, args)
            run.done = True
            # The copies of each size are large (several GB at 1M): keep only the last size's.
            if remove and len(runs) < len(args.size_list):
                shutil.rmtree(base, ignore_errors=True)
        summary = across_sizes(runs)
        if summary is not None and not args.json:
            print(render_table(summary, "== across sizes =="), flush=True)
    except (KeyboardInterrupt, _Terminated) as exc:
        status = 130
        message = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
    except (BenchError, BundlesyncError, OSError, sqlite3.Error) as exc:
        status, message = 1, str(exc)
        if args.debug:
            traceback.print_exc()
    except Exception as exc:  # noqa: BLE001 - an engine bug: one line, traceback on request
        status, message = 1, f"unexpected {type(exc).__name__}: {exc}"
        if args.debug:
            traceback.print_exc()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if remove:
            shutil.rmtree(root, ignore_errors=True)
        elif runs or args.workdir is not None:
            say(f"files kept in {root}")
    if status:
        if runs and not runs[-1].done:
            runs[-1].notes.append(f"INCOMPLETE: {message}")
            _show(runs[-1], info, args)
        hint = "" if args.debug or status == 130 else " (rerun with --debug for the traceback)"
        print(f"error: {message}{hint}", file=sys.stderr)
    if args.json:
        print(json.dumps({"machine": info, "runs": [
            {"logs": r.logs, "users": r.users, "seed": r.seed, "complete": r.done,
             "workdir": None if remove else r.workdir,
             "metrics": [m.as_json() for m in r.metrics], "notes": r.notes} for r in runs],
            "across_sizes": [m.as_json() for m in summary.metrics] if summary is not None else []}, indent=2))
    return status


class _Terminated(Exception):
    """SIGTERM, turned into an exception so clean-up runs and partial results are printed."""


def _show(run: Run, info: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        return
    records = run.value("export_records") or 0
    title = (f"== bundlesync {info['bundlesync']} bench: {run.logs:,} logs, {run.users:,} users, seed "
             f"{run.seed} ({records:,} records) | Python {info['python']}, SQLite {info['sqlite']}, "
             f"{info['cpus']} CPUs ==")
    print(render_table(run, title), flush=True)
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
