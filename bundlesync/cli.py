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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from bundlesync._version import __version__
from bundlesync.format import container as container
from bundlesync.device import Device, init_device, reidentify, resolve_home
from bundlesync.errors import BundlesyncError
from bundlesync.sync.exporter import export_bundle
from bundlesync.sync.importer import import_bundle, verify_bundle
from bundlesync.plugins.loader import PluginSet
from bundlesync.replica.health import describe as describe_repair
from bundlesync.sync.purge import plan_purge, purge_user
from bundlesync.sync.status import device_status, list_conflicts
from bundlesync.trust.authority import issue_grant, provision_facility
from bundlesync.trust.enrolment import install_grant, request_certificate

__all__ = ["cli", "main"]

F = TypeVar("F", bound=Callable[..., Any])


def _say(message: str, *, quiet: bool = False) -> None:
    if not quiet:
        click.echo(message, err=True)


@contextmanager
def _device(ctx: click.Context) -> Iterator[Device]:
    device = Device.open(resolve_home(ctx.obj["home"]))
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


def _plugins(ctx: click.Context, device: Device) -> PluginSet:
    return PluginSet.load(device.config.plugins, enabled=ctx.obj["plugins"])


def _warn(message: str) -> None:
    click.echo(message, err=True)


@cli.command()
@click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False), help="The app's SQLite database.")
@click.option("--profile", "profile_path", required=True, type=click.Path(dir_okay=False), help="Profile YAML.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing on success.")
@click.pass_context
def init(ctx: click.Context, db_path: str, profile_path: str, quiet: bool) -> None:
    """Set up this device: tracking triggers, identity, config (idempotent)."""
    home = resolve_home(ctx.obj["home"])
    me, newly, created = init_device(home, Path(db_path), Path(profile_path))
    verb = "initialised" if created else "already initialised; refreshed"
    _say(f"{verb} {home} (instance {me}); tracking {len(newly)} new table(s)", quiet=quiet)


@cli.group()
def facility() -> None:
    """Facility set-up."""


@facility.command("provision")
@click.option("--facility", "facility_id", required=True, help="Facility id (or dataset id) in the app DB.")
@click.option("--quiet", "-q", is_flag=True)
@click.pass_context
def facility_provision(ctx: click.Context, facility_id: str, quiet: bool) -> None:
    """Make this device the facility's authority (root key and certificate)."""
    with _device(ctx) as device:
        dataset_id, fac = device.resolve_facility(facility_id)
        cert = provision_facility(device.keys, dataset_id=dataset_id, facility_id=fac, profile=device.profile.name)
        _say(f"this device is the authority of facility {fac} (dataset {dataset_id}); certificate {cert.cert_id}", quiet=quiet)


@cli.group()
def cert() -> None:
    """Certificates: request, issue, install."""


@cert.command("request")
@click.option("--facility", "facility_id", required=True)
@click.option("--scope", required=True, help="full, or user:USER_ID")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.pass_context
def cert_request(ctx: click.Context, facility_id: str, scope: str, out_dir: str) -> None:
    """Write a certificate request for the facility's authority; prints its path."""
    with _device(ctx) as device:
        try:
            dataset_id, fac = device.resolve_facility(facility_id)
        except BundlesyncError:
            dataset_id, fac = "", facility_id  # a fresh device may not know the facility yet
        path = request_certificate(device.keys, dataset_id=dataset_id, facility_id=fac, profile=device.profile.name,
                                      scope=scope, instance_id=device.instance_id, out_dir=Path(out_dir))
        click.echo(str(path))


@cert.command("issue")
@click.argument("request", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.pass_context
def cert_issue(ctx: click.Context, request: str, out_dir: str) -> None:
    """On the authority: sign a request; prints the grant's path."""
    with _device(ctx) as device:
        click.echo(str(issue_grant(device.keys, Path(request), Path(out_dir))))


@cert.command("install")
@click.argument("grant", type=click.Path(dir_okay=False))
@click.option("--quiet", "-q", is_flag=True)
@click.pass_context
def cert_install(ctx: click.Context, grant: str, quiet: bool) -> None:
    """Install a grant: this device's certificate and the facility's root."""
    with _device(ctx) as device:
        leaf = install_grant(device.keys, Path(grant))
        _say(f"installed certificate {leaf.cert_id} ({leaf.scope}) for facility {leaf.facility_id}", quiet=quiet)


@cli.command("export")
@click.option("--facility", "facility_id", required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--full", is_flag=True, help="Everything in scope, not only what changed.")
@click.option("--user", "user_id", default=None, help="Only what user USER_ID's single-user device may read.")
@click.option("--since", "since", default=None, type=click.Path(dir_okay=False),
              help="Only what the device that wrote this receipt lacks.")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of the path.")
@click.pass_context
def export_cmd(ctx: click.Context, facility_id: str, out_dir: str, full: bool, user_id: str | None,
               since: str | None, quiet: bool, as_json: bool) -> None:
    """Write what changed as one signed bundle; prints its path (last line)."""
    with _device(ctx) as device:
        if full and since:
            raise click.UsageError("--full and --since exclude each other")
        result = export_bundle(device, facility_id, Path(out_dir), full=full, user=user_id,
                               since=Path(since) if since else None,
                               plugins=_plugins(ctx, device), warn=_warn)
    if as_json:
        click.echo(json.dumps({
            "path": str(result.path) if result.path else None, "bundle_id": result.bundle_id,
            "records": result.records, "counts": result.counts, "bytes": result.size,
            "basis": result.basis, "basis_source": result.basis_source, "result": result.result,
        }, indent=2, sort_keys=True))
        return
    if result.path is None:
        _say(f"nothing new to export for facility {facility_id} ({result.basis_source}); no file written", quiet=quiet)
        return
    _say(f"exported {result.records} records ({result.size} bytes, basis: {result.basis_source})", quiet=quiet)
    click.echo(str(result.path))


@cli.command("import")
@click.argument("bundles", nargs=-1, required=True)
@click.option("--receipt/--no-receipt", default=True, show_default=True,
              help="Leave a signed receipt (what this device holds) next to each bundle.")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def import_cmd(ctx: click.Context, bundles: tuple[str, ...], receipt: bool, quiet: bool, as_json: bool) -> None:
    """Verify, then apply bundles (in the order given); re-importing is a no-op."""
    reports = []
    with _device(ctx) as device:
        plugins = _plugins(ctx, device)
        for name in bundles:
            r = import_bundle(device, Path(name), plugins=plugins, warn=_warn, receipt=receipt)
            dq, ds = r.dequeue, r.deserialize
            reports.append({
                "path": name, "bundle_id": r.bundle_id, "already_imported": r.already,
                "received": dq.received, "outcomes": dq.outcomes, "refused": dq.refused,
                "refused_sample": dq.refused_sample, "not_for_this_device": dq.not_for_us,
                "written": ds.written, "deleted": ds.deleted, "waiting": ds.waiting, "failed": ds.failed,
                "gaps": {k: {"have": h, "need": n} for k, (h, n) in r.gaps.items()},
                "receipt": str(r.receipt) if r.receipt else None,
                "local_changes_serialized": r.local_serialized,
            })
            if as_json:
                continue
            if r.already:
                _say(f"{name}: already imported (bundle {r.bundle_id}); nothing changed", quiet=quiet)
                continue
            o = dq.outcomes
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
    if as_json:
        click.echo(json.dumps(reports, indent=2, sort_keys=True))


@cli.command("verify")
@click.argument("bundle")
@click.option("--quiet", "-q", is_flag=True)
@click.pass_context
def verify_cmd(ctx: click.Context, bundle: str, quiet: bool) -> None:
    """Run every check import runs, without applying anything."""
    with _device(ctx) as device:
        v = verify_bundle(device, Path(bundle))
    _say(f"{bundle}: OK: {v.info.summary.get('records')} records signed by {v.signer.cert_id} "
         f"({v.signer.scope}) for facility {v.manifest.facility_id}", quiet=quiet)


@cli.command("inspect")
@click.argument("bundle")
@click.option("--json", "as_json", is_flag=True)
def inspect_cmd(bundle: str, as_json: bool) -> None:
    """Show a bundle's manifest and summary (structure is checked, trust is not)."""
    info = container.read_info(Path(bundle))
    doc = {"path": bundle, "format_version": info.version, "size": info.size, "manifest": info.manifest,
           "summary": info.summary, "digest": info.digest.hex()}
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
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
        f"basis      {json.dumps(m.get('basis_fsic'), sort_keys=True)}",
        f"result     {json.dumps(m.get('result_fsic'), sort_keys=True)}",
        f"records    {s.get('records')}",
    ]
    counts: Any = s.get("counts", {})
    lines += [f"  {model:<36} {n}" for model, n in sorted(counts.items())]
    click.echo("\n".join(lines))


@cli.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool) -> None:
    """Device identity, facilities, knowledge, pending work and recent transfers."""
    with _device(ctx) as device:
        st = device_status(device)
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
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
    for f in st["facilities"]:
        role = "authority" if f["authority"] else (f["scope"] or "trusted, no certificate")
        lines.append(f"facility   {f['facility_id']} dataset {f['dataset_id']} ({role})")
        for inst, ctr in sorted(f["fsic"].items()):
            lines.append(f"  holds    {inst} up to {ctr}")
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
    with _device(ctx) as device:
        found = list_conflicts(device, model=model, limit=limit or None)
    if as_json:
        click.echo(json.dumps(found, indent=2, sort_keys=True, ensure_ascii=False))
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
@click.option("--facility", "facility_id", required=True)
@click.option("--user", "user_id", required=True, help="The user whose personal data is erased for good.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (needed when not on a terminal).")
@click.option("--quiet", "-q", is_flag=True)
@click.pass_context
def purge_cmd(ctx: click.Context, facility_id: str, user_id: str, yes: bool, quiet: bool) -> None:
    """Erase a user's personal data everywhere (propagates through bundles; cannot be undone)."""
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


@cli.command("reidentify")
@click.option("--quiet", "-q", is_flag=True)
@click.pass_context
def reidentify_cmd(ctx: click.Context, quiet: bool) -> None:
    """Give this device's database a new identity (after it was copied or restored from a backup)."""
    old, new, pending = reidentify(resolve_home(ctx.obj["home"]))
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
        click.echo(json.dumps(loaded, indent=2, sort_keys=True))
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
        cli.main(args=argv, prog_name="bundlesync", standalone_mode=False)
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
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
