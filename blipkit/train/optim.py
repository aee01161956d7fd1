"""AdamW with decay only on matrices, and linear warmup + cosine decay counted in optimizer steps."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from blipkit.config import StageConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_at"]


def build_optimizer(modules: Mapping[str, nn.Module] | Iterable[nn.Module], stage: StageConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases, norms and other 1-D tensors.

    ``modules`` maps part names (bridge, projection, llm) to modules, so ``stage.lr_scale`` can give a
    part its own learning rate; a plain iterable trains everything at ``stage.lr``.
    """
    named = modules.items() if isinstance(modules, Mapping) else ((None, m) for m in modules)
    scales = stage.lr_scale or {}
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for part, module in named:
        decay, no_decay = [], []
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
        lr = stage.lr * scales.get(part, 1.0) if part is not None else stage.lr
        groups += [
            {"params": decay, "weight_decay": stage.weight_decay, "lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr},
        ]
    merged: dict[tuple[float, float], dict[str, Any]] = {}
    for group in groups:
        key = (group["lr"], group["weight_decay"])
        merged.setdefault(key, {**group, "params": []})["params"].extend(group["params"])
    return torch.optim.AdamW([g for g in merged.values() if g["params"]], lr=stage.lr, betas=tuple(stage.betas), eps=stage.eps)


def lr_at(step: int, stage: StageConfig) -> float:
    """Learning rate after ``step`` optimizer steps: linear warmup to lr, then cosine down to min_lr."""
    if stage.warmup_steps and step < stage.warmup_steps:
        return stage.lr * step / stage.warmup_steps
    span = max(1, stage.steps - stage.warmup_steps)
    progress = min(1.0, (step - stage.warmup_steps) / span)
    return stage.min_lr + 0.5 * (stage.lr - stage.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, stage: StageConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that follows ``lr_at``, scaled per group by its ``lr_scale``; step it once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, stage) / stage.lr)
