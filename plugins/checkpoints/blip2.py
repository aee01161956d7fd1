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

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blipkit import hookimpl

from ._transformers import CheckpointKind

if TYPE_CHECKING:
    from blipkit.config import Recipe
    from blipkit.model.vlm import VisionLanguageModel

__all__ = ["BLIP2", "blip2_recipe", "load_model"]

BLIP2 = CheckpointKind(
    label="BLIP-2",
    model_type="blip-2",
    architecture="Blip2ForConditionalGeneration",
    hub_names=re.compile(r"^salesforce/blip2-[\w.-]+$", re.IGNORECASE),
    example="Salesforce/blip2-opt-2.7b",
)


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


@hookimpl
def load_model(path: str) -> VisionLanguageModel | None:
    """A transformers BLIP-2 checkpoint (directory or hub id) as a blipkit model; None when not one."""
    located = BLIP2.locate(path)
    return None if located is None else BLIP2.build(*located, blip2_recipe)
