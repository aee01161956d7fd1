"""Watching a long run: validation rows every eval_every steps, curves with the validation loss,
TensorBoard event files through accelerate's trackers, and epochs turned into steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from blipkit.config import load_recipe
from blipkit.errors import ConfigError
from blipkit.train.runner import train

VALIDATION = "data.validation={name: shapes, split: validation, options: {num_images: 8, image_size: 32}}"


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))


def test_eval_every_scores_validation_and_tensorboard_holds_the_losses(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    recipe = load_recipe("tiny", ["stage1.steps=4", "stage2.steps=4", "eval_every=2", "eval_samples=8", "log_every=1",
                                  "log_with=[tensorboard]", VALIDATION])
    train(recipe, output=run, quiet=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    checks = [r for r in rows if "val_loss" in r]
    assert [(r["stage"], r["step"]) for r in checks] == [("stage1", 2), ("stage1", 4), ("stage2", 2), ("stage2", 4)]
    assert all(math.isfinite(r["val_loss"]) and r["split"] == "validation" for r in checks)
    assert "retrieval/i2t_r1" in checks[0] and "caption/CIDEr" in checks[2] and "vqa/accuracy" in checks[2]
    with Image.open(run / "curves.png") as picture:
        assert picture.format == "PNG"
    (events,) = (run / "logs" / "tiny").glob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload()
    losses = scalars.Scalars("stage2/loss")
    trained = [r for r in rows if r["stage"] == "stage2" and "split" not in r]
    assert [e.step for e in losses] == [4 + r["step"] for r in trained], "steps count over both stages"
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in trained], rel=1e-5)
    assert [e.value for e in scalars.Scalars("stage1/val_loss")] == pytest.approx([r["val_loss"] for r in checks[:2]], rel=1e-5)


def test_validation_while_training_leaves_training_as_it_was(tmp_path: Path) -> None:
    """Scoring draws no random numbers that training would: the logged losses equal a run without it."""
    base = ["stage1.steps=3", "stage2.steps=3", "log_every=1", VALIDATION]
    train(load_recipe("tiny", base), output=tmp_path / "plain", quiet=True)
    train(load_recipe("tiny", [*base, "eval_every=1", "eval_samples=8"]), output=tmp_path / "watched", quiet=True)
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for run in ("plain", "watched")]
    assert losses[0] == losses[1]


def test_epochs_become_steps_in_the_run_recipe(tmp_path: Path) -> None:
    recipe = load_recipe("tiny", ["~stage1", "~stage2.steps", "stage2.epochs=0.5", "stage2.tasks=[caption]"])
    assert recipe.stage2.epochs == 0.5
    train(recipe, output=tmp_path / "run", quiet=True)
    saved = json.loads((tmp_path / "run" / "blipkit.json").read_text())["recipe"]["stages"][0]
    assert saved["steps"] == math.ceil(0.5 * 48 / 8) and saved["epochs"] is None
    with pytest.raises(ConfigError, match="set steps or epochs, not both"):
        load_recipe("tiny", ["stage2.epochs=2"])
    with pytest.raises(ConfigError, match="eval_every: there is no data.validation"):
        load_recipe("tiny", ["eval_every=5"])
    with pytest.raises(ConfigError, match="log_with: unknown tracker 'tensorbored'"):
        load_recipe("tiny", ["log_with=[tensorbored]"])


def test_augmentation_crops_and_flips_alike_on_resume_and_in_workers(tmp_path: Path) -> None:
    """Opt-in crop and flip: the same sample at the same epoch gets the same draw in any worker and after a
    resume, a new draw in another epoch; and a run that augments trains and resumes bit for bit."""
    import random

    from blipkit.data.augment import AugmentedDataset, augment_image
    from blipkit.data.dataset import open_dataset
    from blipkit.io import load_safetensors

    image = Image.new("RGB", (40, 30))
    image.putpixel((0, 0), (255, 0, 0))
    flipped = augment_image(image, ["flip"], random.Random(1))
    crops = {augment_image(image, ["crop"], random.Random(seed)).size for seed in range(20)}
    assert flipped.size == (40, 30) and len(crops) > 5 and all(w * h >= 0.5 * 1200 - 80 for w, h in crops)
    data = AugmentedDataset(open_dataset("shapes", "train", {"num_images": 4, "image_size": 32}), ["crop", "flip"], seed=3)
    assert data[(1, 0)].image.tobytes() == data[(1, 0)].image.tobytes() != data[(1, 1)].image.tobytes()
    overrides = ["data.augment=[crop]", "data.feature_cache=false", "stage1.steps=2", "stage2.steps=3", "data.num_workers=2"]
    recipe = load_recipe("tiny", overrides)
    train(recipe, output=tmp_path / "whole", quiet=True)
    train(recipe, output=tmp_path / "parts", stop_after=3, quiet=True)
    train(recipe, output=tmp_path / "parts", resume=True, quiet=True)
    weights = [load_safetensors(tmp_path / run / "checkpoints" / "stage2-step-0000003" / "bridge" / "model.safetensors")
               for run in ("whole", "parts")]
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
    with pytest.raises(ConfigError, match="data.augment: cached features"):
        load_recipe("tiny", ["data.augment=[flip]", "data.feature_cache=true"])
