"""The run directory during training: opening it (fresh, overwritten or resumed), checkpoints and metrics.

Checkpoints are whole directories written under a temporary name and renamed, then ``blipkit.json`` is
atomically pointed at them: a crash never leaves a half-written checkpoint as the current one. Only the
main process writes; every process takes part in gathering what it holds (sharded weights, optimizer
state, its random generators) first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from blipkit.config import Recipe
from blipkit.distributed import Ranks
from blipkit.errors import BlipkitError
from blipkit.io import atomic_write_text, read_json
from blipkit.locks import DirectoryLock
from blipkit.model.persistence import META_FILE, checkpoint_dir, save_weights, write_meta
from blipkit.model.vlm import VisionLanguageModel
from blipkit.train.processes import whole_optimizer_state, whole_state_dicts
from blipkit.train.state import rng_state, save_trainer_state

__all__ = ["Checkpointer", "ResumePoint", "append_metrics", "open_run_dir"]

ResumePoint = tuple[dict[str, Any], Path]


def open_run_dir(run_dir: Path, recipe: Recipe, resume: bool, overwrite: bool) -> ResumePoint | None:
    """Check and prepare ``run_dir`` (main process only, holding its lock): where to resume from, or None
    for a fresh run."""
    if resume:
        resume_from = _resume_point(run_dir)
        if resume_from is not None:
            _trim_metrics(run_dir / "metrics.jsonl", resume_from[0])
        return resume_from
    if (run_dir / META_FILE).exists():
        if not overwrite:
            raise BlipkitError(
                f"{run_dir} already holds a run: continue it with --resume, replace it with --overwrite, "
                "or choose another --output"
            )
        for child in run_dir.iterdir():
            if child.name != DirectoryLock.name:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_meta(run_dir, recipe, checkpoint=".")
    return None


def _resume_point(run_dir: Path) -> ResumePoint | None:
    meta_file = run_dir / META_FILE
    if not meta_file.exists():
        raise BlipkitError(f"cannot resume: {run_dir} holds no run ({META_FILE} missing); start one with: blipkit train")
    meta = read_json(meta_file)
    progress = meta.get("progress")
    if progress is None:
        return None
    return progress, checkpoint_dir(run_dir, meta)


def _trim_metrics(path: Path, progress: dict[str, Any]) -> None:
    """Drop metric lines logged after the checkpoint a run resumes from."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row["stage"] in progress["completed"] or (row["stage"] == progress["stage"] and row["step"] <= progress["step"]):
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """Add one row to the run's metrics.jsonl."""
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")


class Checkpointer:
    """Writes step directories under run/checkpoints and points blipkit.json at the newest."""

    def __init__(self, run_dir: Path, recipe: Recipe, keep: int, ranks: Ranks) -> None:
        self.run_dir = run_dir
        self.recipe = recipe
        self.keep = max(1, keep)
        self.ranks = ranks

    def save(self, model: VisionLanguageModel, optimizer: Any, scheduler: Any, progress: dict[str, Any], scaler: Any = None) -> str:
        """Write a checkpoint of ``model``'s trainable parts and the trainer state; every process calls
        this, the main one writes. Returns the checkpoint's path relative to the run directory."""
        name = f"{progress['stage']}-step-{progress['step']:07d}"
        optimizer_state = whole_optimizer_state(optimizer)
        rngs = self.ranks.gather_objects(rng_state())
        with whole_state_dicts((model.bridge, model.projection)):
            if self.ranks.is_main:
                self._write(name, model, optimizer_state, scheduler, progress, rngs, scaler)
        self.ranks.barrier()
        return f"checkpoints/{name}"

    def _write(self, name: str, model: VisionLanguageModel, optimizer_state: dict[str, Any], scheduler: Any,
               progress: dict[str, Any], rngs: list[Any], scaler: Any) -> None:
        final = self.run_dir / "checkpoints" / name
        staging = self.run_dir / "checkpoints" / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            save_weights(model, staging)
            scaler_state = scaler.state_dict() if scaler is not None else None
            save_trainer_state(staging / "trainer_state", optimizer_state, scheduler, progress, rngs, scaler_state)
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            kept = read_json(self.run_dir / META_FILE).get("checkpoint", ".")
            raise BlipkitError(
                f"could not write checkpoint {name} ({err.strerror or err}); the previous one ({kept}) is intact. "
                f"Free some space and continue with: blipkit train --resume {self.run_dir}"
            ) from None
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        write_meta(self.run_dir, self.recipe, checkpoint=f"checkpoints/{name}", progress=progress)
        self._prune(keep_name=name)

    def _prune(self, keep_name: str) -> None:
        folder = self.run_dir / "checkpoints"
        done = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
        for old in done[: -self.keep]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)
