"""AdamW with decay only on matrices, and linear warmup + cosine decay counted in optimizer steps."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from blipkit.config import StageConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_at"]


def build_optimizer(modules: Iterable[nn.Module], stage: StageConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases, norms and other 1-D tensors."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": stage.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=stage.lr, betas=tuple(stage.betas), eps=stage.eps)


def lr_at(step: int, stage: StageConfig) -> float:
    """Learning rate after ``step`` optimizer steps: linear warmup to lr, then cosine down to min_lr."""
    if stage.warmup_steps and step < stage.warmup_steps:
        return stage.lr * step / stage.warmup_steps
    span = max(1, stage.steps - stage.warmup_steps)
    progress = min(1.0, (step - stage.warmup_steps) / span)
    return stage.min_lr + 0.5 * (stage.lr - stage.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, stage: StageConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that follows ``lr_at``; step it once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, stage) / stage.lr)
