"""Load transformers InstructBLIP checkpoints (InstructBlipForConditionalGeneration) as blipkit models.

``blipkit.load(DIR)`` for a directory written by ``save_pretrained`` (config.json with model_type
"instructblip", and the processor's files), or ``blipkit.load("Salesforce/instructblip-flan-t5-xl")`` for
a hub id (from the local Hugging Face cache when no hub is reachable). The parts, each named in the
model's recipe so that ``model.save(out)`` writes a run directory that ``blipkit.load(out)`` rebuilds:

- encoder ``hf:<checkpoint>``: the vision tower's last block, without post_layernorm (1 CLS + patches);
- bridge ``qformer``: the checkpoint's Q-Former with its word embeddings and its own tokenizer
  (``qformer_tokenizer/``), the vision tower's post_layernorm as its ln_vision;
- projection ``linear``: the checkpoint's language_projection;
- llm ``hf:<checkpoint>``: the language model (Vicuna/Llama decoder-only, FLAN-T5 encoder-decoder).

The recipe's stage trains the ``instructblip`` objective, so ``caption``, ``ask`` and evaluation build the
prefix from the image and the prompt together, as transformers' ``generate`` does with the same text in
both tokenizers. Weights are read from safetensors files only.
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

__all__ = ["instructblip_recipe", "load_model", "locate"]

SALESFORCE_ID = re.compile(r"^salesforce/instructblip-[\w.-]+$", re.IGNORECASE)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_MODEL_TYPE = "instructblip"
_ARCHITECTURE = "InstructBlipForConditionalGeneration"
_PROJECTION_PREFIX = "language_projection."
CAPTION_PROMPT = "A short image caption:"
VQA_PROMPT = "Question: {} Short answer:"


def _read_config(file: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except OSError as err:
        raise ModelUnavailableError(
            f"InstructBLIP model '{repo_id}' is not in the local Hugging Face cache and no model hub is reachable "
            f"({type(err).__name__}): download it where one is (hf download {repo_id}) or pass a local directory "
            f"written by {_ARCHITECTURE}.save_pretrained"
        ) from None


def locate(path: str) -> tuple[str, Path] | None:
    """(name for the recipe, local directory) of an InstructBLIP checkpoint, or None when ``path`` is not one.

    A local directory counts when its config.json says model_type "instructblip"; a hub id when its cached
    config.json does, or, uncached, when it reads ``Salesforce/instructblip-*``.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        config = _read_config(local / "config.json")
        if config is None or config.get("model_type") != _MODEL_TYPE:
            return None
        directory = local.resolve()
        return str(directory), directory
    if not _HUB_ID.match(path):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached_file = try_to_load_from_cache(path, "config.json")
    cached = _read_config(Path(cached_file)) if isinstance(cached_file, str) else None
    if cached is None and not SALESFORCE_ID.match(path):
        return None
    if cached is not None and cached.get("model_type") != _MODEL_TYPE:
        return None
    return path, _snapshot(path)


def instructblip_recipe(name: str, bridge_config: dict[str, Any]) -> Recipe:
    """The recipe that names an imported checkpoint's parts. Its one stage is InstructBLIP's instruction
    tuning (the paper's settings), which also makes inference read the prompt in the Q-Former."""
    from blipkit.config import ComponentConfig, DataConfig, Recipe, StageConfig

    options = {k: v for k, v in bridge_config.items() if k != "input_dim"}
    return Recipe(
        name=Path(name).name,
        description=f"transformers InstructBLIP checkpoint {name}, imported",
        encoder=ComponentConfig(f"hf:{name}"),
        bridge=ComponentConfig("qformer", options=options),
        projection=ComponentConfig("linear"),
        llm=ComponentConfig(f"hf:{name}"),
        data=DataConfig(caption_prompt=CAPTION_PROMPT, vqa_prompt=VQA_PROMPT, vqa_prompt_encoder_decoder=VQA_PROMPT),
        stages=[StageConfig(steps=60000, lr=1e-5, min_lr=0.0, warmup_steps=1000, tasks=["caption", "vqa"],
                            objective="instructblip", name="instruct")],
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
            f"{name} is a {'/'.join(architectures) or 'InstructBLIP'} checkpoint without a language model; "
            f"blipkit.load takes {_ARCHITECTURE} checkpoints such as Salesforce/instructblip-flan-t5-xl"
        )
    regs = registries()
    encoder = regs.encoders.create(f"hf:{name}")
    llm = regs.llms.create(f"hf:{name}")
    # The qformer plugin's loader imports transformers InstructBLIP directories (qformer_tokenizer/ included).
    bridge = load_bridge("qformer", directory)
    projection = regs.bridges.create("linear", input_dim=bridge.output_dim, output_dim=llm.hidden_size)
    weights = load_safetensors_prefixed(directory, (_PROJECTION_PREFIX,), strip=_PROJECTION_PREFIX)
    try:
        projection.load_state_dict({f"proj.{k}": v for k, v in weights.items()}, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"{name}: its language_projection does not fit ({one_line(err)[:200]})") from None
    return VisionLanguageModel(encoder, bridge, projection, llm, instructblip_recipe(name, bridge.config)).eval()


@hookimpl
def load_model(path: str) -> VisionLanguageModel | None:
    """A transformers InstructBLIP checkpoint (directory or hub id) as a blipkit model; None when not one."""
    located = locate(path)
    return None if located is None else _build(*located)
