"""BLIP-2's stage 1 as a training objective (``blip2-stage1``): the Q-Former learns from image-text pairs
alone with its own text branch and heads (ITC, ITM, ITG, or the subset its ``objectives`` option names);
no language model is loaded."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from blipkit.config import Recipe
from blipkit.data.collate import Collator
from blipkit.data.sample import Sample
from blipkit.interfaces import Objective
from blipkit.model.vlm import VisionLanguageModel

from .model import QFormer
from .objectives import stage1_loss


class QFormerText:
    """The Q-Former's tokens of each sample's caption (``{"bridge_text": ...}``), at most ``max_length``."""

    def __init__(self, tokenize: Callable[..., dict[str, torch.Tensor]], max_length: int) -> None:
        self.tokenize = tokenize
        self.max_length = max_length

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        return {"bridge_text": self.tokenize([s.text for s in samples], max_length=self.max_length)}


class QFormerPretraining(Objective):
    """Train the Q-Former alone on image-text pairs: contrastive (ITC), matching with hard negatives (ITM)
    and image-grounded captioning (ITG), with negatives from every process."""

    uses_language_model = False
    tasks = frozenset({"caption"})
    evaluates = ("retrieval",)

    def applies_to(self, model: VisionLanguageModel) -> bool:
        """Only a Q-Former (it has the stage-1 heads) trains with it; other bridges skip the stage."""
        return isinstance(model.bridge, QFormer)

    def trainable(self, model: VisionLanguageModel) -> dict[str, torch.nn.Module]:
        """The Q-Former."""
        return {"bridge": model.bridge}

    def collator(self, model: VisionLanguageModel, recipe: Recipe) -> Callable[[Sequence[Sample | None]], dict[str, Any]]:
        """Images and the Q-Former's tokens of their captions."""
        return Collator(model.encoder.preprocess, QFormerText(model.bridge.tokenize, recipe.data.max_text_length))

    def loss(self, model: VisionLanguageModel, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The sum of the Q-Former's stage-1 losses, each of them, and ITM's accuracy when it trains."""
        tokens = model.batch_tokens(batch)
        return stage1_loss(model.bridge, tokens, batch["bridge_text"], image_mask=batch.get("image_mask"),
                           image_ids=batch.get("image_keys"))
