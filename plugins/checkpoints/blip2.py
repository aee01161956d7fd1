"""Load transformers BLIP-2 checkpoints (Blip2ForConditionalGeneration) as blipkit models.

``blipkit.load(DIR)`` for a directory written by ``save_pretrained`` (config.json with model_type
"blip-2"), or ``blipkit.load("Salesforce/blip2-opt-2.7b")`` for a hub id (from the local Hugging Face
cache when no hub is reachable). The parts, each named in the model's recipe so that ``model.save(out)``
writes a run directory that ``blipkit.load(out)`` rebuilds:

- encoder ``hf:<checkpoint>``: the vision tower's last block, without post_layernorm (1 CLS + patches);
- bridge ``qformer``: the checkpoint's Q-Former, with the vision tower's post_layernorm as its ln_vision;
- projection ``linear``: the checkpoint's language_projection;
- llm ``hf:<checkpoint>``: the language model (OPT decoder-only, FLAN-T5 encoder-decoder) and tokenizer.

Weights are read from safetensors files only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blipkit import hookimpl
from blipkit.errors import ConfigError, ModelUnavailableError, one_line
from blipkit.io import load_safetensors_prefixed

if TYPE_CHECKING:
    from blipkit.config import Recipe
    from blipkit.model.vlm import VisionLanguageModel

__all__ = ["blip2_recipe", "load_model", "locate"]

SALESFORCE_ID = re.compile(r"^salesforce/blip2-[\w.-]+$", re.IGNORECASE)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_ARCHITECTURE = "Blip2ForConditionalGeneration"
_PROJECTION_PREFIX = "language_projection."


def _read_config(file: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _cached_config(repo_id: str) -> dict[str, Any] | None:
    """The hub model's config.json when it is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    return _read_config(Path(cached)) if isinstance(cached, str) else None


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except OSError as err:
        raise ModelUnavailableError(
            f"BLIP-2 model '{repo_id}' is not in the local Hugging Face cache and no model hub is reachable "
            f"({type(err).__name__}): download it where one is (hf download {repo_id}) or pass a local directory "
            "written by Blip2ForConditionalGeneration.save_pretrained"
        ) from None


def locate(path: str) -> tuple[str, Path] | None:
    """(name for the recipe, local directory) of a BLIP-2 checkpoint, or None when ``path`` is not one.

    A local directory counts when its config.json says model_type "blip-2"; a hub id when its cached
    config.json does, or, uncached, when it reads ``Salesforce/blip2-*``.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        config = _read_config(local / "config.json")
        if config is None or config.get("model_type") != "blip-2":
            return None
        directory = local.resolve()
        return str(directory), directory
    if not _HUB_ID.match(path):
        return None
    cached = _cached_config(path)
    if cached is None and not SALESFORCE_ID.match(path):
        return None
    if cached is not None and cached.get("model_type") != "blip-2":
        return None
    return path, _snapshot(path)


def blip2_recipe(name: str, bridge_config: dict[str, Any]) -> Recipe:
    """The recipe that names an imported checkpoint's parts. Its stage 2 has BLIP-2's stage-2 settings, for
    fine-tuning from a saved import (``bridge.pretrained`` / ``projection.pretrained`` = that run)."""
    from blipkit.config import ComponentConfig, DataConfig, Recipe, StageConfig

    options = {k: v for k, v in bridge_config.items() if k != "input_dim"}
    return Recipe(
        name=Path(name).name,
        description=f"transformers BLIP-2 checkpoint {name}, imported",
        encoder=ComponentConfig(f"hf:{name}"),
        bridge=ComponentConfig("qformer", options=options),
        projection=ComponentConfig("linear"),
        llm=ComponentConfig(f"hf:{name}"),
        data=DataConfig(vqa_prompt="Question: {} Answer:", vqa_prompt_encoder_decoder="Question: {} Short answer:"),
        stages=[StageConfig(steps=80000, lr=1e-4, min_lr=5e-5, warmup_steps=2000, objective="lm", name="stage2")],
    )


def _build(name: str, directory: Path) -> VisionLanguageModel:
    """The model in eval mode, its parts built through the registries from the checkpoint ``directory``."""
    from blipkit.model.build import load_bridge
    from blipkit.model.vlm import VisionLanguageModel
    from blipkit.plugin_manager import registries

    config = _read_config(directory / "config.json") or {}
    architectures = config.get("architectures") or []
    if _ARCHITECTURE not in architectures:
        raise ConfigError(
            f"{name} is a {'/'.join(architectures) or 'BLIP-2'} checkpoint without a language model; "
            f"blipkit.load takes {_ARCHITECTURE} checkpoints such as Salesforce/blip2-opt-2.7b"
        )
    regs = registries()
    encoder = regs.encoders.create(f"hf:{name}")
    llm = regs.llms.create(f"hf:{name}")
    # The qformer plugin's loader imports transformers BLIP-2 directories (post_layernorm -> ln_vision).
    bridge = load_bridge("qformer", directory)
    projection = regs.bridges.create("linear", input_dim=bridge.output_dim, output_dim=llm.hidden_size)
    weights = load_safetensors_prefixed(directory, (_PROJECTION_PREFIX,), strip=_PROJECTION_PREFIX)
    try:
        projection.load_state_dict({f"proj.{k}": v for k, v in weights.items()}, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"{name}: its language_projection does not fit ({one_line(err)[:200]})") from None
    return VisionLanguageModel(encoder, bridge, projection, llm, blip2_recipe(name, bridge.config)).eval()


@hookimpl
def load_model(path: str) -> VisionLanguageModel | None:
    """A transformers BLIP-2 checkpoint (directory or hub id) as a blipkit model; None when not one."""
    located = locate(path)
    return None if located is None else _build(*located)
