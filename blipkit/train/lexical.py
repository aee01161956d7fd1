"""The lexical warm start of the projection (``stage2.projection_init: lexical``).

Before stage 2, a ridge regression fits the projection's linear read-out so that visual query ``k`` of
an image maps to the LLM's input embedding of token ``k mod T`` of that image's caption (``T`` its
length). The prefix then reads, approximately, as the caption spelled out once or more in tokens the
LLM knows, and the LLM's own habit of repeating what came before turns it into a caption before any
step of training. Stage 2 starts from there instead of from a prefix the LLM has never seen.

The reading warm-up (``teach_reading``) is its other half: a few steps that train the LLM's LoRA adapters
on prefixes that are the spelled captions themselves, to say the caption and to answer the image's
questions from it. Trained on the visual prefix alone, whose spelling is approximate, the adapters
answer every question about the first-named object; on exact spellings they learn to look the asked
object up, and keep doing so on the visual prefix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from blipkit.config import Recipe
from blipkit.data.collate import Collator, LanguageModelText
from blipkit.errors import ConfigError, DataError
from blipkit.model.vlm import VisionLanguageModel
from blipkit.train.feedback import CountProgress

__all__ = ["LexicalFit", "ReadingWarmup", "lexical_init", "reading_samples", "spelled_targets", "teach_reading"]

logger = logging.getLogger(__name__)


@dataclass
class ReadingWarmup:
    """What the reading warm-up did: its steps, the samples it drew from, and its loss at the start and end
    (each the mean of its first and last tenth of steps)."""

    steps: int
    samples: int
    first_loss: float
    last_loss: float

    def __str__(self) -> str:
        return (
            f"LLM adapters taught to read spelled captions: {self.steps} steps over {self.samples} samples "
            f"(loss {self.first_loss:.3f} -> {self.last_loss:.3f})"
        )


@dataclass
class LexicalFit:
    """What the fit used and how well it fits: ``r2`` is the share of the target embeddings' variance
    (about their mean) that the fitted prefix explains on the fitting samples; ``reading``, the reading
    warm-up that followed it, if one did."""

    samples: int
    features: int
    r2: float
    prefix_length: int = 0
    reading: ReadingWarmup | None = None

    def __str__(self) -> str:
        fitted = f"projection fitted to spell {self.samples} captions (lexical init, R2 {self.r2:.3f})"
        return fitted if self.reading is None else f"{fitted}\n{self.reading}"


def spelled_targets(embeddings: torch.Tensor, labels: torch.Tensor, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets [B, Q, D] that spell each row's label tokens cyclically over ``num_queries`` positions.

    ``labels`` [B, T] is an LMBatch's labels (-100 where ignored, EOS last in every row) and
    ``embeddings`` the LLM's input embeddings of ``labels`` (any values where ignored). Also returns
    which rows have at least one token besides EOS [B]; the others get zero targets.
    """
    targets = embeddings.new_zeros(labels.shape[0], num_queries, embeddings.shape[-1])
    usable = torch.zeros(labels.shape[0], dtype=torch.bool)
    for row in range(labels.shape[0]):
        positions = (labels[row] != -100).nonzero().squeeze(1)[:-1]
        if positions.numel() == 0:
            continue
        cycle = positions[torch.arange(num_queries) % positions.numel()]
        targets[row] = embeddings[row, cycle]
        usable[row] = True
    return targets, usable


class _RidgeSums:
    """The sums a ridge regression of targets on features needs, added up batch by batch in float64."""

    def __init__(self) -> None:
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.square_sum = self.residual_square = 0.0
        self.rows = self.used = 0

    def add(self, features: torch.Tensor, fixed: torch.Tensor | None, targets: torch.Tensor, usable: torch.Tensor) -> None:
        """Add the ``usable`` rows of one batch: features [B, Q, F], the fixed part and targets [B, Q, D]."""
        usable = usable.to(features.device)
        flat = features[usable].double().flatten(0, 1)
        goal = targets.to(features.device)[usable].flatten(0, 1)
        residual = goal - fixed[usable].double().flatten(0, 1) if fixed is not None else goal
        parts = (flat.T @ flat, flat.T @ residual, goal.sum(0))
        if self.gram is None:
            self.gram, self.cross, self.total = parts
        else:
            self.gram, self.cross, self.total = self.gram + parts[0], self.cross + parts[1], self.total + parts[2]
        self.square_sum += float(goal.pow(2).sum())
        self.residual_square += float(residual.pow(2).sum())
        self.rows += flat.shape[0]
        self.used += int(usable.sum())

    def solve(self, ridge: float) -> tuple[torch.Tensor, float]:
        """The read-out [F, D] (``ridge`` times the rows added to the Gram diagonal) and its R2."""
        gram, cross = self.gram, self.cross
        regularised = gram + ridge * self.rows * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        weight = torch.linalg.solve(regularised, cross)
        # |R - A W|^2 = |R|^2 - 2 <W, A'R> + <W, A'A W>, with R the targets less the fixed part.
        error = self.residual_square - 2 * float((weight * cross).sum()) + float((weight * (gram @ weight)).sum())
        spread = self.square_sum - float(self.total.pow(2).sum()) / self.rows
        return weight, 1.0 - error / spread if spread > 0 else float("nan")


def _caption_indices(dataset: Any, max_samples: int, seed: int) -> list[int]:
    """Up to ``max_samples`` caption samples of ``dataset``, drawn with ``seed`` when there are more."""
    captions = [i for i, record in enumerate(dataset.records) if record.task == "caption"]
    if not captions:
        raise DataError(
            "stage2.projection_init: lexical fits the projection to captions, and the training data has none; "
            "add caption samples or remove the key"
        )
    if len(captions) > max_samples:
        order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed))
        captions = sorted(captions[i] for i in order[:max_samples].tolist())
    return captions


@torch.no_grad()
def lexical_init(
    model: VisionLanguageModel,
    dataset: Any,
    recipe: Recipe,
    max_samples: int = 4096,
    batch_size: int = 64,
    ridge: float = 1e-3,
    quiet: bool = False,
) -> LexicalFit:
    """Fit ``model.projection``'s read-out on up to ``max_samples`` caption samples of ``dataset``.

    ``ridge`` times the number of fitted rows is added to the Gram matrix's diagonal. Raises ConfigError
    for a projection without a linear read-out and DataError for a dataset without captions.
    """
    projection, llm = model.projection, model.llm
    if projection is None or llm is None:
        raise ConfigError("stage2.projection_init: the model has no projection or language model yet")
    if getattr(dataset, "streaming", False):
        raise ConfigError(
            "projection_init: lexical fits the projection to a dataset held in memory, and this one streams; "
            "remove the key"
        )
    captions = _caption_indices(dataset, max_samples, recipe.seed)
    collator = Collator(
        model.encoder.preprocess if model.encoder is not None else None,
        LanguageModelText(llm.tokenize, caption_prompt=recipe.data.caption_prompt),
    )
    sums = _RidgeSums()
    was_training = model.training
    model.eval()
    try:
        with CountProgress("fitting the projection", len(captions), quiet=quiet) as bar:
            for start in range(0, len(captions), batch_size):
                chunk = captions[start : start + batch_size]
                batch = collator([dataset[i] for i in chunk])
                bar.advance(len(chunk))
                if not batch.get("size"):
                    continue
                queries = model.bridge(model.batch_tokens(batch), batch.get("image_mask")).queries
                readout = projection.readout(queries)
                if readout is None:
                    raise ConfigError(
                        f"stage2.projection_init: projection '{recipe.projection.name}' has no linear read-out to fit; "
                        "use projection linear or mlp, or remove the key"
                    )
                features, fixed = readout
                labels = batch["lm"].labels
                targets, usable = spelled_targets(llm.embed(labels.clamp_min(0)).double(), labels, features.shape[1])
                if usable.any():
                    sums.add(features, fixed, targets, usable)
    finally:
        model.train(was_training)
    if sums.gram is None:
        raise DataError("stage2.projection_init: no caption sample could be used (all images failed or captions empty)")
    weight, r2 = sums.solve(ridge)
    projection.set_readout(weight.to(next(projection.parameters()).dtype))
    logger.info("lexical projection init: %d captions, %d features, R2 %.3f", sums.used, weight.shape[0], r2)
    return LexicalFit(samples=sums.used, features=weight.shape[0], r2=r2, prefix_length=int(features.shape[1]))


def reading_samples(dataset: Any, tasks: list[str], caption_prompt: str, vqa_prompt: Any) -> list[tuple[str, str, str]]:
    """(caption, prompt, target) for every sample of ``tasks`` whose image has a caption: the image's first
    caption, the sample's LLM prompt, and its target text. DataError when there are none."""
    captions: dict[str, str] = {}
    for record in dataset.records:
        if record.task == "caption" and record.image_id and record.text:
            captions.setdefault(record.image_id, record.text)
    samples = [
        (captions[r.image_id], vqa_prompt(r.question or "") if r.task == "vqa" else caption_prompt, r.text)
        for r in dataset.records
        if r.task in tasks and r.image_id in captions and r.text
    ]
    if not samples:
        raise DataError(
            "reading_steps teaches the LLM to answer from each image's caption, and no training sample has an "
            "image with a caption (image_id shared with a caption sample); remove the option"
        )
    return samples


def teach_reading(
    model: VisionLanguageModel,
    dataset: Any,
    recipe: Recipe,
    tasks: list[str],
    prefix_length: int,
    steps: int,
    lr: float,
    batch_size: int,
    quiet: bool = False,
) -> ReadingWarmup:
    """Train the LLM's trainable (LoRA) parameters for ``steps`` steps on prefixes that spell each sample's
    image caption over ``prefix_length`` positions, with the sample's prompt and target (AdamW at ``lr``,
    a tenth of the steps of linear warmup, then linear decay; samples drawn with the recipe's seed)."""
    llm = model.llm
    parameters = [p for p in llm.parameters() if p.requires_grad] if llm is not None else []
    if not parameters:
        raise ConfigError("reading_steps trains the LLM's LoRA adapters, and the LLM has none; add llm.lora or remove the option")
    samples = reading_samples(dataset, tasks, recipe.data.caption_prompt, model.vqa_prompt)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, 1.0 - step / steps)
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    losses: list[float] = []
    was_training = llm.training
    llm.train()
    try:
        with CountProgress("teaching the LLM to read spelled captions", steps, quiet=quiet) as bar:
            for _ in range(steps):
                chunk = [samples[i] for i in torch.randint(len(samples), (batch_size,), generator=generator).tolist()]
                spelled = llm.tokenize([recipe.data.caption_prompt] * len(chunk), [c for c, _, _ in chunk])
                with torch.no_grad():
                    prefix, _ = spelled_targets(llm.embed(spelled.labels.clamp_min(0)), spelled.labels, prefix_length)
                batch = llm.tokenize([prompt for _, prompt, _ in chunk], [target for _, _, target in chunk])
                loss = llm.loss(prefix.to(model.device), batch.to(model.device))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.advance(1)
    finally:
        llm.train(was_training)
    tenth = max(1, steps // 10)
    first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
    logger.info("reading warm-up: %d steps, loss %.3f -> %.3f", steps, first, last)
    return ReadingWarmup(steps=steps, samples=len(samples), first_loss=first, last_loss=last)
