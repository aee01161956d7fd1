"""An example blipkit plugin: registers the ``prefix-contrastive`` training objective.

It trains the bridge and the projection so that an image's visual prefix (averaged over its queries)
points the way its caption's LLM token embeddings do (averaged over the tokens), with a symmetric
InfoNCE loss over the batch: an alignment warm-up in the LLM's own word space that never runs the LLM.
Install this folder with ``pip install -e examples/blipkit-example-objective``; a recipe's stage then
names it::

    stages:
      - {objective: prefix-contrastive, steps: 200, tasks: [caption], options: {temperature: 0.05}}
      - {objective: lm, steps: 1000, tasks: [caption, vqa]}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blipkit import hookimpl
from blipkit.data.collate import Collator, LanguageModelText
from blipkit.interfaces import Objective


class PrefixContrastive(Objective):
    """Symmetric InfoNCE between each image's mean prefix vector and its caption's mean token embedding."""

    uses_language_model = True
    tasks = frozenset({"caption"})
    evaluates = ("caption",)

    def __init__(self, temperature: float = 0.07) -> None:
        self.temperature = temperature

    def collator(self, model, recipe):
        """Images and the caption tokens (the LLM's tokenizer; only the target tokens are read)."""
        return Collator(model.encoder.preprocess, LanguageModelText(model.llm.tokenize))

    def loss(self, model, batch):
        """InfoNCE in both directions; ``contrastive`` logs it, ``accuracy`` how often the right caption wins."""
        prefix, _ = model.prefix(model.batch_tokens(batch), batch.get("image_mask"))
        labels = batch["lm"].labels.to(model.device)
        keep = (labels != -100).unsqueeze(-1)
        with torch.no_grad():
            words = model.llm.embed(labels.clamp_min(0)).float()
        text = F.normalize((words * keep).sum(1) / keep.sum(1).clamp_min(1), dim=-1)
        image = F.normalize(prefix.float().mean(1), dim=-1)
        logits = image @ text.T / self.temperature
        targets = torch.arange(logits.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        accuracy = (logits.argmax(1) == targets).float().mean()
        return {"loss": loss, "contrastive": loss.detach(), "accuracy": accuracy}


@hookimpl
def register_objectives(register) -> None:
    """Register ``prefix-contrastive``."""
    register(
        "prefix-contrastive",
        PrefixContrastive,
        description="Example plugin: align the mean visual prefix with the caption's mean token embedding (InfoNCE)",
        kind="example",
    )
