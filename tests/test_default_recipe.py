"""The embedded offline default, shortened, on its real weights: do its captions read the image?"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import blipkit
from blipkit.config import load_recipe
from blipkit.eval.evaluate import evaluate
from blipkit.plugins.datasets.shapes_scoring import mentions, shapes_caption_correct
from blipkit.data.dataset import open_dataset
from blipkit.features import cached_features
from blipkit.train.runner import train

CHANCE_SHAPE = 1 / 3
"""A guess at one of the three shapes."""

CHANCE_COLOUR_AND_SHAPE = 1 / 18
"""A guess at one of the six colours and one of the three shapes."""

SHORTENED = [
    "data.train.options={num_images: 256}",
    "stage1.steps=40",
    "stage1.warmup_steps=4",
    "stage2.steps=30",
    "stage2.warmup_steps=3",
    "stage2.tasks=[caption]",
    "stage2.task_weights=null",
    "stage2.options={reading_steps: 10}",
]
"""40 + 30 steps and 10 reading steps (the default has 720 + 150 and 60), a ninth of its images, and
captions alone in stage 2."""

TEST_IMAGES = {"num_images": 60, "single_fraction": 1.0, "tasks": "caption"}
"""60 single-shape pictures of the test split: enough for p < 1e-6 against guessing at a quarter right."""


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p)."""
    return sum(math.comb(trials, k) * p**k * (1 - p) ** (trials - k) for k in range(successes, trials + 1))


def test_binomial_tail_matches_hand_values() -> None:
    assert binomial_tail(0, 5, 0.3) == pytest.approx(1.0)
    assert binomial_tail(5, 5, 0.5) == pytest.approx(1 / 32)
    assert binomial_tail(1, 2, 0.5) == pytest.approx(0.75)
    assert binomial_tail(60, 119, CHANCE_SHAPE) < 1e-4 < binomial_tail(50, 119, CHANCE_SHAPE)


@pytest.mark.slow
def test_shortened_default_captions_name_colour_and_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On single-shape images of the test split, greedy captions name the right colour and shape, and no
    other, far more often than guessing would (binomial p < 1e-6).

    At this budget captions often get the second shape of a pair wrong, so pairs are not checked. About
    a minute on 2 CPU cores, the first SmolLM2 conversion included.
    """
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))
    train(load_recipe("default", SHORTENED), output=tmp_path / "run", quiet=True)
    model = blipkit.load(tmp_path / "run")
    test = cached_features(model, open_dataset("shapes", "test", TEST_IMAGES), quiet=True)
    result = evaluate(model, test, "caption", batch_size=30, generation={"num_beams": 1, "max_new_tokens": 12})
    singles = [p for p in result.predictions if len(p["objects"]) == 1]
    assert len(singles) == TEST_IMAGES["num_images"]
    right_shape = sum(mentions(p["caption"])[1] == [p["objects"][0]["shape"]] for p in singles)
    right = sum(shapes_caption_correct(p["caption"], p["objects"]) for p in singles)
    assert binomial_tail(right_shape, len(singles), CHANCE_SHAPE) < 1e-6, (right_shape, len(singles), result.predictions[:6])
    assert binomial_tail(right, len(singles), CHANCE_COLOUR_AND_SHAPE) < 1e-6, (right, len(singles), result.predictions[:6])
