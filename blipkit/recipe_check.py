"""A recipe checked against what is installed: every name against the registries, every option against
its factory's signature, each stage's objective and options, loading no weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blipkit.config import ComponentConfig, DatasetConfig, Recipe, StageConfig
from blipkit.errors import BlipkitError, ConfigError
from blipkit.interfaces import Bridge
from blipkit.plugin_manager import registries

__all__ = ["validate_recipe"]

_AUTO_OPTIONS = {"bridge": {"input_dim"}, "projection": {"input_dim", "output_dim"}}


def _stage_objectives(recipe: Recipe, regs: Any) -> list[Any]:
    """Each stage's objective, built from its options (objectives load no weights)."""
    built = []
    for stage in recipe.stages:
        try:
            regs.objectives.resolve(stage.objective)
        except BlipkitError as err:
            raise ConfigError(f"{stage.name}.objective: {err}") from None
        regs.objectives.check_kwargs(stage.objective, stage.options, where=f"{stage.name}.options")
        built.append(regs.objectives.create(stage.objective, **stage.options))
    return built


def _check_projection_fit(stage: StageConfig, objective: Any, projection: str, regs: Any) -> None:
    """Refuse ``projection_init`` on a stage that trains no projection, or with a projection it cannot fit."""
    if not objective.uses_language_model:
        raise ConfigError(
            f"{stage.name}.projection_init: objective '{stage.objective}' trains no projection; remove the key"
        )
    factory = regs.bridges.resolve(projection).entry.factory
    if isinstance(factory, type) and issubclass(factory, Bridge) and factory.readout is Bridge.readout:
        raise ConfigError(
            f"{stage.name}.projection_init: projection '{projection}' has no linear read-out to fit; "
            "use projection linear or mlp, or remove the key"
        )


def validate_recipe(recipe: Recipe) -> None:
    """Check every name against the registries and every option against its factory, loading no weights."""
    regs = registries()
    objectives = _stage_objectives(recipe, regs)
    parts = [("encoder", regs.encoders), ("bridge", regs.bridges)]
    if any(objective.uses_language_model for objective in objectives):
        parts += [("projection", regs.bridges), ("llm", regs.llms)]
    for key, registry in parts:
        component: ComponentConfig = getattr(recipe, key)
        try:
            registry.resolve(component.name)
        except BlipkitError as err:
            raise ConfigError(f"{key}.name: {err}") from None
        auto = _AUTO_OPTIONS.get(key, set()) & set(component.options)
        if auto:
            raise ConfigError(f"{key}.options.{sorted(auto)[0]}: set by blipkit from the other parts; remove it")
        registry.check_kwargs(component.name, {**component.options, **{k: 0 for k in _AUTO_OPTIONS.get(key, ())}}, where=f"{key}.options")
        if component.pretrained and not Path(component.pretrained).exists():
            raise ConfigError(f"{key}.pretrained: {component.pretrained} does not exist")
    for stage, objective in zip(recipe.stages, objectives, strict=True):
        if stage.warmup_steps > stage.steps:
            raise ConfigError(
                f"{stage.name}.warmup_steps: must be at most the stage's {stage.steps} steps, got {stage.warmup_steps} "
                "(a longer warmup never reaches the peak learning rate)"
            )
        if stage.projection_init:
            _check_projection_fit(stage, objective, recipe.projection.name, regs)
        objective.check(stage, recipe)
    for split_key in ("train", "validation"):
        dataset: DatasetConfig | None = getattr(recipe.data, split_key)
        if dataset is None:
            continue
        try:
            regs.datasets.resolve(dataset.name)
        except BlipkitError as err:
            hint = f" (no such file or folder: {dataset.name})" if ("/" in dataset.name or "." in dataset.name) and not Path(dataset.name).exists() else ""
            raise ConfigError(f"data.{split_key}.name: {err}{hint}") from None
        regs.datasets.check_kwargs(dataset.name, {"split": dataset.split, **dataset.options}, where=f"data.{split_key}.options")
