"""What a dataset yields (``Sample``) and what a dataset format builds it from (``Record``).

A caption sample trains on ``text``. A VQA sample trains on ``text`` = the most frequent reference
answer, asked with ``question``; ``answers`` keeps every reference answer for VQA accuracy. The set of
tasks is open: a dataset plugin may yield a task of its own for an objective plugin to train on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from PIL import Image

__all__ = ["ImageSource", "Record", "Sample", "most_frequent_answer"]

Task = str
"""``caption``, ``vqa``, or a task a dataset plugin names."""

ImageSource = Union[str, Path, Image.Image, Callable[[], Image.Image]]
"""An image file path, an image already in memory, or a zero-argument callable that produces one."""


@dataclass
class Sample:
    """One training or evaluation example, with its image loaded.

    ``image_id`` is stable across runs and shared by every sample of the same image (feature caching,
    ITM negatives). ``meta`` holds format-specific extras, e.g. the drawn objects of a ``shapes`` image.
    A sample read through the feature cache has no ``image`` but the encoder's ``image_tokens`` [N, D].
    """

    image: Image.Image | None
    text: str
    question: str | None = None
    answers: list[str] | None = None
    image_id: str = ""
    task: Task = "caption"
    meta: dict[str, Any] = field(default_factory=dict)
    image_tokens: Any = None


@dataclass
class Record:
    """A lightweight, not yet loaded sample: ``image`` is where the image comes from."""

    image: ImageSource
    text: str
    question: str | None = None
    answers: list[str] | None = None
    image_id: str = ""
    task: Task = "caption"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_sample(self, image: Image.Image | None = None, image_tokens: Any = None) -> Sample:
        """This record as a Sample with its loaded ``image`` (or cached ``image_tokens``)."""
        return Sample(
            image=image,
            text=self.text,
            question=self.question,
            answers=list(self.answers) if self.answers is not None else None,
            image_id=self.image_id,
            task=self.task,
            meta=self.meta,
            image_tokens=image_tokens,
        )


def most_frequent_answer(answers: Sequence[str], preferred: str | None = None) -> str:
    """The most frequent of ``answers``; ties go to ``preferred`` when it is among them, else the first seen."""
    cleaned = [a.strip() for a in answers if isinstance(a, str) and a.strip()]
    if not cleaned:
        return (preferred or "").strip()
    counts = Counter(cleaned)
    best = max(counts.values())
    if preferred is not None and counts.get(preferred.strip()) == best:
        return preferred.strip()
    return next(a for a in cleaned if counts[a] == best)
