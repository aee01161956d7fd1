"""Collation: a list of Samples -> one batch for a training stage."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from blipkit.data.sample import Sample

__all__ = ["Collator", "sample_prompt", "stable_id"]


def stable_id(image_id: str) -> int:
    """An integer for ``image_id`` that is the same in every process (for ITC positives across ranks)."""
    return int(hashlib.sha1(image_id.encode()).hexdigest()[:15], 16)


def sample_prompt(sample: Sample, caption_prompt: str, vqa_prompt: Callable[[str], str]) -> str:
    """The LLM prompt of a sample: the caption prompt, or the question in the VQA template."""
    if sample.task == "vqa":
        return vqa_prompt(sample.question or "")
    return caption_prompt


class Collator:
    """Build batches for ``stage1`` (pixels + Q-Former text) or ``stage2`` (pixels + LLM tokens).

    ``None`` entries (samples whose image failed to load) are dropped and counted in ``batch["dropped"]``.
    """

    def __init__(
        self,
        stage: str,
        preprocess: Callable[[Any], torch.Tensor],
        bridge_tokenize: Callable[..., Any] | None = None,
        llm_tokenize: Callable[..., Any] | None = None,
        caption_prompt: str = "",
        vqa_prompt: Callable[[str], str] = "Question: {} Answer:".format,
        max_text_length: int = 32,
        prefix_lm: bool = False,
    ) -> None:
        self.stage = stage
        self.preprocess = preprocess
        self.bridge_tokenize = bridge_tokenize
        self.llm_tokenize = llm_tokenize
        self.caption_prompt = caption_prompt
        self.vqa_prompt = vqa_prompt
        self.max_text_length = max_text_length
        self.prefix_lm = prefix_lm

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
        if self.stage == "stage1":
            batch["bridge_text"] = self.bridge_tokenize([s.text for s in kept], max_length=self.max_text_length)
        else:
            prompts = [sample_prompt(s, self.caption_prompt, self.vqa_prompt) for s in kept]
            batch["lm"] = self.llm_tokenize(prompts, [s.text for s in kept], prefix_lm=self.prefix_lm)
        return batch
