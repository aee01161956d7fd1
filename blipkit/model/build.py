"""Assembling a model: the recipe's parts from the registries, and a saved run directory read back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from blipkit.config import ComponentConfig, Recipe
from blipkit.errors import BlipkitError, ConfigError, DataError, one_line
from blipkit.interfaces import Bridge, Encoder, LanguageModel
from blipkit.io import read_json
from blipkit.model.lora import LoraSettings, apply_bridge_lora, apply_llm_lora, load_bridge_lora, load_llm_adapter
from blipkit.model.persistence import META_FILE, checkpoint_dir, meta_recipe, read_meta, weights_dir
from blipkit.model.vlm import VisionLanguageModel

__all__ = ["add_language_model", "build_model", "load_bridge", "load_model"]


def _registries() -> Any:
    from blipkit.plugin_manager import registries

    return registries()


_PARTS = {"encoders": ("encoder", Encoder), "bridges": ("bridge", Bridge), "llms": ("language model", LanguageModel)}


def _checked(registry: str, name: str, built: Any) -> Any:
    """``built`` when it is what a ``registry`` factory must return; else a one-line error naming the plugin."""
    what, expected = _PARTS[registry]
    if not isinstance(built, expected):
        plugin = _registries().by_name(registry).resolve(name).entry.plugin
        raise BlipkitError(
            f"{what} '{name}' of plugin '{plugin}' gave a {type(built).__name__}, not a blipkit {expected.__name__}; "
            f"fix or disable the plugin (BLIPKIT_DISABLE_PLUGINS={plugin})"
        )
    return built


def _create(registry: str, name: str, **options: Any) -> Any:
    """Build ``name`` from the registry called ``registry`` (``encoders``, ``bridges``, ``llms``), checking its type."""
    return _checked(registry, name, _registries().by_name(registry).create(name, **options))


def load_bridge(name: str, path: str | Path) -> Bridge:
    """Load a bridge registered as ``name`` from a saved directory or from a run directory.

    A damaged directory (unreadable config.json, weights that do not fit it) is a DataError that names it.
    """
    entry = _registries().bridges.resolve(name).entry
    directory = Path(path)
    if (directory / META_FILE).exists():
        directory = weights_dir(directory, "bridge")
    if not (directory / "config.json").exists():
        raise ConfigError(f"{path} holds no saved bridge (no config.json); give a run directory or a bridge directory")
    loader = getattr(entry.factory, "from_pretrained", None)
    if loader is None:
        raise ConfigError(f"bridge '{name}' cannot be loaded from a directory (its plugin has no from_pretrained)")
    if not isinstance(read_json(directory / "config.json"), dict):
        raise DataError(f"{directory / 'config.json'} is not a bridge config (not a JSON object); restore it or train again")
    try:
        bridge = loader(directory)
    except BlipkitError:
        raise
    except (RuntimeError, TypeError, ValueError, KeyError) as err:
        # load_state_dict's size and key mismatches, or config keys the bridge does not take.
        detail = one_line(err)
        raise DataError(
            f"{directory}: config.json and model.safetensors do not fit together as a '{name}' bridge "
            f"({detail[:300]}); the directory is damaged or mixed up: restore it or train again"
        ) from err
    return _checked("bridges", name, bridge)


def _make_bridge(config: ComponentConfig, slot: str, **dims: int) -> Bridge:
    if config.pretrained:
        return load_bridge(config.name, weights_dir(Path(config.pretrained), slot) if slot == "projection" else config.pretrained)
    return _create("bridges", config.name, **dims, **config.options)


def _apply_bridge_tuning(bridge: Bridge, config: ComponentConfig) -> Bridge:
    if config.tuning == "lora":
        settings = dict(config.lora or {})
        always = settings.pop("always_trainable", None)
        apply_bridge_lora(bridge, LoraSettings(**settings), always)
    return bridge


def build_model(recipe: Recipe, with_llm: bool = True, frozen_dtype: torch.dtype | None = None) -> VisionLanguageModel:
    """Materialise the recipe's parts; without ``with_llm`` (stage 1) no LLM or projection is loaded.

    ``frozen_dtype``: what to store the frozen encoder and LLM in (training on GPU keeps them in half
    precision), None to keep them as their plugins load them; the bridge and projection stay in float32.
    """
    encoder = _create("encoders", recipe.encoder.name, **recipe.encoder.options)
    if frozen_dtype is not None:
        encoder.to(frozen_dtype)
    bridge = _apply_bridge_tuning(_make_bridge(recipe.bridge, "bridge", input_dim=encoder.feature_dim), recipe.bridge)
    model = VisionLanguageModel(encoder, bridge, recipe=recipe)
    if with_llm:
        add_language_model(model, recipe, frozen_dtype)
    return model


def add_language_model(model: VisionLanguageModel, recipe: Recipe, frozen_dtype: torch.dtype | None = None) -> VisionLanguageModel:
    """Load the recipe's frozen LLM (in ``frozen_dtype`` if given; LoRA adapters stay float32) into ``model``
    and give it a projection sized for bridge and LLM."""
    llm = _create("llms", recipe.llm.name, **recipe.llm.options).requires_grad_(False)
    if frozen_dtype is not None:
        llm.to(frozen_dtype)
    if recipe.llm.lora is not None:
        apply_llm_lora(llm, LoraSettings(**recipe.llm.lora))
    model.llm = llm
    model.projection = _make_bridge(
        recipe.projection, "projection", input_dim=model.bridge.output_dim, output_dim=llm.hidden_size
    )
    return model


def load_model(path: str | Path, device: str | torch.device | None = None) -> VisionLanguageModel:
    """Load a blipkit run directory (written by training or ``save``), or any checkpoint a plugin's
    ``load_model`` hook recognises (a transformers BLIP-2 directory, for one)."""
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.exists():
        from blipkit.plugin_manager import get_plugin_manager

        model = get_plugin_manager().hook.load_model(path=str(path))
        if model is None:
            raise BlipkitError(
                f"{path} is not a blipkit run directory (no {META_FILE}) nor a checkpoint any plugin can load; "
                "train one with: blipkit train"
            )
        return model.to(device) if device is not None else model
    meta = read_meta(path)
    recipe = meta_recipe(path, meta)
    checkpoint = checkpoint_dir(path, meta)
    encoder = _create("encoders", recipe.encoder.name, **recipe.encoder.options)
    bridge = load_bridge(recipe.bridge.name, checkpoint / "bridge")
    load_bridge_lora(bridge, checkpoint / "bridge")
    llm = projection = None
    if (checkpoint / "projection").exists():
        llm = _create("llms", recipe.llm.name, **recipe.llm.options)
        projection = load_bridge(recipe.projection.name, checkpoint / "projection")
        if (checkpoint / "llm_adapter").exists():
            load_llm_adapter(llm, checkpoint / "llm_adapter")
    model = VisionLanguageModel(encoder, bridge, projection, llm, recipe).eval()
    return model.to(device) if device is not None else model
