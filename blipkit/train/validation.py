"""Scoring the validation split while training: its loss under the stage's objective (every process takes a
share) and the objective's scores (retrieval, captions, VQA: greedy, on the main process), as metric rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from blipkit.distributed import Ranks
from blipkit.interfaces import Objective
from blipkit.model.vlm import VisionLanguageModel
from blipkit.train.state import restore_rng, rng_state

__all__ = ["score", "validation_loss", "validation_tasks"]


def validation_tasks(objective: Objective, dataset: Any) -> list[str]:
    """What the objective is scored on that the split can show (retrieval needs captions)."""
    return [task for task in objective.evaluates if task in dataset.tasks or (task == "retrieval" and "caption" in dataset.tasks)]


@torch.no_grad()
def validation_loss(model: VisionLanguageModel, objective: Objective, dataset: Any, collate: Any, tasks: list[str],
                    samples: int, batch_size: int, ranks: Ranks) -> float:
    """The objective's mean loss over the first ``samples`` samples of ``tasks`` in the split, in global
    batches shared by the processes like training batches (every process must call this). The random
    state is put back afterwards, so training draws as it would without validation."""
    indices = [i for i, record in enumerate(dataset.records) if record.task in tasks][:samples]
    saved = rng_state()
    was_training = model.training
    model.eval()
    total = weight = 0.0
    try:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            rows = chunk[ranks.rank * len(chunk) // ranks.world : (ranks.rank + 1) * len(chunk) // ranks.world]
            batch = collate([dataset[i] for i in rows])
            items = objective.items(batch) if batch.get("size") else 0
            loss = float(objective.loss(model, batch)["loss"]) if items else 0.0
            total, weight = total + loss * items, weight + items
    finally:
        model.train(was_training)
        restore_rng(*saved)
    total, weight = ranks.reduce([total, weight])
    return total / weight if weight else float("nan")


def score(model: VisionLanguageModel, dataset: Any, tasks: list[str], out_dir: Path | None = None,
          limit: int | None = None) -> dict[str, Any]:
    """The split's scores on ``tasks`` (greedy decoding), on its first ``limit`` samples per task when given;
    predictions and scores go to ``out_dir`` when given."""
    from blipkit.eval.evaluate import evaluate, write_results

    scores: dict[str, Any] = {}
    was_training = model.training
    saved = rng_state()
    model.eval()
    try:
        for task in tasks:
            outcome = evaluate(model, dataset, task, generation={"num_beams": 1}, limit=limit)
            if out_dir is not None:
                write_results(outcome, out_dir)
            scores.update({f"{task}/{k}": v for k, v in outcome.scores.items() if isinstance(v, (int, float))})
    finally:
        model.train(was_training)
        restore_rng(*saved)
    return scores
