"""What a run says before it trains: its stages, batches and samples, its data, where it writes; and, as
each stage starts, the parameters each part trains or keeps frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from blipkit.config import Recipe

__all__ = ["parameters_line", "run_plan"]


def _count(number: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if number >= size:
            return f"{number / size:.1f}{unit}"
    return str(number)


def run_plan(recipe: Recipe, run_dir: Path, dataset: Any, processes: int, cached: bool) -> str:
    """The block printed before training: recipe, run directory, data and each stage's budget."""
    streaming = getattr(dataset, "streaming", False)
    size = f"{len(dataset.source.shards)} shards, streamed" if streaming else f"{len(dataset)} samples"
    lines = [
        f"Plan: recipe '{recipe.name}' -> {run_dir} on {processes} process{'es' if processes > 1 else ''}",
        f"  data       {recipe.data.train.name} ({recipe.data.train.split}): {size}; "
        f"feature cache {'on' if cached else 'off'}",
        f"  parts      encoder {recipe.encoder.name}, bridge {recipe.bridge.name}, projection {recipe.projection.name}, "
        f"llm {recipe.llm.name}",
    ]
    for stage in recipe.stages:
        batch = stage.batch_size or recipe.data.batch_size
        samples = stage.steps * batch * stage.grad_accum
        available = 0 if streaming else sum(1 for record in dataset.records if record.task in stage.tasks)
        epochs = f" (~{samples / available:.1f} epochs of {available})" if available else ""
        lines.append(
            f"  {stage.name:<10} {stage.objective}: {stage.steps} steps x global batch {batch}"
            f"{f' x {stage.grad_accum} accumulated' if stage.grad_accum > 1 else ''} = {samples} samples{epochs}, "
            f"lr {stage.lr:g}, tasks {', '.join(stage.tasks)}"
        )
    return "\n".join(lines)


def parameters_line(stage_name: str, trainable: dict[str, nn.Module], model: Any) -> str:
    """Which parts a stage trains and which stay frozen, with their parameter counts."""
    trained = {part: sum(p.numel() for p in module.parameters() if p.requires_grad) for part, module in trainable.items()}
    frozen = {}
    for part in ("encoder", "bridge", "projection", "llm"):
        module = getattr(model, part, None)
        if module is not None:
            count = sum(p.numel() for p in module.parameters() if not p.requires_grad)
            if count:
                frozen[part] = count
    trains = ", ".join(f"{part} {_count(n)}" for part, n in trained.items() if n) or "nothing"
    keeps = ", ".join(f"{part} {_count(n)}" for part, n in frozen.items()) or "nothing"
    return f"{stage_name}: trains {trains}; frozen {keeps}"
