"""A device: its home directory, config.yaml, app database, profile and keys.

The home (``--home`` or ``BUNDLESYNC_HOME``, like KOLIBRI_HOME) holds
``config.yaml`` (app DB path, profile path, plugins), the keys (mode 0600) and
certificates (:mod:`bundlesync.trust.keystore`), ``staging/`` where import copies
a bundle off the removable drive before trusting it, and ``identity.json``.

The device's replication identity (instance id, counter) lives in the app database
itself, so a database copied from another device or restored from an older backup
would carry the wrong one: two devices writing under one id, or counters used twice.
``identity.json`` is the home's memory of the identity it was set up with and of the
highest counter it has seen; :meth:`Device.open` refuses a database that disagrees
(``bundlesync reidentify`` gives it a new identity). Opening also checks that the
change log can be trusted (:mod:`bundlesync.replica.health`) and repairs it if not.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bundlesync.replica import db
from bundlesync.errors import BundlesyncError, ConfigError, StateError
from bundlesync.fsutil import atomic_write_bytes
from bundlesync.trust.keystore import KeyStore
from bundlesync.profile import Profile, bind_profile, load_profile
from bundlesync.replica.health import Repair, ensure_tracking, record_repair
from bundlesync.replica.store import current_counter, ensure_identity, instance_id, new_identity

__all__ = ["Config", "Device", "HomeIdentity", "init_device", "reidentify", "resolve_home"]

CONFIG_NAME = "config.yaml"
IDENTITY_NAME = "identity.json"
HOME_ENV = "BUNDLESYNC_HOME"


def resolve_home(home: str | Path | None) -> Path:
    """The home given on the command line, else ``$BUNDLESYNC_HOME``."""
    chosen = home if home is not None else os.environ.get(HOME_ENV)
    if not chosen:
        raise ConfigError(f"no device home: pass --home DIR or set {HOME_ENV}")
    return Path(chosen).expanduser().absolute()


@dataclass(frozen=True)
class Config:
    """The contents of ``config.yaml``."""

    db: Path
    profile: Path
    plugins: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def load(cls, home: Path) -> Config:
        """Read and check ``<home>/config.yaml``."""
        path = home / CONFIG_NAME
        if not path.exists():
            raise StateError(f"{home} is not an initialised bundlesync home: run `bundlesync init --db APP.sqlite3 --profile PROFILE.yaml` first")
        try:
            raw: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}".replace("\n", " ")) from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("db"), str) or not isinstance(raw.get("profile"), str):
            raise ConfigError(f"{path} must be a mapping with 'db' and 'profile' paths: fix it or re-run `bundlesync init`")
        plugins = raw.get("plugins") or []
        if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
            raise ConfigError(f"{path}: 'plugins' must be a list of import paths")
        return cls(db=(home / raw["db"]).absolute(), profile=(home / raw["profile"]).absolute(), plugins=tuple(plugins))

    def save(self, home: Path) -> None:
        """Write ``config.yaml`` atomically, keeping any keys we do not know."""
        path = home / CONFIG_NAME
        existing: dict[str, Any] = {}
        if path.exists():
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
            existing = loaded if isinstance(loaded, dict) else {}
        existing.update({"db": str(self.db), "profile": str(self.profile), "plugins": list(self.plugins)})
        atomic_write_bytes(path, yaml.safe_dump(existing, sort_keys=False).encode("utf-8"))


@dataclass(frozen=True)
class HomeIdentity:
    """``identity.json``: the instance id a home was set up with and the highest counter it saw."""

    instance_id: str
    counter: int

    @classmethod
    def load(cls, home: Path) -> HomeIdentity | None:
        """The home's identity, or None if it has none yet (a home set up by an older version)."""
        path = home / IDENTITY_NAME
        try:
            raw: Any = json.loads(path.read_text(encoding="utf-8"))
            return cls(str(raw["instance_id"]), int(raw["counter"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            reason = str(exc).replace("\n", " ")
            raise ConfigError(f"cannot read {path} ({reason}); restore it from a backup, or delete it to "
                              "accept the database's identity as this home's") from exc

    def save(self, home: Path) -> None:
        """Write ``identity.json`` atomically."""
        text = json.dumps({"instance_id": self.instance_id, "counter": self.counter}, indent=2) + "\n"
        atomic_write_bytes(home / IDENTITY_NAME, text.encode("utf-8"))


def check_identity(home: Path, db_path: Path, conn: sqlite3.Connection) -> None:
    """Refuse a database whose identity is not the one this home remembers (copied, replaced, restored)."""
    mine = HomeIdentity.load(home)
    inst, counter = instance_id(conn), current_counter(conn)
    if mine is None:
        HomeIdentity(inst, counter).save(home)  # a home from before identities were kept: adopt its database's
        return
    fix = "run `bundlesync reidentify` to give the database a new identity of its own (pending changes are kept)"
    if inst != mine.instance_id:
        raise StateError(
            f"{db_path} carries device identity {inst[:8]}, but this home was set up with {mine.instance_id[:8]}: "
            f"the database was copied from another device or replaced; {fix}")
    if counter < mine.counter:
        raise StateError(
            f"{db_path} is behind this home: its counter {counter} is below {mine.counter}, the highest this home "
            f"has seen (restored from an older backup?), so it would reuse counters; {fix}")


class Device:
    """An open device: the connection, the bound profile and the key store."""

    def __init__(self, home: Path, config: Config, conn: sqlite3.Connection, profile: Profile) -> None:
        self.home = home
        self.config = config
        self.conn = conn
        self.profile = profile
        self.keys = KeyStore(home)
        self.repairs: list[Repair] = []

    @classmethod
    def open(cls, home: Path, *, check: bool = True) -> Device:
        """Open an initialised home; clear errors if anything is missing.

        With ``check`` (every command but ``reidentify``) the database must carry the
        identity the home remembers. Tracking is always checked, and repaired if the
        app or the profile took it away (:attr:`repairs` says what was done).
        """
        config = Config.load(home)
        conn = db.connect(config.db)
        try:
            has_tables = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE name = 'bundlesync_meta'"
            ).fetchone()[0]
            if not has_tables:
                raise StateError(f"{config.db} has no bundlesync tables: run `bundlesync init` again")
            db.migrate(conn)
            profile = bind_profile(load_profile(config.profile), conn)
            if check:
                check_identity(home, config.db, conn)
            device = cls(home, config, conn, profile)
            device.repairs = ensure_tracking(conn, profile)
        except BaseException:
            conn.close()
            raise
        return device

    def close(self) -> None:
        """Remember the highest counter this home has seen, then close the database connection."""
        try:
            mine = HomeIdentity.load(self.home)
            if mine is not None and mine.instance_id == self.instance_id:
                counter = current_counter(self.conn)
                if counter > mine.counter:
                    HomeIdentity(mine.instance_id, counter).save(self.home)
        except (sqlite3.Error, OSError, BundlesyncError):
            pass  # only sharpens a later check; the run itself already succeeded or failed
        finally:
            self.conn.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def instance_id(self) -> str:
        """This device database's replication identity."""
        return instance_id(self.conn)

    @property
    def staging(self) -> Path:
        """Where import keeps its private copy of a bundle while it verifies and applies it."""
        path = self.home / "staging"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def resolve_facility(self, facility: str) -> tuple[str, str]:
        """``--facility`` (a facility id or a dataset id) -> ``(dataset_id, facility_id)``."""
        for dataset_id in self.keys.datasets():
            root = self.keys.trusted_root(dataset_id)
            if root is not None and facility in (root.dataset_id, root.facility_id):
                return root.dataset_id, root.facility_id
        lookup = self.profile.facility
        where = f" AND ({lookup.where})" if lookup.where else ""
        try:
            row = self.conn.execute(
                f"SELECT {db.q(lookup.dataset_column)}, {db.q(lookup.id_column)} FROM {db.q(lookup.table)} "
                f"WHERE ({db.q(lookup.id_column)} = ? OR {db.q(lookup.dataset_column)} = ?){where} LIMIT 1",
                (facility, facility),
            ).fetchone()
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"cannot look up facility {facility} in {lookup.table}: {exc}") from exc
        if row is None:
            raise StateError(
                f"unknown facility {facility}: it is not in {self.config.db.name} and no certificate for it is installed "
                "(check the id, or install a grant with `bundlesync cert install`)"
            )
        return str(row[0]), str(row[1])


def init_device(home: Path, db_path: Path, profile_path: Path) -> tuple[str, list[str], bool]:
    """Create or refresh a home; idempotent. Returns (instance id, newly tracked tables, created).

    Re-running it applies a changed profile (tables added are tracked and their rows
    queued, tables removed lose their triggers and pending changes) and repairs missing
    tracking. A database whose identity differs from the one the home remembers is
    refused, as by every other command.
    """
    db_path, profile_path = db_path.absolute(), profile_path.absolute()
    created = not (home / CONFIG_NAME).exists()
    if not created:
        existing = Config.load(home)
        if existing.db != db_path:
            raise ConfigError(
                f"{home} is already initialised for {existing.db}; use another --home for {db_path}"
            )
    profile = load_profile(profile_path)
    conn = db.connect(db_path)
    try:
        bound = bind_profile(profile, conn)
        db.migrate(conn)
        known = conn.execute("SELECT 1 FROM bundlesync_meta WHERE key = 'instance_id'").fetchone() is not None
        if known and not created:
            check_identity(home, db_path, conn)
        with db.write_transaction(conn):
            me = ensure_identity(conn)
            conn.execute(
                "INSERT INTO bundlesync_meta (key, value) VALUES ('profile', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (f"{bound.name}:{bound.version}",),
            )
        newly = [r.table for r in ensure_tracking(conn, bound, record=known) if r.what != "removed"]
        if not known:
            newly = [t.name for t in bound.tables]
        home.mkdir(parents=True, exist_ok=True)
        mine = HomeIdentity.load(home)
        if mine is None or mine.instance_id != me:
            HomeIdentity(me, current_counter(conn)).save(home)
    finally:
        conn.close()
    plugins = Config.load(home).plugins if not created else ()
    Config(db=db_path, profile=profile_path, plugins=plugins).save(home)
    return me, newly, created


def reidentify(home: Path) -> tuple[str, str, int]:
    """Give the home's database a new instance id (counter from 0); returns (old id, new id, pending changes).

    The way out when the database was copied from another device or restored from an
    older backup. Nothing is lost: stored versions keep their writers, pending changes
    serialize under the new id, and the home remembers the new identity.
    """
    with Device.open(home, check=False) as device:
        conn = device.conn
        with db.write_transaction(conn):
            old, new = new_identity(conn)
            record_repair(conn, "", f"reidentified (was {old})", 0)
        pending = int(conn.execute("SELECT count(*) FROM bundlesync_changes").fetchone()[0])
        HomeIdentity(new, 0).save(home)
    return old, new, pending
