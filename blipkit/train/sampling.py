"""Which samples a stage trains on, in which order, and which process takes which of them."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from blipkit.errors import DataError

__all__ = ["BatchIndexSampler", "stage_indices"]


class BatchIndexSampler(Sampler[list[Any]]):
    """Endless global batches of dataset indices in a seeded order per epoch, from batch ``start`` on;
    this process's share of each.

    The order depends only on (seed, epoch) and the global ``batch_size``, so a resumed run sees exactly
    the batches the uninterrupted one would, and any number of processes sees the same samples in the
    same steps. Process ``rank`` of ``world`` takes the rows ``[rank * B // world, (rank + 1) * B // world)``
    of every global batch of B. ``with_epoch`` yields (index, epoch) pairs instead of indices.
    """

    def __init__(self, indices: list[int], batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1,
                 with_epoch: bool = False) -> None:
        if batch_size < world:
            raise DataError(
                f"the global batch of {batch_size} is smaller than the {world} processes that share it; "
                "raise data.batch_size or start fewer processes"
            )
        if len(indices) < batch_size:
            raise DataError(
                f"only {len(indices)} usable samples for a global batch of {batch_size}; lower data.batch_size or add data"
            )
        self.indices = indices
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.rows = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
        self.per_epoch = len(indices) // batch_size
        self.with_epoch = with_epoch

    def __iter__(self) -> Iterator[list[Any]]:
        epoch, offset = divmod(self.start, self.per_epoch)
        for current in itertools.count(epoch):
            order = torch.randperm(len(self.indices), generator=torch.Generator().manual_seed(self.seed * 100003 + current))
            for batch in range(offset if current == epoch else 0, self.per_epoch):
                chunk = order[batch * self.batch_size : (batch + 1) * self.batch_size]
                mine = [self.indices[i] for i in chunk[self.rows].tolist()]
                yield [(index, current) for index in mine] if self.with_epoch else mine


def stage_indices(dataset: Any, tasks: list[str], weights: dict[str, float] | None = None) -> list[int]:
    """Dataset indices a stage samples from; with ``weights``, rarer tasks' indices repeat to give each task
    (approximately) its weight's share."""
    by_task = {task: [i for i, record in enumerate(dataset.records) if record.task == task] for task in tasks}
    present = {task: found for task, found in by_task.items() if found}
    if not present:
        raise DataError(f"dataset '{dataset.name}' has no samples for tasks {tasks}; it has {sorted(dataset.tasks)}")
    if not weights:
        return sorted(i for found in present.values() for i in found)
    total = sum(weights.get(task, 0.0) for task in present)
    if total <= 0:
        raise DataError(f"task_weights {weights} give no weight to the tasks present: {sorted(present)}")
    # Size of the mixture: the smallest that keeps every sample of every weighted task at least once.
    size = max(len(found) / (weights.get(task, 0.0) / total) for task, found in present.items() if weights.get(task, 0.0) > 0)
    indices: list[int] = []
    for task, found in present.items():
        share = round(size * weights.get(task, 0.0) / total)
        indices += [found[k % len(found)] for k in range(share)]
    return indices
