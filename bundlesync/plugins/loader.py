"""Finding plugins and running their operations and hooks around a sync.

Plugins come from the entry-point group ``bundlesync.plugins`` (any installed
distribution) and from the ``plugins:`` list of import paths in the home's
``config.yaml`` (``package.module`` or ``package.module:HookClass``). Importing a
plugin module runs its ``@register_hook`` decorators; the hook classes that
appear are credited to that plugin. ``--no-plugins`` (or
``BUNDLESYNC_NO_PLUGINS=1``) loads none, which is also how a device opts out of
third-party code on the import path.

pluggy was considered and not used: the contract asked for is
Kolibri's class-based one (operation lists per stage, two transfer methods),
failures must be isolated per hook rather than propagated, and the entry-point
scan is one call to :mod:`importlib.metadata`.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from bundlesync.errors import PluginError
from bundlesync.plugins.hooks import FacilityDataSyncHook, registered_hooks
from bundlesync.plugins.operations import LocalOperation, Stage, SyncContext

if TYPE_CHECKING:
    from bundlesync.device import Device

__all__ = ["ENTRY_POINT_GROUP", "LoadedPlugin", "PluginSet", "plugins_disabled"]

ENTRY_POINT_GROUP = "bundlesync.plugins"
DISABLE_ENV = "BUNDLESYNC_NO_PLUGINS"

Warn = Callable[[str], None]


def plugins_disabled() -> bool:
    """True when the environment turns plugins off."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in {"1", "true", "yes"}


@dataclass(frozen=True)
class LoadedPlugin:
    """One loaded plugin and the hook instances it brought."""

    name: str
    version: str | None
    source: str
    hooks: tuple[FacilityDataSyncHook, ...]

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for ``bundlesync plugins``."""
        return {
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "hooks": [type(h).__qualname__ for h in self.hooks],
            "operations": {
                stage.value: [op.name for op in getattr(h, stage.attribute)]
                for h in self.hooks for stage in Stage if getattr(h, stage.attribute)
            },
        }


def _module_version(module: ModuleType) -> str | None:
    top = module.__name__.split(".")[0]
    for dist in metadata.packages_distributions().get(top, []):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    version = getattr(module, "__version__", None)
    return str(version) if version is not None else None


def _load(name: str, source: str, loader: Callable[[], Any], version: str | None,
          seen: set[type[FacilityDataSyncHook]]) -> LoadedPlugin:
    before = set(registered_hooks())
    try:
        obj = loader()
    except Exception as exc:  # noqa: BLE001 - any import-time failure of third-party code
        raise PluginError(
            f"plugin {name} ({source}) failed to load: {type(exc).__name__}: {exc}; fix or remove it, "
            "or run bundlesync with --no-plugins"
        ) from exc
    classes = [c for c in registered_hooks() if c not in before]
    if isinstance(obj, type) and issubclass(obj, FacilityDataSyncHook) and obj not in classes:
        classes.append(obj)
    if isinstance(obj, ModuleType) and not classes:
        # Imported earlier (e.g. listed twice): credit the hooks its module defines.
        classes = [c for c in registered_hooks() if c.__module__ == obj.__name__]
    if version is None and isinstance(obj, ModuleType):
        version = _module_version(obj)
    fresh = [c for c in classes if c not in seen]
    seen.update(fresh)
    try:
        hooks = tuple(c() for c in fresh)
    except Exception as exc:  # noqa: BLE001
        raise PluginError(f"plugin {name}: creating its hook failed: {type(exc).__name__}: {exc}") from exc
    return LoadedPlugin(name, version, source, hooks)


def _import_path(path: str) -> Callable[[], Any]:
    def load() -> Any:
        module_name, _, attr = path.partition(":")
        module = importlib.import_module(module_name)
        return getattr(module, attr) if attr else module

    return load


class PluginSet:
    """The plugins of one run, plus the built-in work of the pipeline being run."""

    def __init__(self, plugins: Sequence[LoadedPlugin] = ()) -> None:
        self.plugins = tuple(plugins)

    @classmethod
    def load(cls, config_paths: Iterable[str] = (), *, enabled: bool = True) -> PluginSet:
        """Load entry-point plugins, then the config's import paths."""
        if not enabled or plugins_disabled():
            return cls()
        seen: set[type[FacilityDataSyncHook]] = set()
        loaded: list[LoadedPlugin] = []
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            version = ep.dist.version if ep.dist is not None else None
            loaded.append(_load(ep.name, "entry point", ep.load, version, seen))
        for path in config_paths:
            loaded.append(_load(path, "config.yaml", _import_path(path), None, seen))
        return cls(loaded)

    @classmethod
    def for_device(cls, device: Device, *, enabled: bool = True) -> PluginSet:
        """What a device runs: entry points, then its home's ``plugins:``, then its profile's
        (e.g. the Kolibri profile's single-user lessons); each import path once."""
        return cls.load(dict.fromkeys((*device.config.plugins, *device.profile.plugins)), enabled=enabled)

    def operations(self, stage: Stage) -> list[tuple[LoadedPlugin, LocalOperation]]:
        """Plugin operations of a stage, higher priority first (stable in load order)."""
        found = [(p, op) for p in self.plugins for h in p.hooks for op in getattr(h, stage.attribute)]
        return sorted(found, key=lambda item: -int(getattr(item[1], "priority", 0)))

    def manifest_entries(self, stages: Sequence[Stage]) -> list[dict[str, Any]]:
        """The plugin operations an export runs, for the bundle's manifest."""
        return [
            {"plugin": p.name, "version": p.version, "operation": op.name, "stage": stage.value}
            for stage in stages for p, op in self.operations(stage)
        ]

    def run_operations(self, stage: Stage, context: SyncContext) -> None:
        """The plugins' operations of a stage, by priority (in whatever transaction the caller holds)."""
        context.stage = stage
        for plugin, op in self.operations(stage):
            try:
                op.handle_initial(context)
            except Exception as exc:  # noqa: BLE001 - plugin code: report who failed, then fail the sync
                outcome = ("no bundle was written" if context.is_export else
                           "the import stopped before it was recorded; import the bundle again to complete it")
                raise PluginError(
                    f"operation {op.name} of plugin {plugin.name} failed at {stage.name} during {context.direction}: "
                    f"{type(exc).__name__}: {exc}; {outcome} (fix the plugin or run with --no-plugins)"
                ) from exc

    def run_builtin(self, stage: Stage, context: SyncContext, builtin: FacilityDataSyncHook) -> None:
        """bundlesync's own work of a stage (its operations on ``builtin``)."""
        context.stage = stage
        for op in getattr(builtin, stage.attribute):
            op.handle_initial(context)

    def run_stage(self, stage: Stage, context: SyncContext, builtin: FacilityDataSyncHook) -> None:
        """Run a stage: plugin operations by priority, then the built-in work."""
        self.run_operations(stage, context)
        self.run_builtin(stage, context, builtin)

    def transfer_hooks(self, which: str, context: SyncContext, warn: Warn) -> None:
        """Call every plugin's ``pre_transfer``/``post_transfer``; failures only warn."""
        local_single = (context.local_scope or "").startswith("user:")
        remote_single = (context.remote_scope or "").startswith("user:")
        single_user = next(
            (s.split(":", 1)[1] for s in (context.local_scope, context.remote_scope) if s and s.startswith("user:")),
            None,
        )
        for plugin in self.plugins:
            for hook in plugin.hooks:
                try:
                    getattr(hook, which)(context.dataset_id, local_single, remote_single, single_user, context)
                except Exception as exc:  # noqa: BLE001 - hooks are fail-tolerant by contract
                    warn(f"warning: {which} hook {type(hook).__qualname__} of plugin {plugin.name} failed: "
                         f"{type(exc).__name__}: {exc} (the sync went on)")
