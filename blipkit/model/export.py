"""Exporting a model to share it: blipkit's own self-contained directory, or another library's format
through an exporter plugin (``register_exporters``), written atomically with a model card (README.md) and
optionally pushed to the Hugging Face Hub."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blipkit.errors import BlipkitError, ConfigError, one_line
from blipkit.io import atomic_directory, atomic_write_text
from blipkit.model.model_card import model_card

if TYPE_CHECKING:
    from blipkit.interfaces import Exporter
    from blipkit.model.vlm import VisionLanguageModel

__all__ = ["BLIPKIT_FORMAT", "ExportResult", "HubUnavailableError", "export_formats", "export_model", "push_to_hub"]

BLIPKIT_FORMAT = "blipkit"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_RUN_FILES = ("metrics.jsonl", "curves.png")


class HubUnavailableError(BlipkitError):
    """The model hub cannot be reached (offline mode, no connection) or refused the upload."""


@dataclass
class ExportResult:
    """What ``export_model`` wrote: the directory, its format, why the asked-for format could not hold the
    model (``fallback``), the hub URL it was pushed to, and notes on parts it refers to outside itself."""

    directory: Path
    format: str
    fallback: str | None = None
    url: str | None = None
    notes: list[str] = field(default_factory=list)


def _registries() -> Any:
    from blipkit.plugin_manager import registries

    return registries()


def export_formats() -> list[str]:
    """The names ``--to`` takes: ``blipkit`` and every registered exporter (aliases included)."""
    return [BLIPKIT_FORMAT, *_registries().exporters.names()]


def _exporter(to: str) -> tuple[str, Exporter | None]:
    """(format name, its exporter; None for blipkit's own), or a ConfigError listing the formats."""
    if to == BLIPKIT_FORMAT:
        return BLIPKIT_FORMAT, None
    exporters = _registries().exporters
    if to not in exporters:
        raise ConfigError(f"unknown export format '{to}'; --to takes: {', '.join(export_formats())}")
    entry = exporters.resolve(to).entry
    return entry.name, entry.factory()


def _check_destination(destination: Path, overwrite: bool) -> None:
    if destination.exists() and not destination.is_dir():
        raise BlipkitError(f"{destination} is a file; give a directory to export into")
    if destination.is_dir() and any(destination.iterdir()) and not overwrite:
        raise BlipkitError(f"{destination} exists and is not empty; choose another directory or pass --overwrite")


def _hub_offline() -> bool:
    from huggingface_hub import is_offline_mode

    flags = (os.environ.get(k, "").strip().upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return is_offline_mode() or any(flag in {"1", "ON", "YES", "TRUE"} for flag in flags)


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype '{name}'; --dtype takes: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _outside_parts(model: VisionLanguageModel) -> list[str]:
    """Notes for the frozen parts named by a local path: the export refers to them, it does not hold them."""
    notes = []
    for slot, registry, config in (("encoder", "encoders", model.recipe.encoder), ("llm", "llms", model.recipe.llm)):
        if slot == "llm" and model.llm is None:
            continue
        argument = _registries().by_name(registry).resolve(config.name).argument
        if argument and Path(argument).expanduser().exists():
            notes.append(
                f"the frozen {slot} is read from {argument}, which the export refers to but does not hold; "
                "copy that directory along and give its new path as the recipe's name"
            )
    return notes


def _write_blipkit(model: VisionLanguageModel, source: Path, directory: Path) -> None:
    """blipkit.json (the recipe, checkpoint "."), the trained parts, and the run's metrics and curves."""
    model.save(directory)
    for name in _RUN_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)


def export_model(
    source: str | Path,
    destination: str | Path,
    to: str = BLIPKIT_FORMAT,
    overwrite: bool = False,
    dtype: str | None = None,
    hub_repo: str | None = None,
    private: bool = False,
) -> ExportResult:
    """Export the model at ``source`` (a run directory or any checkpoint ``blipkit.load`` reads) into the
    directory ``destination`` in format ``to`` (``blipkit`` or a registered exporter's name), with a model
    card; push it to the Hub repository ``hub_repo`` when given. A model the asked-for format cannot hold
    is written in blipkit's format, with the reason in ``ExportResult.fallback``. ``dtype`` (float32,
    bfloat16, float16) casts an exporter's weights; blipkit's format keeps the trained parts in float32."""
    from blipkit.model.build import load_model

    name, exporter = _exporter(to)
    torch_dtype = _dtype(dtype)
    destination = Path(destination).expanduser()
    _check_destination(destination, overwrite)
    if hub_repo is not None and _hub_offline():
        raise HubUnavailableError(
            f"cannot push to the Hugging Face Hub in offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); "
            f"unset it, or export without --push-to-hub and upload later with: hf upload {hub_repo} {destination}"
        )
    source = Path(source).expanduser()
    model = load_model(source)
    result = ExportResult(destination, name)
    if exporter is not None:
        result.fallback = exporter.unsupported(model)
        if result.fallback is not None:
            exporter, result.format = None, BLIPKIT_FORMAT
    with atomic_directory(destination, shared=True) as tmp:
        if exporter is None:
            _write_blipkit(model, source, tmp)
            result.notes = _outside_parts(model)
        else:
            exporter.write(model, tmp, torch_dtype)
        card = model_card(model, source, result.format, exporter, hub_repo or str(destination), hub=hub_repo is not None)
        atomic_write_text(tmp / "README.md", card)
    if hub_repo is not None:
        result.url = push_to_hub(destination, hub_repo, private)
    return result


def push_to_hub(directory: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload ``directory`` to the Hub model repository ``repo_id`` (created when missing) in one commit,
    so that a failed upload changes nothing there; returns the repository's URL."""
    from huggingface_hub import HfApi

    if _hub_offline():
        raise HubUnavailableError("cannot push to the Hugging Face Hub in offline mode; unset HF_HUB_OFFLINE and retry")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message="Upload blipkit export")
    except Exception as err:  # the hub client raises its HTTP library's own error types, which change between versions
        raise HubUnavailableError(
            f"could not push to the Hugging Face Hub repository {repo_id} ({one_line(type(err).__name__ + ': ' + str(err))[:200]}); "
            f"nothing was uploaded. The export is complete in {directory}: check the connection and your login "
            f"(hf auth login), then run: hf upload {repo_id} {directory}"
        ) from None
    return str(url)
