"""Experiment tracking through accelerate's trackers (TensorBoard, Weights & Biases, MLflow), on the main
process: the resolved recipe as the run's configuration, every logged metric row as a step."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from blipkit.config import Recipe, recipe_to_dict
from blipkit.errors import ConfigError

__all__ = ["check_trackers", "flat_config", "start_trackers", "tracker_dir"]

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(names: list[str]) -> None:
    """ConfigError naming the first tracker whose package is not installed, with the install line."""
    for name in names:
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ConfigError(f"log_with: {name} is not installed; pip install {_PACKAGES[name]} (or 'blipkit[track]')")


def tracker_dir(run_dir: Path) -> Path:
    """Where file-based trackers (TensorBoard, MLflow's local store) write: ``RUN/logs``."""
    return run_dir / "logs"


def flat_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe as one level of dotted keys with numbers, strings and booleans (what trackers store)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, list):
            for index, inner in enumerate(value):
                walk(f"{prefix}.{index}", inner)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", recipe_to_dict(recipe))
    return flat


def start_trackers(accelerator: Any, recipe: Recipe) -> None:
    """Open the recipe's trackers (``log_with``) with the recipe as their configuration."""
    if recipe.log_with:
        accelerator.init_trackers(recipe.name, config=flat_config(recipe))
