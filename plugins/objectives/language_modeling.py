"""The language-modelling objective (``lm``): BLIP-2's stage 2.

The bridge's query outputs go through the projection into the frozen LLM as a visual prefix, and the
loss is the LLM's cross-entropy on each sample's target (a caption, or the answer to a question in the
recipe's VQA template), never on the prefix or the prompt. Before a fresh stage,
``projection_init: lexical`` warm-starts the projection (``blipkit.train.lexical``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from blipkit import hookimpl
from blipkit.config import Recipe, StageConfig
from blipkit.data.collate import Collator, LanguageModelText
from blipkit.data.sample import Sample
from blipkit.hookspecs import Register
from blipkit.interfaces import Objective
from blipkit.model.vlm import VisionLanguageModel


class LanguageModeling(Objective):
    """Train the bridge and projection (and LoRA adapters in the LLM) to make the frozen LLM say each
    sample's target after its image: captions, and answers to questions."""

    uses_language_model = True
    tasks = frozenset({"caption", "vqa"})
    evaluates = ("caption", "vqa")

    def collator(self, model: VisionLanguageModel, recipe: Recipe) -> Callable[[Sequence[Sample | None]], dict[str, Any]]:
        """Images and the LLM's prompt/target tokens; encoder-decoder LLMs get BLIP-2's prefix-LM split."""
        llm = model.llm
        text = LanguageModelText(llm.tokenize, recipe.data.caption_prompt, model.vqa_prompt, prefix_lm=llm.is_encoder_decoder)
        return Collator(model.encoder.preprocess, text)

    def loss(self, model: VisionLanguageModel, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The LLM's mean loss on the target tokens, plus the bridge's and projection's weighted auxiliary loss."""
        prefix, aux = model.prefix(model.batch_tokens(batch), batch.get("image_mask"))
        lm_loss = model.llm.loss(prefix, batch["lm"].to(model.device))
        return {"loss": lm_loss + aux, "lm": lm_loss.detach(), "aux": aux.detach()}

    def items(self, batch: dict[str, Any]) -> int:
        """The target tokens the LLM's loss averages over."""
        return batch["lm"].num_targets()

    def prepare(self, model: VisionLanguageModel, data: Any, recipe: Recipe, stage: StageConfig, quiet: bool) -> Any:
        """The lexical warm start of the projection when the stage asks for it."""
        if stage.projection_init != "lexical":
            return None
        from blipkit.train.lexical import lexical_init

        return lexical_init(model, data, recipe, quiet=quiet)


@hookimpl
def register_objectives(register: Register) -> None:
    """Register ``lm``."""
    register(
        "lm",
        LanguageModeling,
        aliases=("language-modeling", "blip2-stage2"),
        description="BLIP-2 stage 2: the frozen LLM's loss on captions and answers after the visual prefix",
        kind="objective",
    )
