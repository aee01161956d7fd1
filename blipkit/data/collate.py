"""Collation: a list of Samples -> one batch of images (or their cached tokens) and the text an objective reads."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from blipkit.data.sample import Sample
from blipkit.interfaces import LMBatch

__all__ = ["Collator", "LanguageModelText", "sample_prompt", "stable_id"]


def stable_id(image_id: str) -> int:
    """An integer for ``image_id`` that is the same in every process (for ITC positives across ranks)."""
    return int(hashlib.sha1(image_id.encode()).hexdigest()[:15], 16)


def sample_prompt(sample: Sample, caption_prompt: str, vqa_prompt: Callable[[str], str]) -> str:
    """The LLM prompt of a sample: the caption prompt, or the question in the VQA template."""
    if sample.task == "vqa":
        return vqa_prompt(sample.question or "")
    return caption_prompt


class Collator:
    """Build one batch: ``pixel_values`` (or the samples' cached ``image_tokens``), ``image_ids``,
    ``image_keys`` (stable integers of the ids), and whatever ``text(samples)`` returns.

    ``None`` entries (samples whose image failed to load) are dropped and counted in ``batch["dropped"]``;
    ``batch["size"]`` is the number kept.
    """

    def __init__(self, preprocess: Callable[[Any], torch.Tensor], text: Callable[[list[Sample]], dict[str, Any]]) -> None:
        self.preprocess = preprocess
        self.text = text

    def __call__(self, samples: Sequence[Sample | None]) -> dict[str, Any]:
        kept = [s for s in samples if s is not None]
        batch: dict[str, Any] = {"dropped": len(samples) - len(kept), "size": len(kept)}
        if not kept:
            return batch
        if all(s.image_tokens is not None for s in kept):
            batch["image_tokens"] = torch.stack([s.image_tokens for s in kept])
        else:
            batch["pixel_values"] = torch.stack([self.preprocess(s.image) for s in kept])
        batch["image_ids"] = [s.image_id for s in kept]
        batch["image_keys"] = torch.tensor([stable_id(s.image_id) for s in kept], dtype=torch.long)
        batch.update(self.text(kept))
        return batch


class LanguageModelText:
    """The LLM's tokens of each sample (``{"lm": LMBatch}``): its prompt (the caption prompt, or the question
    in the VQA template) and its target text, through the language model's own ``tokenize``."""

    def __init__(
        self,
        llm_tokenize: Callable[..., LMBatch],
        caption_prompt: str = "",
        vqa_prompt: Callable[[str], str] = "Question: {} Answer:".format,
        prefix_lm: bool = False,
    ) -> None:
        self.llm_tokenize = llm_tokenize
        self.caption_prompt = caption_prompt
        self.vqa_prompt = vqa_prompt
        self.prefix_lm = prefix_lm

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        prompts = [sample_prompt(s, self.caption_prompt, self.vqa_prompt) for s in samples]
        return {"lm": self.llm_tokenize(prompts, [s.text for s in samples], prefix_lm=self.prefix_lm)}
