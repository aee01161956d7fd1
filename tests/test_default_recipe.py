"""The embedded offline default, shortened, on its real weights: does it learn to caption?"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

import blipkit
from blipkit.config import load_recipe
from blipkit.eval.evaluate import evaluate
from blipkit.plugins.datasets.shapes import COLORS, SHAPES
from blipkit.train.runner import cached_features, open_dataset, train

CHANCE_COUNT = 1 / 2
"""A guess at one shape or two."""
CHANCE_SHAPE = 1 / 3
"""A guess at one of the three shapes."""


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p)."""
    return sum(math.comb(trials, k) * p**k * (1 - p) ** (trials - k) for k in range(successes, trials + 1))


def test_binomial_tail_matches_hand_values() -> None:
    assert binomial_tail(0, 5, 0.3) == pytest.approx(1.0)
    assert binomial_tail(5, 5, 0.5) == pytest.approx(1 / 32)
    assert binomial_tail(1, 2, 0.5) == pytest.approx(0.75)


def _named(caption: str) -> tuple[list[str], list[str]]:
    """The colour words and the shape words of a caption, in order."""
    words = re.findall(r"[a-z]+", caption.lower())
    return [w for w in words if w in COLORS], [w for w in words if w in SHAPES]


@pytest.mark.slow
def test_shortened_default_captions_beat_chance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Half the default's steps on a quarter of its images. On the whole test split, captions name the right
    number of shapes, and the right shape of single-shape images, more often than guessing (binomial p < 1e-3).

    At this budget colours are not learned yet, so the colour is not checked.
    """
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))
    overrides = ["data.train.options={num_images: 320}", "stage1.steps=20", "stage1.warmup_steps=2",
                 "stage2.steps=40", "stage2.warmup_steps=4"]
    train(load_recipe("default", overrides), output=tmp_path / "run", quiet=True)
    model = blipkit.load(tmp_path / "run")
    test = cached_features(model, open_dataset("shapes", "test", {}), quiet=True)
    result = evaluate(model, test, "caption", batch_size=40, generation={"num_beams": 1})
    predictions = result.predictions
    singles = [p for p in predictions if len(p["objects"]) == 1]
    assert len(singles) >= 100
    count_right = sum(len(_named(p["caption"])[1]) == len(p["objects"]) for p in predictions)
    shape_right = sum(_named(p["caption"])[1] == [p["objects"][0]["shape"]] for p in singles)
    report = (count_right, len(predictions), shape_right, len(singles), result.scores, predictions[:6])
    assert binomial_tail(count_right, len(predictions), CHANCE_COUNT) < 1e-3, report
    assert binomial_tail(shape_right, len(singles), CHANCE_SHAPE) < 1e-3, report
