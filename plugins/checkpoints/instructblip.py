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

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blipkit import hookimpl

from ._transformers import CheckpointKind

if TYPE_CHECKING:
    from blipkit.config import Recipe
    from blipkit.model.vlm import VisionLanguageModel

__all__ = ["INSTRUCTBLIP", "instructblip_recipe", "load_model"]

INSTRUCTBLIP = CheckpointKind(
    label="InstructBLIP",
    model_type="instructblip",
    architecture="InstructBlipForConditionalGeneration",
    hub_names=re.compile(r"^salesforce/instructblip-[\w.-]+$", re.IGNORECASE),
    example="Salesforce/instructblip-flan-t5-xl",
)
CAPTION_PROMPT = "A short image caption:"
VQA_PROMPT = "Question: {} Short answer:"


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


@hookimpl
def load_model(path: str) -> VisionLanguageModel | None:
    """A transformers InstructBLIP checkpoint (directory or hub id) as a blipkit model; None when not one."""
    located = INSTRUCTBLIP.locate(path)
    return None if located is None else INSTRUCTBLIP.build(*located, instructblip_recipe)
