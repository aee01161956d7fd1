"""The language-modelling objective (``lm``): BLIP-2's stage 2.

The bridge's query outputs go through the projection into the frozen LLM as a visual prefix, and the
loss is the LLM's cross-entropy on each sample's target (a caption, or the answer to a question in the
recipe's VQA template), never on the prefix or the prompt. Before a fresh stage,
``projection_init: lexical`` warm-starts the projection (``blipkit.train.lexical``), and the option
``reading_steps`` then teaches the LLM's LoRA adapters to read the captions that warm start spells.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from blipkit import hookimpl
from blipkit.config import Recipe, StageConfig
from blipkit.data.collate import Collator, LanguageModelText
from blipkit.data.sample import Sample
from blipkit.errors import ConfigError
from blipkit.hookspecs import Register
from blipkit.interfaces import Objective
from blipkit.model.vlm import VisionLanguageModel
from blipkit.train.lexical import lexical_init, teach_reading


class LanguageModeling(Objective):
    """Train the bridge and projection (and LoRA adapters in the LLM) to make the frozen LLM say each
    sample's target after its image: captions, and answers to questions."""

    uses_language_model = True
    tasks = frozenset({"caption", "vqa"})
    evaluates = ("caption", "vqa")

    def __init__(self, reading_steps: int = 0, reading_lr: float = 1e-3) -> None:
        """``reading_steps`` (with ``projection_init: lexical`` and LoRA on the LLM): steps before the stage
        that train the LLM's adapters on prefixes spelling each image's caption exactly, to say it and
        answer its questions from it (``blipkit.train.lexical.teach_reading``), at ``reading_lr``."""
        if isinstance(reading_steps, bool) or not isinstance(reading_steps, int) or reading_steps < 0:
            raise ConfigError(f"options.reading_steps: expected a whole number of steps >= 0, got {reading_steps!r}")
        if not isinstance(reading_lr, (int, float)) or isinstance(reading_lr, bool) or not reading_lr > 0:
            raise ConfigError(f"options.reading_lr: expected a positive learning rate, got {reading_lr!r}")
        self.reading_steps = reading_steps
        self.reading_lr = float(reading_lr)

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

    def check(self, stage: StageConfig, recipe: Recipe) -> None:
        """``reading_steps`` needs the lexical warm start and LoRA adapters on the LLM."""
        if not self.reading_steps:
            return
        if stage.projection_init != "lexical":
            raise ConfigError(
                f"{stage.name}.options.reading_steps teaches the LLM to read the captions that the lexical warm "
                f"start spells; set {stage.name}.projection_init: lexical or remove the option"
            )
        if recipe.llm.lora is None:
            raise ConfigError(
                f"{stage.name}.options.reading_steps trains the LLM's LoRA adapters, and the recipe gives it none; "
                "add llm.lora (e.g. {r: 8, alpha: 16}) or remove the option"
            )

    def prepare(self, model: VisionLanguageModel, data: Any, recipe: Recipe, stage: StageConfig, quiet: bool) -> Any:
        """The lexical warm start of the projection when the stage asks for it, then the reading warm-up
        when ``reading_steps`` asks for it; returns what they report."""
        self.check(stage, recipe)
        if stage.projection_init != "lexical":
            return None
        fit = lexical_init(model, data, recipe, quiet=quiet)
        if not self.reading_steps:
            return fit
        batch_size = stage.batch_size or recipe.data.batch_size
        fit.reading = teach_reading(
            model, data, recipe, stage.tasks, fit.prefix_length, self.reading_steps, self.reading_lr, batch_size, quiet
        )
        return fit


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
