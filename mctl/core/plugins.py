"""The plugin manager: built-ins first, then entry points of group `mctl`.

`MCTL_DISABLE_PLUGINS=a,b` blocks plugins by name; `MCTL_LOAD_PLUGINS=a,b` loads only those
entry-point plugins (built-ins always load).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Any, TypeVar

import pluggy

from mctl.core import hookspecs
from mctl.core.plugin_types import _Registration
from mctl.exception import InvalidError

log = logging.getLogger("mctl.plugins")

BUILTIN_PLUGINS = (
    "mctl.plugins.scheduler_local",
    "mctl.plugins.scheduler_slurm",
    "mctl.plugins.scheduler_nomad",
    "mctl.plugins.image_local",
    "mctl.plugins.image_venv",
    "mctl.plugins.image_oci",
    "mctl.plugins.secrets_local",
    "mctl.plugins.secrets_vault",
    "mctl.plugins.volumes_local",
    "mctl.plugins.volumes_store",
    "mctl.plugins.gpu_nvidia",
)

R = TypeVar("R", bound=_Registration)


def _names(var: str) -> set[str]:
    return {n.strip() for n in os.environ.get(var, "").split(",") if n.strip()}


@functools.lru_cache(maxsize=None)
def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("mctl")
    pm.add_hookspecs(hookspecs)
    blocked = _names("MCTL_DISABLE_PLUGINS")
    for name in blocked:
        pm.set_blocked(name)
    for module_name in BUILTIN_PLUGINS:
        if module_name not in blocked:
            pm.register(importlib.import_module(module_name), name=module_name)
    load_entry_points(pm, _names("MCTL_LOAD_PLUGINS") or None)
    pm.check_pending()
    return pm


def load_entry_points(pm: pluggy.PluginManager, allow: set[str] | None) -> None:
    """Load entry points of group `mctl`; a broken one is logged with its name and skipped."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="mctl"):
        if allow is not None and ep.name not in allow:
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            log.warning('Error importing plugin "%s" (%s): %s; skipping it.', ep.name, ep.value, exc)
            continue
        pm.register(plugin, name=ep.name)
        dist = getattr(ep, "dist", None)
        if dist is not None:
            pm._plugin_distinfo.append((plugin, dist))  # so list_plugin_distinfo shows versions


def registrations(hook_name: str) -> list[Any]:
    """Collect what every plugin registered for `hook_name`, flattened, conflicts refused."""
    pm = get_plugin_manager()
    hook = getattr(pm.hook, hook_name)
    found: dict[str, tuple[str, Any]] = {}
    for impl in reversed(hook.get_hookimpls()):  # built-ins first
        result = impl.function()
        items = [result] if isinstance(result, _Registration) else list(result or ())
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
        for item in items:
            if item.name in found:
                raise InvalidError(
                    f"Conflicting plugins found for `{hook_name.removeprefix('mctl_register_')}`: "
                    f"{item.name!r} from {found[item.name][0]} and {plugin_name}; disable one with "
                    "MCTL_DISABLE_PLUGINS.")
            found[item.name] = (plugin_name, item)
    return [item for _, item in found.values()]


def find(hook_name: str, name: str) -> Any:
    for item in registrations(hook_name):
        if item.name == name:
            return item
    available = ", ".join(sorted(i.name for i in registrations(hook_name))) or "none"
    kind = hook_name.removeprefix("mctl_register_").rstrip("s")
    raise InvalidError(f"No {kind} plugin named {name!r}; available: {available}. "
                       "Install the plugin package or fix the name.")


def describe() -> list[dict[str, Any]]:
    """Every plugin with its version and the hooks it implements (for `mctl plugins`)."""
    pm = get_plugin_manager()
    versions = {id(plugin): dist.version for plugin, dist in pm.list_plugin_distinfo()}
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or ())
        out.append({"name": name, "version": versions.get(id(plugin)),
                    "builtin": name in BUILTIN_PLUGINS, "hooks": hooks})
    return out
