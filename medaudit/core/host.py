"""The plugin host: a pluggy manager built on demand, and the registry of components.

Nothing is loaded on import: call :func:`get_host`. Loading order: the built-in plugins,
then every entry point in the ``medaudit`` group (each imported on its own, so a broken
vendor package is reported by name and skipped), then ``check_pending()``.

Environment controls:

``MEDAUDIT_LOAD_PLUGINS``
    comma-separated entry-point names to load (allowlist); empty means none.
``MEDAUDIT_DISABLE_PLUGINS``
    comma-separated entry-point names never to load (blocklist).
``MEDAUDIT_TRACE_PLUGINS``
    ``1`` prints every hook call, its implementations and results to stderr.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import logging
import os
import pkgutil
import sys
from types import ModuleType
from typing import Any

import pluggy

from medaudit.core import hookspecs
from medaudit.core.components import KINDS, Component, component_info
from medaudit.core.errors import PluginError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "medaudit"

#: The package of the built-in plugins: one sub-package per kind (``datasets``, ``attacks``...).
BUILTIN_PACKAGE = "medaudit.plugins"


def builtin_plugins() -> tuple[str, ...]:
    """Every public module (no leading ``_``) of the kind sub-packages of
    :data:`BUILTIN_PACKAGE`, in name order: a new built-in family is a new module there and
    registers exactly as a vendor's plugin does, with no list to edit."""
    root = importlib.import_module(BUILTIN_PACKAGE)
    names = []
    for kind in sorted(pkgutil.iter_modules(root.__path__), key=lambda m: m.name):
        if kind.ispkg:
            package = importlib.import_module(f"{BUILTIN_PACKAGE}.{kind.name}")
            names += [f"{package.__name__}.{m.name}" for m in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name)
                      if not m.name.startswith("_") and not m.ispkg]
    return tuple(names)


#: Built-in plugin modules, registered exactly as vendor plugins are.
BUILTIN_PLUGINS = builtin_plugins()


@dataclasses.dataclass
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    builtin: bool


@dataclasses.dataclass
class FailedPlugin:
    name: str
    distribution: str | None
    error: str


class Host:
    """The plugin manager plus the components its plugins registered."""

    def __init__(self, pm: pluggy.PluginManager, plugins: dict[str, PluginInfo], failed: list[FailedPlugin]):
        self.pm = pm
        self.plugins = plugins
        self.failed = failed
        self.components: dict[str, dict[str, type[Component]]] = {kind: {} for kind in KINDS}
        self._collect()

    def _collect(self) -> None:
        for kind, (base, hook_name) in KINDS.items():
            caller = getattr(self.pm.hook, hook_name)
            # Call each implementation on its own so every component knows its plugin.
            for impl in caller.get_hookimpls():

                def register(cls: Any, _plugin: str = impl.plugin_name, _kind: str = kind, _base=base) -> None:
                    self._register(_kind, _base, cls, _plugin)

                impl.function(**{arg: register for arg in impl.argnames})

    def _register(self, kind: str, base: type, cls: Any, plugin: str) -> None:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(
                f"plugin {plugin!r} registered {cls!r} as a {kind}, but it is not a subclass of {base.__name__}"
            )
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered {cls.__name__} without a 'name'")
        table = self.components[kind]
        if name in table:
            other = table[name].plugin
            raise PluginError(
                f"two plugins register a {kind} named {name!r}: {other!r} and {plugin!r}; "
                f"disable one with MEDAUDIT_DISABLE_PLUGINS"
            )
        cls.plugin = plugin
        table[name] = cls

    def get(self, kind: str, name: str) -> type[Component]:
        """The component class, or a :class:`KeyError` whose message suggests a close name."""
        table = self.components[kind]
        if name in table:
            return table[name]
        raise KeyError(unknown_name_message(kind, name, table))

    def plugin_of(self, cls: type[Component]) -> PluginInfo | None:
        return self.plugins.get(cls.plugin)

    def component_rows(self) -> list[dict[str, Any]]:
        """One row per registered component, by kind and name: what ``medaudit plugins --json``
        prints and the documentation's components page lists (params as JSON Schema)."""
        rows = []
        for kind, table in self.components.items():
            for name, cls in sorted(table.items()):
                info = self.plugin_of(cls)
                rows.append({"kind": kind, **component_info(cls), "plugin": cls.plugin,
                             "distribution": info.distribution if info else None,
                             "version": info.version if info else None})
        return rows


def unknown_name_message(kind: str, name: str, known: Any) -> str:
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind.replace('_', ' ')} {name!r}{hint} (available: {', '.join(known) or 'none'})"


def _env_list(var: str) -> list[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return [part.strip() for part in raw.split(",") if part.strip()]


def get_host(*, load_entry_points: bool = True, extra_plugins: list[tuple[str, object]] = ()) -> Host:
    """Build a fresh plugin manager and registry.

    :param load_entry_points: load vendor plugins from the ``medaudit`` entry-point group.
    :param extra_plugins: ``(name, plugin)`` pairs registered after the built-ins (tests).
    """
    pm = pluggy.PluginManager("medaudit")
    pm.add_hookspecs(hookspecs)
    plugins: dict[str, PluginInfo] = {}
    failed: list[FailedPlugin] = []
    version = _own_version()

    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
        plugins[module_name] = PluginInfo(module_name, "medaudit", version, builtin=True)

    if load_entry_points:
        _load_entry_points(pm, plugins, failed)

    for name, plugin in extra_plugins:
        pm.register(plugin, name=name)
        plugins[name] = PluginInfo(name, None, None, builtin=False)

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r}: {exc}") from exc

    if os.environ.get("MEDAUDIT_TRACE_PLUGINS") == "1":
        _trace(pm)
    return Host(pm, plugins, failed)


def _load_entry_points(pm: pluggy.PluginManager, plugins: dict[str, PluginInfo], failed: list[FailedPlugin]) -> None:
    allow = _env_list("MEDAUDIT_LOAD_PLUGINS")
    block = set(_env_list("MEDAUDIT_DISABLE_PLUGINS") or ())
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if (allow is not None and ep.name not in allow) or ep.name in block:
            continue
        if pm.has_plugin(ep.name):
            continue
        dist = ep.dist.name if ep.dist else None
        try:
            plugin = ep.load()
            if not isinstance(plugin, ModuleType) and isinstance(plugin, type):
                plugin = plugin()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a vendor's bug must not take the CLI down
            message = f"{type(exc).__name__}: {exc}"
            log.warning("plugin %r (%s) failed to load and was skipped: %s", ep.name, dist, message)
            failed.append(FailedPlugin(ep.name, dist, message))
            continue
        plugins[ep.name] = PluginInfo(ep.name, dist, ep.dist.version if ep.dist else None, builtin=False)


def _trace(pm: pluggy.PluginManager) -> None:
    def before(hook_name, hook_impls, kwargs):
        print(f"medaudit hook {hook_name}({', '.join(kwargs)}) -> {[i.plugin_name for i in hook_impls]}", file=sys.stderr)

    def after(outcome, hook_name, hook_impls, kwargs):
        print(f"medaudit hook {hook_name} returned {outcome.get_result()!r}", file=sys.stderr)

    pm.add_hookcall_monitoring(before, after)


def _own_version() -> str:
    from medaudit import __version__

    return __version__
