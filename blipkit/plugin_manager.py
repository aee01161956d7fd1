"""The plugin manager: built-in plugins plus third-party ones from the ``blipkit`` entry-point group.

``BLIPKIT_LOAD_PLUGINS=a,b`` loads only those installed plugins (empty: none);
``BLIPKIT_DISABLE_PLUGINS=a,b`` skips those (built-ins included, by module name).
A plugin that fails to import is recorded in ``failed_plugins()`` and the others still work.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import entry_points
from typing import Any

import pluggy

import blipkit.hookspecs as hookspecs
from blipkit.errors import DuplicateNameError, one_line
from blipkit.registry import Registry

__all__ = [
    "DEFAULT_PLUGINS",
    "Registries",
    "failed_plugins",
    "get_plugin_manager",
    "plugin_report",
    "registries",
    "reset",
]

DEFAULT_PLUGINS: tuple[str, ...] = (
    "blipkit.plugins.encoders.openclip",
    "blipkit.plugins.encoders.hf_vision",
    "blipkit.plugins.encoders.efficientnet",
    "blipkit.plugins.encoders.tiny_vit",
    "blipkit.plugins.llms.transformers_lm",
    "blipkit.plugins.llms.gguf_lm",
    "blipkit.plugins.llms.tiny",
    "blipkit.plugins.bridges.qformer",
    "blipkit.plugins.bridges.projectors",
    "blipkit.plugins.objectives.language_modeling",
    "blipkit.plugins.objectives.instruction_tuning",
    "blipkit.plugins.datasets.formats",
    "blipkit.plugins.datasets.llava",
    "blipkit.plugins.datasets.shapes",
    "blipkit.plugins.datasets.webdataset_format",
    "blipkit.plugins.checkpoints.blip2",
    "blipkit.plugins.checkpoints.blip2_export",
    "blipkit.plugins.checkpoints.instructblip",
    "blipkit.recipes",
)

REGISTRY_HOOKS = {
    "encoders": ("register_encoders", "encoder"),
    "bridges": ("register_bridges", "bridge"),
    "llms": ("register_language_models", "llm"),
    "datasets": ("register_datasets", "dataset"),
    "objectives": ("register_objectives", "objective"),
    "recipes": ("register_recipes", "recipe"),
    "exporters": ("register_exporters", "export format"),
}


@dataclass
class _State:
    pm: pluggy.PluginManager
    versions: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    registries: Registries | None = None


@dataclass
class Registries:
    """All registries, filled from every loaded plugin."""

    encoders: Registry
    bridges: Registry
    llms: Registry
    datasets: Registry
    objectives: Registry
    recipes: Registry
    exporters: Registry

    def by_name(self, attr: str) -> Registry:
        """The registry called ``attr`` (``encoders``, ``llms``, ...)."""
        return getattr(self, attr)


_state: _State | None = None


def _env_list(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _load() -> _State:
    from blipkit.version import __version__

    pm = pluggy.PluginManager("blipkit")
    pm.add_hookspecs(hookspecs)
    state = _State(pm)
    disabled = _env_list("BLIPKIT_DISABLE_PLUGINS") or set()
    for module_name in DEFAULT_PLUGINS:
        if module_name in disabled or module_name.rsplit(".", 1)[-1] in disabled:
            continue
        try:
            module = importlib.import_module(module_name)
        except Exception as err:
            state.failed[module_name] = one_line(f"{type(err).__name__}: {err}")
            continue
        pm.register(module, name=module_name)
        state.versions[module_name] = __version__

    allowed = _env_list("BLIPKIT_LOAD_PLUGINS")
    for ep in entry_points(group="blipkit"):
        dist_name = ep.dist.name if ep.dist is not None else ep.name
        names = {ep.name, dist_name}
        if allowed is not None and not names & allowed:
            continue
        if names & disabled or pm.has_plugin(ep.name):
            continue
        try:
            module = ep.load()
        except Exception as err:
            state.failed[ep.name] = one_line(f"{type(err).__name__}: {err}")
            continue
        pm.register(module, name=ep.name)
        state.versions[ep.name] = ep.dist.version if ep.dist is not None else "unknown"
    return state


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading plugins on first use."""
    return _get_state().pm


def _get_state() -> _State:
    global _state
    if _state is None:
        _state = _load()
    return _state


def reset() -> None:
    """Forget loaded plugins and registries, so the next call loads them again (used by tests)."""
    global _state
    _state = None


def failed_plugins() -> dict[str, str]:
    """Plugins that raised while loading or registering: name -> one-line error."""
    state = _get_state()
    registries()
    return dict(state.failed)


def _call_hook(state: _State, hook_name: str, registry: Registry) -> None:
    """Call one plugin after another; one that raises is recorded as failed and the others still register.
    Two plugins claiming one name stop everything: which one wins would be an accident."""
    hook = getattr(state.pm.hook, hook_name)
    for impl in reversed(hook.get_hookimpls()):
        register = partial(registry.register, plugin=impl.plugin_name)
        try:
            impl.function(register=register)
        except DuplicateNameError:
            raise
        except Exception as err:
            state.failed[impl.plugin_name] = one_line(f"{hook_name}: {type(err).__name__}: {err}")


def _unknown_name_hint(attr: str, failed: dict[str, str]) -> str:
    """What an unknown-name error adds: where to list the names, and the plugins that failed to load (the
    name may be theirs)."""
    hint = f"List them with: blipkit {attr}"
    if failed:
        hint += f". Plugins that failed to load (blipkit plugins tells why): {', '.join(failed)}"
    return hint


def registries() -> Registries:
    """Registries filled by every loaded plugin (built once per process)."""
    state = _get_state()
    if state.registries is None:
        built: dict[str, Registry] = {}
        for attr, (hook_name, kind) in REGISTRY_HOOKS.items():
            registry = Registry(kind)
            _call_hook(state, hook_name, registry)
            built[attr] = registry
        for attr, registry in built.items():
            registry.hint = _unknown_name_hint(attr, state.failed)
        state.registries = Registries(**built)
    return state.registries


def plugin_report() -> list[dict[str, Any]]:
    """Each plugin: its name, version, whether it is built in, what it registered, or its load error."""
    state = _get_state()
    regs = registries()
    report: list[dict[str, Any]] = []
    for name in state.versions:
        registered: dict[str, list[str]] = {}
        for attr in REGISTRY_HOOKS:
            names = [e.name for e in regs.by_name(attr) if e.plugin == name]
            if names:
                registered[attr] = names
        plugin = state.pm.get_plugin(name)
        hooks = sorted(h.name for h in state.pm.get_hookcallers(plugin) or []) if plugin else []
        report.append(
            {
                "name": name,
                "version": state.versions[name],
                "builtin": name in DEFAULT_PLUGINS,
                "hooks": hooks,
                "registered": registered,
                "error": state.failed.get(name),
            }
        )
    for name, error in state.failed.items():
        if name not in state.versions:
            report.append(
                {"name": name, "version": None, "builtin": name in DEFAULT_PLUGINS, "hooks": [], "registered": {}, "error": error}
            )
    return report
