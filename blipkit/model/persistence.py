"""A model on disk: the run directory's ``blipkit.json`` and the trainable parts' weights (safetensors)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blipkit.config import Recipe, recipe_from_dict, recipe_to_dict
from blipkit.errors import BlipkitError, ConfigError, DataError
from blipkit.io import atomic_write_json, atomic_write_text, cache_dir, load_safetensors, read_json
from blipkit.model.lora import has_lora, load_bridge_lora, load_llm_adapter, save_bridge, save_llm_adapter
from blipkit.version import __version__

if TYPE_CHECKING:
    from blipkit.model.vlm import VisionLanguageModel

__all__ = [
    "META_FILE",
    "checkpoint_dir",
    "last_run",
    "load_weights",
    "meta_recipe",
    "read_meta",
    "remember_last_run",
    "run_recipe",
    "save_weights",
    "weights_dir",
    "write_meta",
]

META_FILE = "blipkit.json"

logger = logging.getLogger(__name__)


def save_weights(model: VisionLanguageModel, directory: Path) -> None:
    """Save the trainable parts under ``directory``: bridge (with its LoRA), projection, LLM adapter."""
    save_bridge(model.bridge, directory / "bridge")
    if model.projection is not None:
        model.projection.save_pretrained(directory / "projection")
    if model.llm is not None and has_lora(model.llm.model):
        save_llm_adapter(model.llm, directory / "llm_adapter")


def load_weights(model: VisionLanguageModel, directory: Path) -> None:
    """Load what ``save_weights`` wrote into an already built ``model`` (resuming a run)."""
    if has_lora(model.bridge):
        load_bridge_lora(model.bridge, directory / "bridge")
    else:
        model.bridge.load_state_dict(load_safetensors(directory / "bridge" / "model.safetensors"))
    if model.projection is not None and (directory / "projection").exists():
        model.projection.load_state_dict(load_safetensors(directory / "projection" / "model.safetensors"))
    if model.llm is not None and (directory / "llm_adapter").exists():
        load_llm_adapter(model.llm, directory / "llm_adapter", trainable=True)


def write_meta(run_dir: Path, recipe: Recipe, checkpoint: str, **extra: Any) -> None:
    """Atomically (re)write ``blipkit.json``: the resolved recipe and which checkpoint is current."""
    atomic_write_json(
        run_dir / META_FILE,
        {"blipkit_version": __version__, "checkpoint": checkpoint, **extra, "recipe": recipe_to_dict(recipe)},
    )


def read_meta(run_dir: Path) -> dict[str, Any]:
    """A run directory's ``blipkit.json``: a JSON object with a ``recipe`` object (DataError naming the file
    otherwise)."""
    meta_file = Path(run_dir) / META_FILE
    meta = read_json(meta_file)
    if not isinstance(meta, dict) or not isinstance(meta.get("recipe"), dict):
        raise DataError(
            f"{meta_file} does not describe a run (no 'recipe' object in it); restore the file or train again"
        )
    return meta


def meta_recipe(run_dir: Path, meta: dict[str, Any]) -> Recipe:
    """The recipe in a run's ``blipkit.json`` (read by ``read_meta``), its mistakes named with the file."""
    try:
        return recipe_from_dict(meta["recipe"])
    except ConfigError as err:
        raise ConfigError(f"{Path(run_dir) / META_FILE}: {err}") from None


def checkpoint_dir(run_dir: Path, meta: dict[str, Any]) -> Path:
    """The run's current checkpoint that ``blipkit.json`` names: an existing folder inside the run directory.

    A checkpoint outside it is refused, so that a run directory handed over loads only its own files.
    """
    meta_file = Path(run_dir) / META_FILE
    name = meta.get("checkpoint", ".")
    if not isinstance(name, str):
        raise DataError(f"{meta_file}: 'checkpoint' should be a folder of the run, like checkpoints/NAME; got {name!r}")
    if Path(name).is_absolute() or os.path.normpath(name).split(os.sep)[0] == "..":
        raise DataError(
            f"{meta_file}: checkpoint {name!r} points outside the run directory; a run loads only its own files: "
            "copy that checkpoint into the run and name it relative to the run (checkpoints/NAME)"
        )
    directory = Path(run_dir) / name
    if not directory.is_dir():
        raise DataError(f"{meta_file}: checkpoint {name!r} is missing from the run directory; restore it or train again")
    return directory


def weights_dir(path: Path, part: str) -> Path:
    """``part`` of a run directory (following its current checkpoint) or of a bare bridge directory."""
    path = Path(path)
    if (path / META_FILE).exists():
        return checkpoint_dir(path, read_meta(path)) / part
    return path


def run_recipe(run_dir: str | Path) -> Recipe:
    """The recipe a run directory was trained with (its ``blipkit.json``), e.g. to resume it."""
    meta_file = Path(run_dir) / META_FILE
    if not meta_file.exists():
        raise BlipkitError(f"{run_dir} holds no run ({META_FILE} missing); start one with: blipkit train")
    return meta_recipe(Path(run_dir), read_meta(Path(run_dir)))


def remember_last_run(run_dir: Path) -> None:
    """Record ``run_dir`` as the last finished run, which ``last_run`` returns."""
    try:
        atomic_write_text(cache_dir() / "last-run", str(run_dir.resolve()))
    except OSError as err:
        logger.warning("could not record the last run in %s: %s", cache_dir(), err)


def last_run() -> Path:
    """The last finished ``blipkit train`` run (on this machine, for this ``BLIPKIT_CACHE``)."""
    marker = cache_dir() / "last-run"
    if marker.exists() and Path(marker.read_text().strip()).exists():
        return Path(marker.read_text().strip())
    raise BlipkitError("no --model given and no finished 'blipkit train' run found; train one with: blipkit train")
