"""The ``bundlesync`` command line: parses options, calls the library, prints.

No sync logic lives here. Output rules (the public contract scripts rely on): ``export``
prints the bundle path as its last stdout line (nothing when nothing is new);
messages meant for people go to stderr; ``--json`` prints one JSON document.
Every failure is one ``error: …`` line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from bundlesync._version import __version__
from bundlesync import runlog
from bundlesync.runlock import DEFAULT_WAIT_S, home_lock
from bundlesync.errors import EXIT_PARTIAL, BundlesyncError
from bundlesync.format.volumes import DEFAULT_MAX_SIZE

# The machinery is imported by the commands that use it, so that `bundlesync --version` and
# `--help` start in a fraction of the time (measured in docs/performance.md).
if TYPE_CHECKING:
    from bundlesync.device import Device
    from bundlesync.plugins.loader import PluginSet
    from bundlesync.sync.importer import ImportResult

__all__ = ["cli", "main"]

F = TypeVar("F", bound=Callable[..., Any])

MIN_DB_WAIT_S = 2.0
"""Shortest busy timeout on the app database, whatever ``--wait`` says."""


def _say(message: str, *, quiet: bool = False) -> None:
    if not quiet:
        click.echo(message, err=True)


MIN_VOLUME = 4096
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _parse_size(_ctx: click.Context, param: click.Parameter, value: str) -> int:
    """A byte size: ``65536``, ``64K``, ``4000M``, ``3.5G`` (powers of 1024)."""
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in _UNITS else ""
    try:
        size = int(float(text[: len(text) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size such as 65536, 64K, 4000M or 3.5G", param=param) from None
    if size < MIN_VOLUME:
        raise click.BadParameter(f"{value!r} is below the smallest volume size, {MIN_VOLUME} bytes", param=param)
    return size


def _store_wait(ctx: click.Context, _param: click.Parameter, value: float) -> float:
    ctx.ensure_object(dict)
    ctx.obj["wait"] = value
    return value


def _wait_option(f: F) -> F:
    """``--wait SECONDS``: the command holds the home's run lock (one run at a time per home)."""
    return click.option(
        "--wait", type=click.FloatRange(min=0), default=DEFAULT_WAIT_S, show_default=True, expose_value=False,
        callback=_store_wait, is_eager=True,
        help="Seconds to wait for another run on this home (and for another program's database lock); then exit 8.",
    )(f)


@contextmanager
def _device(ctx: click.Context) -> Iterator[Device]:
    """Open the home's device; commands with ``--wait`` hold the home's run lock meanwhile."""
    from bundlesync.device import Device, resolve_home
    from bundlesync.replica.health import describe as describe_repair

    home = resolve_home(ctx.obj["home"])
    wait: float | None = ctx.obj.get("wait")
    with home_lock(home, wait=wait, what=ctx.command_path) if wait is not None else nullcontext():
        # The database lock of another program gets the same patience, but never less than a moment:
        # the app's own short transactions must not fail a run.
        device = Device.open(home, busy_timeout=max(wait, MIN_DB_WAIT_S)) if wait is not None else Device.open(home)
        for repair in device.repairs:
            _warn(f"warning: {describe_repair(repair)}")
        try:
            yield device
        finally:
            device.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bundlesync")
@click.option("--home", type=click.Path(file_okay=False), envvar="BUNDLESYNC_HOME",
              help="Device home (config, keys, state). Default: $BUNDLESYNC_HOME.")
@click.option("--no-plugins", is_flag=True, help="Load no plugins (entry points or config.yaml).")
@click.pass_context
def cli(ctx: click.Context, home: str | None, no_plugins: bool) -> None:
    """Sync a facility's SQLite data between devices through signed bundle files."""
    ctx.ensure_object(dict)
    ctx.obj["home"] = home
    ctx.obj["plugins"] = not no_plugins


def _print_json(doc: object, *, ensure_ascii: bool = True) -> None:
    """A ``--json`` report on stdout: indented, keys sorted, so scripts and diffs see a stable shape."""
    click.echo(json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=ensure_ascii))


def _plugins(ctx: click.Context, device: Device) -> PluginSet:
    from bundlesync.plugins.loader import PluginSet

    return PluginSet.for_device(device, enabled=ctx.obj["plugins"])


def _warn(message: str) -> None:
    click.echo(message, err=True)


@contextmanager
def _progress(label: str, quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress callback drawing a bar on stderr, or None when stderr is not a terminal or ``--quiet``."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    started = time.monotonic()
    bars: list[Any] = []

    def rate(done: int | None) -> str:
        elapsed = time.monotonic() - started
        return f"{(done or 0) / elapsed:,.0f} records/s" if elapsed > 0 else ""

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True, show_pos=True, show_percent=True,
                                          item_show_func=rate).__enter__())
        bar = bars[0]
        bar.length = max(bar.length or 0, total)
        bar.update(done - bar.pos, current_item=done)

    try:
        yield update
    finally:
        if bars:
            bars[0].__exit__(None, None, None)


def _home_or_none(ctx: click.Context) -> Path | None:
    from bundlesync.device import resolve_home

    try:
        return resolve_home(ctx.obj["home"])
    except BundlesyncError:
        return None


def _warner(ctx: click.Context, quiet: bool) -> Callable[[str], None]:
    """Warnings go to stderr, or only to the home's log under ``--quiet`` (a quiet success prints nothing)."""
    home = _home_or_none(ctx)

    def warn(message: str) -> None:
        if quiet and home is not None:
            runlog.append(home, message)
        else:
            _warn(message)

    return warn


@contextmanager
def _logged(ctx: click.Context, command: str) -> Iterator[Callable[[str], None]]:
    """Yield a function that logs the run's one success line; a failure is logged as it leaves."""
    home = _home_or_none(ctx)

    def log(message: str) -> None:
        if home is not None:
            runlog.append(home, f"{command} {message}")

    try:
        yield log
    except BundlesyncError as exc:
        log(f"failed (exit {exc.exit_code}): {exc}")
        raise
    except click.ClickException as exc:
        log(f"failed (exit {exc.exit_code}): {exc.format_message()}")
        raise
    except Exception as exc:
        log(f"failed (exit 1): {type(exc).__name__}: {exc}")
        raise


@cli.command()
@click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False), help="The app's SQLite database.")
@click.option("--profile", "profile_path", required=True, type=click.Path(dir_okay=False),
              help="Profile YAML, or the name of a built-in profile (see `bundlesync profiles`).")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing on success.")
@click.pass_context
def init(ctx: click.Context, db_path: str, profile_path: str, quiet: bool) -> None:
    """Set up this device: tracking triggers, identity, config (idempotent)."""
    from bundlesync.device import init_device, resolve_home

    home = resolve_home(ctx.obj["home"])
    me, newly, created = init_device(home, Path(db_path), profile_path)
    verb = "initialised" if created else "already initialised; refreshed"
    _say(f"{verb} {home} (instance {me}); tracking {len(newly)} new table(s)", quiet=quiet)


@cli.group()
def facility() -> None:
    """Facility set-up."""


@facility.command("provision")
@_wait_option
@click.option("--facility", "facility_id", required=True, help="Facility id (or dataset id) in the app DB.")
@click.option("--quiet", "-q", is_flag=True)
@click.pass_context
def facility_provision(ctx: click.Context, facility_id: str, quiet: bool) -> None:
    """Make this device the facility's authority (root key and certificate)."""
    from bundlesync.trust.authority import provision_facility

    with _device(ctx) as device:
        dataset_id, fac = device.resolve_facility(facility_id)
        cert = provision_facility(device.keys, dataset_id=dataset_id, facility_id=fac, profile=device.profile.name,
                                  instance_id=device.instance_id)
        _say(f"this device is the authority of facility {fac} (dataset {dataset_id}); certificate {cert.cert_id}", quiet=quiet)


@cli.group()
def cert() -> None:
    """Certificates: request, issue, install."""


@cert.command("request")
@_wait_option
@click.option("--facility", "facility_id", required=True)
@click.option("--scope", required=True, help="full, or user:USER_ID")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--valid-days", type=click.IntRange(min=1), default=None,
              help="Ask for a certificate that expires after N days (the authority may shorten it).")
@click.pass_context
def cert_request(ctx: click.Context, facility_id: str, scope: str, out_dir: str, valid_days: int | None) -> None:
    """Write a certificate request for the facility's authority; prints its path."""
    from bundlesync.trust.enrolment import request_certificate

    with _device(ctx) as device:
        try:
            dataset_id, fac = device.resolve_facility(facility_id)
        except BundlesyncError:
            dataset_id, fac = "", facility_id  # a fresh device may not know the facility yet
        path = request_certificate(device.keys, dataset_id=dataset_id, facility_id=fac, profile=device.profile.name,
                                      scope=scope, instance_id=device.instance_id, out_dir=Path(out_dir),
                                   valid_days=valid_days)
        click.echo(str(path))


@cert.command("issue")
@_wait_option
@click.argument("request", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--valid-days", type=click.IntRange(min=1), default=None,
              help="The certificate expires after N days (never later than the request asks or the issuer's own).")
@click.pass_context
def cert_issue(ctx: click.Context, request: str, out_dir: str, valid_days: int | None) -> None:
    """On the authority: sign a request; prints the grant's path."""
    from bundlesync.trust.authority import issue_grant

    with _device(ctx) as device:
        click.echo(str(issue_grant(device.keys, Path(request), Path(out_dir), valid_days=valid_days)))


@cert.command("revoke")
@click.argument("cert_id")
@click.option("--quiet", "-q", is_flag=True)
@click.pass_context
def cert_revoke(ctx: click.Context, cert_id: str, quiet: bool) -> None:
    """On the authority: revoke a certificate (and all issued under it); later bundles carry it."""
    from bundlesync.trust.authority import revoke_certificate

    with _device(ctx) as device:
        rev = revoke_certificate(device.keys, cert_id.strip().lower())
    _say(f"revoked certificate {rev.cert_id} at {rev.revoked_at}; every bundle this device exports from now on "
         "carries the revocation, and every device that imports one refuses that certificate", quiet=quiet)


@cert.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def cert_list(ctx: click.Context, as_json: bool) -> None:
    """This device's certificates: chain, scopes, expiry, fingerprints, recipients, revocations."""
    from bundlesync.sync.status import certificate_listing

    with _device(ctx) as device:
        listing = certificate_listing(device)
    if as_json:
        _print_json(listing)
        return
    lines = [f"device     instance {listing['instance_id']}", f"recipient  {listing['recipient']}"]
    for f in listing["facilities"]:
        role = "authority" if f["authority"] else "member"
        lines.append(f"facility   {f['facility_id']} dataset {f['dataset_id']} ({role})")
        for label, entries in (("chain", f["chain"]), ("peer", f["peers"])):
            for c in entries:
                lines.append(
                    f"  {label:<8} {c['cert_id']} {c['scope']:<10} key {c['fingerprint']} "
                    f"expires {c['expires_at'] or 'never'}"
                    + (f" instance {c['instance_id']}" if c["instance_id"] else " (no instance id: re-issue)")
                    + (f" recipient {c['recipient']}" if c["recipient"] else "")
                )
        if f["root"]:
            lines.append(f"  root     {f['root']['cert_id']} key {f['root']['fingerprint']}")
        for r in f["revocations"]:
            lines.append(f"  revoked  {r['cert_id']} at {r['revoked_at']} by {r['revoked_by']}")
        lines += [f"  {w}" for w in f["warnings"]]
    click.echo("\n".join(lines))


@cert.command("install")
@_wait_option
@click.argument("grant", type=click.Path(dir_okay=False))
@click.option("--quiet", "-q", is_flag=True)
@click.pass_context
def cert_install(ctx: click.Context, grant: str, quiet: bool) -> None:
    """Install a grant: this device's certificate and the facility's root."""
    from bundlesync.trust.enrolment import install_grant

    with _device(ctx) as device:
        leaf = install_grant(device.keys, Path(grant))
        _say(f"installed certificate {leaf.cert_id} ({leaf.scope}) for facility {leaf.facility_id}", quiet=quiet)


@cli.command("export")
@_wait_option
@click.option("--facility", "facility_id", required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--full", is_flag=True, help="Everything in scope, not only what changed.")
@click.option("--user", "user_id", default=None, help="Only what user USER_ID's single-user device may read.")
@click.option("--since", "since", default=None, type=click.Path(dir_okay=False),
              help="Only what the device that wrote this receipt lacks.")
@click.option("--require-mount", is_flag=True,
              help="Refuse a folder that is not on a mounted drive (other than the system disk and the home's).")
@click.option("--max-size", callback=_parse_size, default=str(DEFAULT_MAX_SIZE), metavar="SIZE", show_default="4000M (below FAT32's 4 GiB)",
              help="Split a larger bundle into numbered volumes of at most SIZE bytes (K, M, G suffixes).")
@click.option("--no-encrypt", is_flag=True,
              help="Write the records in the clear (by default they are encrypted to the devices that may read them).")
@click.option("--encrypt-to", "encrypt_to", multiple=True, metavar="RECIPIENT",
              help="Also encrypt to this age recipient (age1...; see `bundlesync cert list` on that device).")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing on success (errors still go to stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of the path.")
@click.pass_context
def export_cmd(ctx: click.Context, facility_id: str, out_dir: str, full: bool, user_id: str | None,
               since: str | None, require_mount: bool, max_size: int, no_encrypt: bool, encrypt_to: tuple[str, ...],
               quiet: bool, as_json: bool) -> None:
    """Write what changed as one signed bundle; prints its path (last line)."""
    from bundlesync.sync.exporter import export_bundle

    with _logged(ctx, "export") as log, _device(ctx) as device, _progress("exporting", quiet or as_json) as bar:
        if full and since:
            raise click.UsageError("--full and --since exclude each other")
        if no_encrypt and encrypt_to:
            raise click.UsageError("--no-encrypt and --encrypt-to exclude each other")
        result = export_bundle(device, facility_id, Path(out_dir), full=full, user=user_id,
                               since=Path(since) if since else None, require_mount=require_mount,
                               max_size=max_size, supersede=True, plugins=_plugins(ctx, device),
                               warn=_warner(ctx, quiet), progress=bar, encrypt=not no_encrypt,
                               encrypt_to=encrypt_to)
        if result.path is None:
            carried = f", {result.already_on_drive.name} carries it" if result.already_on_drive else ""
            log(f"facility {facility_id}: nothing new ({result.basis_source}{carried}); no file written")
        else:
            log(f"facility {facility_id}: {result.records} records, {result.size} bytes, "
                f"basis {result.basis_source}: {result.path}"
                + (f"; replaced {', '.join(result.replaced)}" if result.replaced else ""))
    if as_json:
        _print_json(result.to_json())
        return
    if result.path is None:
        carried = f"; {result.already_on_drive.name} on the drive already carries it" if result.already_on_drive else ""
        _say(f"nothing new to export for facility {facility_id} ({result.basis_source}{carried}); no file written",
             quiet=quiet)
        return
    for name in result.replaced:
        _say(f"removed {name}: the new bundle carries all of it", quiet=quiet)
    _say(f"exported {result.records} records ({result.size} bytes, basis: {result.basis_source})", quiet=quiet)
    if not quiet:  # the path is the last stdout line; --quiet prints nothing on success (cron mails any output)
        click.echo(str(result.path))


@cli.command("import")
@_wait_option
@click.argument("bundles", nargs=-1, required=True)
@click.option("--receipt/--no-receipt", default=True, show_default=True,
              help="Leave a signed receipt (what this device holds) next to each bundle.")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def import_cmd(ctx: click.Context, bundles: tuple[str, ...], receipt: bool, quiet: bool, as_json: bool) -> None:
    """Verify, then apply bundles, or every bundle in a folder; re-importing is a no-op.

    Goes on past a bundle that fails; exits with the most serious code: a failure's,
    else 9 if any import left records refused, rows waiting or gaps, else 0.
    """
    from bundlesync.sync.importer import bundles_to_import, exit_rank, failure_json, import_bundle

    reports: list[dict[str, object]] = []
    worst = 0
    done: list[ImportResult] = []
    with _logged(ctx, "import") as log, _device(ctx) as device:
        plugins = _plugins(ctx, device)
        for path in bundles_to_import(bundles):
            try:
                with _progress(f"importing {path.name[:24]}", quiet or as_json) as bar:
                    r = import_bundle(device, path, plugins=plugins, warn=_warner(ctx, quiet), receipt=receipt,
                                      progress=bar)
            except (BundlesyncError, OSError) as exc:
                failed = failure_json(path, exc)
                reports.append(failed)
                log(f"failed (exit {failed['exit_code']}): {failed['error']}")
                click.echo(str(failed["error"]), err=True)
                worst = max(worst, int(str(failed["exit_code"])), key=exit_rank)
                continue
            done.append(r)
            reports.append(r.to_json())
            worst = max(worst, r.exit_code, key=exit_rank)
            dq, ds = r.dequeue, r.deserialize
            log(f"{path}: already imported (bundle {r.bundle_id})" if r.already else
                f"{path}: bundle {r.bundle_id}, {dq.received} records, {ds.written} rows written, "
                f"{ds.deleted} deleted, {dq.refused} refused, {ds.waiting} waiting, {len(r.gaps)} gap(s)")
            if not as_json:
                _report_import(r, quiet)
        if worst == EXIT_PARTIAL and not _still_incomplete(device, done):
            worst = 0  # a later bundle of this run filled what an earlier one lacked
    if as_json:
        _print_json(reports)
    if worst == EXIT_PARTIAL and done:
        refused = sum(r.dequeue.refused for r in done)
        gaps = sum(len(r.gaps) for r in done)
        ds = done[-1].deserialize
        _warn(f"incomplete: {refused} record(s) refused, {ds.waiting} row(s) waiting for their parents, {ds.failed} "
              f"refused by the database, {gaps} gap(s) in a writer's history; import the missing bundles (or ask the "
              "sender for `bundlesync export --full`), then check `bundlesync status`")
    ctx.exit(worst)


def _still_incomplete(device: Device, done: list[ImportResult]) -> bool:
    """After every bundle of the run: records refused, rows still waiting, or gaps still open."""
    if any(r.dequeue.refused for r in done):
        return True
    conn = device.conn
    waiting = conn.execute("SELECT EXISTS (SELECT 1 FROM bundlesync_versions WHERE dirty = 1)").fetchone()[0]
    gaps = conn.execute("SELECT EXISTS (SELECT 1 FROM bundlesync_gaps)").fetchone()[0]
    return bool(waiting or gaps)


def _report_import(r: ImportResult, quiet: bool) -> None:
    name = str(r.path)
    if r.own:
        _say(f"{name}: this device wrote it (bundle {r.bundle_id}); nothing to import, no receipt left", quiet=quiet)
        return
    if r.already:
        _say(f"{name}: already imported (bundle {r.bundle_id}); nothing changed", quiet=quiet)
        return
    dq, ds, o = r.dequeue, r.deserialize, r.dequeue.outcomes
    _say(
        f"{name}: {dq.received} records: {o['new']} new, {o['fast_forward']} updated, "
        f"{o['already']} already here, {o['conflict']} conflicts; {ds.written} rows written, "
        f"{ds.deleted} deleted",
        quiet=quiet,
    )
    if dq.refused:
        _say(f"  refused {dq.refused} record(s) outside the signer's scope, e.g. {dq.refused_sample[0]}")
    if ds.waiting or ds.failed:
        _say(f"  {ds.waiting} row(s) wait for their parent rows, {ds.failed} refused by the database "
             "(kept and retried on the next import; see `bundlesync status`)")
    for inst, (have, need) in r.gaps.items():
        _say(f"  gap: changes of device {inst[:8]} after counter {have} up to {need} are missing; import "
             f"that device's earlier bundle, or ask for `bundlesync export --full`")


@cli.command("verify")
@click.argument("bundle")
@click.option("--quiet", "-q", is_flag=True)
@click.pass_context
def verify_cmd(ctx: click.Context, bundle: str, quiet: bool) -> None:
    """Run every check import runs, without applying anything."""
    from bundlesync.sync.importer import verify_bundle

    with _device(ctx) as device:
        v = verify_bundle(device, Path(bundle))
    _say(f"{bundle}: OK: {v.info.summary.get('records')} records signed by {v.signer.cert_id} "
         f"({v.signer.scope}) for facility {v.manifest.facility_id}", quiet=quiet)


@cli.command("inspect")
@click.argument("bundle")
@click.option("--json", "as_json", is_flag=True)
def inspect_cmd(bundle: str, as_json: bool) -> None:
    """Show a bundle's manifest and summary (structure is checked, trust is not)."""
    from bundlesync.format import container

    info = container.read_info(Path(bundle))
    encryption: Any = info.manifest.get("encryption")
    recipients = list(encryption.get("recipients", [])) if isinstance(encryption, dict) else []
    doc = {"path": bundle, "format_version": info.version, "size": info.size, "manifest": info.manifest,
           "summary": info.summary, "digest": info.digest.hex(),
           "encrypted": bool(info.flags & container.FLAG_ENCRYPTED), "recipients": recipients}
    if as_json:
        _print_json(doc)
        return
    m: Any = info.manifest
    s = info.summary
    sender: Any = m.get("sender", {})
    profile: Any = m.get("profile", {})
    lines = [
        f"bundle     {m.get('bundle_id')}  (format v{info.version}, {info.size} bytes)",
        f"created    {m.get('created_at')} by {m.get('generator')}",
        f"facility   {m.get('facility_id')}  dataset {m.get('dataset_id')}",
        f"profile    {profile.get('name')} v{profile.get('version')}",
        f"sender     instance {sender.get('instance_id')} counter {sender.get('counter')}",
        f"filter     {', '.join(m.get('filter', []))}",
        f"basis      {json.dumps(m.get('basis', m.get('basis_fsic')), sort_keys=True)}",
        f"held       {json.dumps(m.get('held', m.get('result_fsic')), sort_keys=True)}",
        f"records    {s.get('records')}",
    ]
    if doc["encrypted"]:
        lines.insert(6, f"encrypted  to {len(recipients)} recipient(s): {', '.join(recipients)}")
    else:
        lines.insert(6, "encrypted  no: the records are in the clear (exported with --no-encrypt)")
    counts: Any = s.get("counts", {})
    lines += [f"  {model:<36} {n}" for model, n in sorted(counts.items())]
    click.echo("\n".join(lines))


@cli.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool) -> None:
    """Device identity, facilities, knowledge, pending work and recent transfers."""
    from bundlesync.sync.status import device_status

    with _device(ctx) as device:
        st = device_status(device)
    if as_json:
        _print_json(st)
        return
    lines = [
        f"device     instance {st['instance_id']} counter {st['counter']}",
        *(f"repaired   {r['sentence']}" for r in st["repairs"]),
        f"database   {st['db']} (profile {st['profile']['name']} v{st['profile']['version']})",
        f"pending    {st['pending_changes']} changed row(s) not yet exported; {st['store_records']} records in store",
        f"conflicts  {st['conflicts']}",
    ]
    for w in st["waiting_records"]:
        lines.append(f"waiting    {w['count']} {w['model']} row(s), e.g. {w['example']}")
    if st["clocks_ahead"]["records"]:
        lines.append(f"clocks     {st['clocks_ahead']['warning']}")
    if st["held_back"]["count"]:
        lines.append(f"held back  {st['held_back']['count']} row(s) that cannot travel in a bundle (the rest syncs):")
        for h in st["held_back"]["rows"]:
            lines.append(f"  held     {h['model']} {h['id']} since {h['since']}: {h['reason']}")
    for f in st["facilities"]:
        role = "authority" if f["authority"] else (f["scope"] or "trusted, no certificate")
        lines.append(f"facility   {f['facility_id']} dataset {f['dataset_id']} ({role})")
        lines += [f"  {w}" for w in f["warnings"]]
        for inst, ctr in sorted(f["fsic"].items()):
            lines.append(f"  holds    {inst} up to {ctr}")
        for prefix, counters in sorted(f["knowledge"].items()):
            for inst, ctr in sorted(counters.items()):
                if f["fsic"].get(inst, 0) < ctr:
                    lines.append(f"  holds    {inst} up to {ctr} under {prefix}")
        for p in f["peers"]:
            lines.append(f"  peer     {p['instance']} ({p['scope']}), last heard in {p['last_heard']}")
        for g in f["gaps"]:
            lines.append(f"  gap      {g['instance']}: have {g['have']}, need {g['need']}")
    for t in st["last_transfers"]:
        lines.append(f"{t['direction']:<10} {t['at']} {t['records']} records {t['path']}")
    click.echo("\n".join(lines))


@cli.command("conflicts")
@click.option("--model", default=None, help="Only this table.")
@click.option("--limit", default=50, show_default=True, type=int, help="At most this many (0: all).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def conflicts_cmd(ctx: click.Context, model: str | None, limit: int, as_json: bool) -> None:
    """List the losing versions of concurrent edits (the winners are in the app tables)."""
    from bundlesync.sync.status import list_conflicts

    with _device(ctx) as device:
        found = list_conflicts(device, model=model, limit=limit or None)
    if as_json:
        _print_json(found, ensure_ascii=False)
        return
    if not found:
        _say("no conflicts")
        return
    for c in found:
        loser = c["loser"]
        what = "deletion" if loser.get("deleted") else json.dumps(loser.get("data"), ensure_ascii=False, sort_keys=True)
        click.echo(f"{c['detected_at']} {c['model']} {c['record_id']}: lost {loser['inst'][:8]}:{loser['ctr']} "
                   f"to {c['winner']['instance'][:8]}:{c['winner']['counter']}: {what}")


@cli.command("purge")
@_wait_option
@click.option("--facility", "facility_id", required=True)
@click.option("--user", "user_id", required=True, help="The user whose personal data is erased for good.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (needed when not on a terminal).")
@click.option("--quiet", "-q", is_flag=True)
@click.pass_context
def purge_cmd(ctx: click.Context, facility_id: str, user_id: str, yes: bool, quiet: bool) -> None:
    """Erase a user's personal data everywhere (propagates through bundles; cannot be undone)."""
    from bundlesync.sync.purge import plan_purge, purge_user

    with _device(ctx) as device:
        plan = plan_purge(device, facility_id, user_id)
        if not yes:
            if not sys.stdin.isatty():
                raise click.UsageError(f"purge erases user {user_id}'s data for good on every device it reaches and "
                                       "asks for confirmation, but stdin is not a terminal: re-run with --yes")
            if not click.confirm(f"Purge every record of user {user_id} in facility {plan.facility_id} "
                                 f"({', '.join(plan.partitions)}) for good, on every device the purge reaches?",
                                 err=True):
                raise BundlesyncError("purge not confirmed; nothing was changed (answer y, or pass --yes)")
        r = purge_user(device, facility_id, user_id, plan)
    _say(f"purged {r.records} record(s) of user {user_id} in {', '.join(r.partitions)}; "
         f"{r.app_rows_deleted} app row(s) deleted; the next export carries the purge", quiet=quiet)


@cli.command("profiles")
@click.option("--json", "as_json", is_flag=True)
def profiles_cmd(as_json: bool) -> None:
    """List the profiles built into bundlesync (use one with `init --profile NAME`)."""
    from bundlesync.profile import builtin_profiles, load_profile

    found: list[dict[str, Any]] = []
    for name, path in builtin_profiles().items():
        profile = load_profile(name)
        found.append({"name": name, "profile": profile.name, "version": profile.version,
                      "tables": len(profile.tables), "scopes": sorted(profile.scopes),
                      "plugins": list(profile.plugins), "path": str(path)})
    if as_json:
        _print_json(found)
        return
    for p in found:
        plugins = f"; plugins: {', '.join(p['plugins'])}" if p["plugins"] else ""
        click.echo(f"{p['name']}: profile {p['profile']} v{p['version']}, {p['tables']} tables, "
                   f"scopes {', '.join(p['scopes'])}{plugins} ({p['path']})")


@cli.command("drive")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--clean", is_flag=True, help="Remove the bundles nobody needs and stale *.partial files.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def drive_cmd(ctx: click.Context, folder: str, clean: bool, as_json: bool) -> None:
    """What a drive holds: bundles, receipts, and which bundles every known reader already has."""
    from bundlesync.device import resolve_home
    from bundlesync.sync import drive

    home = resolve_home(ctx.obj["home"])
    removed: list[str] = []
    with _device(ctx) as device:  # receipts are checked against this device's profile and trusted roots
        if clean:
            with home_lock(home, what=ctx.command_path):
                report, removed = drive.clean(Path(folder), device.keys, device.profile)
        else:
            report = drive.survey(Path(folder), device.keys, device.profile)
    unneeded = report.unneeded()
    bundles: list[dict[str, Any]] = [{
        "name": b.name, "files": [p.name for p in b.files], "size": b.size, "records": b.records,
        "readable": b.manifest is not None, "problem": b.problem or None,
        "sender": b.manifest.sender_instance if b.manifest else None,
        "counter": b.manifest.sender_counter if b.manifest else None,
        "dataset_id": b.manifest.dataset_id if b.manifest else None,
        "filter": list(b.manifest.filter) if b.manifest else [],
        "basis": dict(b.manifest.basis_fsic) if b.manifest else {},
        "result": dict(b.manifest.result_fsic) if b.manifest else {},
        "created_at": b.manifest.created_at if b.manifest else None,
        "held_by": report.held_by.get(b.name, []), "superseded_by": report.superseded_by.get(b.name),
        "unneeded": unneeded.get(b.name),
    } for b in report.bundles]
    receipts: list[dict[str, Any]] = [{"instance_id": r.instance_id, "dataset_id": r.dataset_id, "filter": list(r.filter),
                 "fsic": dict(r.fsic), "created_at": r.created_at} for r in report.receipts]
    if as_json:
        _print_json({
            "folder": folder, "bundles": bundles, "receipts": receipts, "bad_receipts": report.bad_receipts,
            "stale_partials": [p.name for p in report.stale_partials], "removed": removed,
        })
        return
    lines = [f"bundles    {len(bundles)} in {folder}"]
    for b in bundles:
        if not b["readable"]:
            lines.append(f"  {b['name']}: unreadable: {b['problem']}")
            continue
        state = f"nobody needs it ({b['unneeded']})" if b["unneeded"] else (
            "held by " + ", ".join(str(i)[:8] for i in b["held_by"]) if b["held_by"] else "no known reader holds it")
        vols = f", {len(b['files'])} volumes" if len(b["files"]) > 1 else ""
        lines.append(f"  {b['name']}: sender {str(b['sender'])[:8]} counter {b['counter']}, "
                     f"{_fsic_text(b['basis'])} -> {_fsic_text(b['result'])}, {b['records']} records, "
                     f"{b['size']} bytes{vols}; {state}")
    lines.append(f"receipts   {len(receipts)}")
    for r in receipts:
        lines.append(f"  device {r['instance_id'][:8]} holds {_fsic_text(r['fsic'])} (at {r['created_at']})")
    lines += [f"  ignored {line}" for line in report.bad_receipts]
    lines += [f"partial    {p.name} (left by a run that died)" for p in report.stale_partials if not clean]
    lines += [f"removed    {name}" for name in removed]
    click.echo("\n".join(lines))


def _fsic_text(fsic: Any) -> str:
    return "{" + ", ".join(f"{inst[:8]}:{ctr}" for inst, ctr in sorted(fsic.items())) + "}"


@cli.command("schedule")
@click.option("--facility", "facility_id", required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Where the drive is mounted, e.g. /media/usb.")
@click.option("--at", "at", default=None, metavar="HH:MM", help="Every day at this time (the machine's local time).")
@click.option("--every", "every", default=None, metavar="INTERVAL", help="Every 1-12 hours (6h) or minutes (30m).")
@click.option("--install", "do_install", is_flag=True, help="Add the line to this user's crontab (replacing an "
              "earlier one for the same facility and folder).")
@click.pass_context
def schedule_cmd(ctx: click.Context, facility_id: str, out_dir: str, at: str | None, every: str | None,
                 do_install: bool) -> None:
    """Print (or install) the crontab line for unattended exports onto a drive."""
    from bundlesync import schedule
    from bundlesync.device import resolve_home

    home = resolve_home(ctx.obj["home"])
    out = Path(out_dir).expanduser().absolute()
    line = schedule.cron_line(home, facility_id, out, at=at, every=every)
    if do_install:
        schedule.install(line, facility_id, out)
        _say(f"installed in the crontab of this user (see `crontab -l`); each run is logged in "
             f"{home / runlog.LOG_NAME} (`bundlesync log`)")
    click.echo(line)


@cli.command("log")
@click.option("--lines", "-n", "count", default=50, show_default=True, type=click.IntRange(min=0),
              help="The last N lines (0: all that is kept).")
@click.pass_context
def log_cmd(ctx: click.Context, count: int) -> None:
    """Show the home's run log: one timestamped line per export and import."""
    from bundlesync.device import resolve_home

    home = resolve_home(ctx.obj["home"])
    lines = runlog.read(home)
    if not lines:
        _say(f"no runs logged yet in {home / runlog.LOG_NAME}")
        return
    click.echo("\n".join(lines[-count:] if count else lines))


@cli.command("reidentify")
@_wait_option
@click.option("--quiet", "-q", is_flag=True)
@click.pass_context
def reidentify_cmd(ctx: click.Context, quiet: bool) -> None:
    """Give this device's database a new identity (after it was copied or restored from a backup)."""
    from bundlesync.device import reidentify, resolve_home

    home = resolve_home(ctx.obj["home"])
    # Like export and import: an export running meanwhile would sign a bundle under the old identity.
    with home_lock(home, wait=ctx.obj["wait"], what=ctx.command_path):
        old, new, pending = reidentify(home)
    _say(f"the database now has identity {new} (was {old}); counters restart from 0, versions written under "
         f"{old[:8]} keep it, and {pending} pending change(s) will be exported under the new identity", quiet=quiet)


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def plugins_cmd(ctx: click.Context, as_json: bool) -> None:
    """List the loaded plugins, their versions and operations."""
    with _device(ctx) as device:
        loaded = [p.describe() for p in _plugins(ctx, device).plugins]
    if as_json:
        _print_json(loaded)
        return
    if not loaded:
        _say("no plugins loaded" + ("" if ctx.obj["plugins"] else " (--no-plugins)"))
        return
    for p in loaded:
        ops = "; ".join(f"{stage}: {', '.join(names)}" for stage, names in sorted(p["operations"].items()))
        click.echo(f"{p['name']} {p['version'] or '(no version)'} [{p['source']}] hooks: {', '.join(p['hooks'])}"
                   + (f"; operations: {ops}" if ops else ""))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning every failure into one line and an exit code."""
    try:
        code = cli.main(args=argv, prog_name="bundlesync", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        hint = "; see `bundlesync --help`" if isinstance(exc, click.UsageError) else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        return exc.exit_code
    except BundlesyncError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except sqlite3.Error as exc:
        click.echo(f"error: database error: {exc}; nothing was changed (check the database file and retry)", err=True)
        return 1
    except OSError as exc:
        click.echo(f"error: {exc.strerror or exc} ({exc.filename or ''}): check the path and permissions", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("error: interrupted; nothing was changed", err=True)
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
