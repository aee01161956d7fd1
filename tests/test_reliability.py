"""A long run is not lost to numbers: a non-finite loss skips its step and is counted, and too many in a
row stop the run with one line, its last good checkpoint kept."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import blipkit
from blipkit.cli import cli
from blipkit.io import load_safetensors
from blipkit.plugins.objectives.language_modeling import LanguageModeling


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))


def _poison(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int] | None = None, from_call: int | None = None) -> None:
    """Make the LM objective's loss NaN on the given calls (1-based), as an fp16 overflow would."""
    original = LanguageModeling.loss
    calls = {"n": 0}

    def loss(self, model, batch):
        losses = original(self, model, batch)
        calls["n"] += 1
        if (bad_calls and calls["n"] in bad_calls) or (from_call is not None and calls["n"] >= from_call):
            return {**losses, "loss": losses["loss"] * float("nan")}
        return losses

    monkeypatch.setattr(LanguageModeling, "loss", loss)


def _bridge(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_safetensors(run / "checkpoints" / f"stage2-step-{step:07d}" / "bridge" / "model.safetensors")


def test_a_non_finite_loss_skips_its_step_and_is_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _poison(monkeypatch, bad_calls={2})
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "tiny", "~stage1", "stage2.steps=4", "log_every=1", "checkpoint_every=1",
                                      "keep_checkpoints=5", "-o", str(run), "-q"])
    assert result.exit_code == 0, result.output + str(result.exception)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert math.isnan(rows[1]["loss"]) and all(math.isfinite(r["loss"]) for r in rows[2:])
    first, skipped, after = _bridge(run, 1), _bridge(run, 2), _bridge(run, 3)
    assert all(torch.equal(first[k], skipped[k]) for k in first), "the skipped step changed no weight"
    assert any(not torch.equal(skipped[k], after[k]) for k in first), "training went on after it"
    assert all(torch.isfinite(v).all() for v in after.values())


def test_too_many_non_finite_steps_stop_the_run_keeping_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _poison(monkeypatch, from_call=3)
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "tiny", "~stage1", "stage2.steps=6", "checkpoint_every=1",
                                      "keep_checkpoints=5", "max_skipped_steps=2", "-o", str(run), "-q"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not finite for 2 steps in a row (up to step 4)" in lines[0], result.stderr
    assert "Traceback" not in result.output
    meta = json.loads((run / "blipkit.json").read_text())
    # Step 3 was skipped and checkpointed with step 2's weights; step 4, the second skip in a row, stopped the run.
    assert meta["checkpoint"] == "checkpoints/stage2-step-0000003"
    assert not (run / "checkpoints" / "stage2-step-0000004").exists()
    good, kept = _bridge(run, 2), _bridge(run, 3)
    assert all(torch.equal(good[k], kept[k]) for k in good)
    model = blipkit.load(run)
    assert all(torch.isfinite(p).all() for p in model.projection.parameters())
