"""A device: its home directory, config.yaml, app database, profile and keys.

The home (``--home`` or ``BUNDLESYNC_HOME``, like KOLIBRI_HOME) holds
``config.yaml`` (app DB path, profile path, plugins), the keys (mode 0600) and
certificates (:mod:`bundlesync.trust.keystore`), and ``staging/`` where import copies
a bundle off the removable drive before trusting it. The device's replication
identity (instance id, counter) lives in the app database itself.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bundlesync.replica import db
from bundlesync.errors import ConfigError, StateError
from bundlesync.fsutil import atomic_write_bytes
from bundlesync.trust.keystore import KeyStore
from bundlesync.profile import Profile, bind_profile, is_builtin_name, load_profile
from bundlesync.replica.store import ensure_identity, instance_id
from bundlesync.replica.tracking import install_triggers

__all__ = ["Config", "Device", "init_device", "resolve_home"]

CONFIG_NAME = "config.yaml"
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
    profile: Path | str  # a file, or the name of a built-in profile
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
        profile = raw["profile"] if is_builtin_name(raw["profile"]) else (home / raw["profile"]).absolute()
        return cls(db=(home / raw["db"]).absolute(), profile=profile, plugins=tuple(plugins))

    def save(self, home: Path) -> None:
        """Write ``config.yaml`` atomically, keeping any keys we do not know."""
        path = home / CONFIG_NAME
        existing: dict[str, Any] = {}
        if path.exists():
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
            existing = loaded if isinstance(loaded, dict) else {}
        existing.update({"db": str(self.db), "profile": str(self.profile), "plugins": list(self.plugins)})
        atomic_write_bytes(path, yaml.safe_dump(existing, sort_keys=False).encode("utf-8"))


class Device:
    """An open device: the connection, the bound profile and the key store."""

    def __init__(self, home: Path, config: Config, conn: sqlite3.Connection, profile: Profile) -> None:
        self.home = home
        self.config = config
        self.conn = conn
        self.profile = profile
        self.keys = KeyStore(home)

    @classmethod
    def open(cls, home: Path) -> Device:
        """Open an initialised home; clear errors if anything is missing."""
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
        except BaseException:
            conn.close()
            raise
        return cls(home, config, conn, profile)

    def close(self) -> None:
        """Close the database connection."""
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


def init_device(home: Path, db_path: Path, profile_path: Path | str) -> tuple[str, list[str], bool]:
    """Create or refresh a home; idempotent. Returns (instance id, newly tracked tables, created).

    ``profile_path`` is a YAML file or the name of a built-in profile (kept as a name in config.yaml, so
    the device follows the profile of the bundlesync it runs).
    """
    db_path = db_path.absolute()
    profile_path = profile_path if is_builtin_name(profile_path) else Path(profile_path).absolute()
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
        with db.write_transaction(conn):
            me = ensure_identity(conn)
            newly = install_triggers(conn, bound)
            conn.execute(
                "INSERT INTO bundlesync_meta (key, value) VALUES ('profile', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (f"{bound.name}:{bound.version}",),
            )
    finally:
        conn.close()
    home.mkdir(parents=True, exist_ok=True)
    plugins = Config.load(home).plugins if not created else ()
    Config(db=db_path, profile=profile_path, plugins=plugins).save(home)
    return me, newly, created
