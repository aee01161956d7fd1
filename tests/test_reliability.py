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
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
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


def test_a_run_directory_in_use_is_refused_and_a_dead_lock_is_taken_over(tmp_path: Path) -> None:
    import subprocess
    import sys

    from blipkit.locks import HOST

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": holder.pid, "host": HOST}))  # a live process holds it
        args = ["train", "tiny", "stage1.steps=1", "stage2.steps=1", "-o", str(run), "-q"]
        refused = CliRunner().invoke(cli, args)
    finally:
        holder.kill()
        holder.wait()
    assert refused.exit_code == 1 and not (run / "blipkit.json").exists()
    assert refused.stderr.strip() == (
        f"Error: {run} is in use: process {holder.pid} is training there; wait for it to finish or stop it, "
        "or choose another --output"
    )
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / ".lock").write_text(json.dumps({"pid": int(gone.stdout), "host": HOST}))  # left by a dead process
    taken = CliRunner().invoke(cli, args)
    assert taken.exit_code == 0, taken.output
    assert not (run / ".lock").exists(), "released when training ends"


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from blipkit.train import checkpoint

    original = checkpoint.save_trainer_state
    calls = {"n": 0}

    def full_disk(directory, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "optimizer.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(directory, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_trainer_state", full_disk)
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "tiny", "~stage1", "stage2.steps=4", "checkpoint_every=2", "-o", str(run), "-q"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: could not write checkpoint stage2-step-0000004 (No space left on device); the previous one "
        f"(checkpoints/stage2-step-0000002) is intact. Free some space and continue with: blipkit train --resume {run}"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["stage2-step-0000002"]
    assert json.loads((run / "blipkit.json").read_text())["checkpoint"] == "checkpoints/stage2-step-0000002"
    assert blipkit.load(run).projection is not None
    monkeypatch.setattr(checkpoint, "save_trainer_state", original)
    resumed = CliRunner().invoke(cli, ["train", "--resume", str(run), "-q"])
    assert resumed.exit_code == 0, resumed.output


KILLER = """
import os, signal, sys
from blipkit.cli import main

point, at = sys.argv[1], int(sys.argv[2])
calls = {"n": 0}


def killed_at_call(function):
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return wrapper


if point == "cache":  # while the feature cache fills: on the second batch of images
    import blipkit.model.vlm as vlm
    vlm.VisionLanguageModel.image_tokens = killed_at_call(vlm.VisionLanguageModel.image_tokens)
elif point == "step":  # inside a training step: in the LM loss's forward pass
    import blipkit.plugins.objectives.language_modeling as lm
    lm.LanguageModeling.loss = killed_at_call(lm.LanguageModeling.loss)
elif point == "checkpoint":  # while a checkpoint is written: its weights are saved, its trainer state is not
    import blipkit.train.checkpoint as checkpoint
    checkpoint.save_trainer_state = killed_at_call(checkpoint.save_trainer_state)
main(sys.argv[3:])
"""

KILLED_RECIPE = ["tiny", "stage1.steps=4", "stage2.steps=6", "checkpoint_every=2", "log_every=1"]


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    """kill -9 while the feature cache fills, inside a step, and while a checkpoint is written, each followed
    by --resume: the final weights and every logged loss equal an uninterrupted run's, bit for bit."""
    import os
    import signal
    import subprocess
    import sys

    from blipkit.config import load_recipe
    from blipkit.train.runner import train

    whole = tmp_path / "whole"
    train(load_recipe(KILLED_RECIPE[0], KILLED_RECIPE[1:]), output=whole, quiet=True)
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    run = tmp_path / "run"
    env = {**os.environ, "BLIPKIT_CACHE": str(tmp_path / "cache-killed")}
    fresh = ["train", *KILLED_RECIPE, "-o", str(run), "-q"]
    resume = ["train", "--resume", str(run), "-q"]
    for point, at, args in (("cache", 2, fresh), ("step", 3, resume), ("checkpoint", 2, resume)):
        done = subprocess.run([sys.executable, str(killer), point, str(at), *args], env=env, capture_output=True, text=True)
        assert done.returncode == -signal.SIGKILL, (point, done.stderr[-2000:])
    progress = json.loads((run / "blipkit.json").read_text())["progress"]
    assert (progress["stage"], progress["step"]) == ("stage2", 4), "the checkpoint being written when killed is not current"
    assert list((run / "checkpoints").glob(".*.tmp")), "the kill left a half-written checkpoint behind"
    done = subprocess.run([sys.executable, "-m", "blipkit", *resume], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list((run / "checkpoints").glob(".*.tmp"))
    for part in ("bridge", "projection"):
        expected, got = _final(whole, part), _final(run, part)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), (part, key)
    assert _losses(run) == _losses(whole)


def _final(run: Path, part: str) -> dict[str, torch.Tensor]:
    checkpoint = json.loads((run / "blipkit.json").read_text())["checkpoint"]
    return load_safetensors(run / checkpoint / part / "model.safetensors")


def _losses(run: Path) -> list[tuple[str, int, float]]:
    return [(r["stage"], r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
