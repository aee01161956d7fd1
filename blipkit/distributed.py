"""The processes of one run: which one this is, and the few collectives the core needs.

Training on N processes (DDP or FSDP through accelerate, or any launcher that initialises
``torch.distributed``) and one process run the same code: without a process group every collective
here is a no-op on a world of one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["Ranks", "current", "launched_rank"]

T = TypeVar("T")


def launched_rank() -> tuple[int, int]:
    """(rank, world size) that a launcher (torchrun, accelerate launch, mpirun, Slurm) gave this process in
    its environment, before any process group exists; (0, 1) when it was started alone."""
    for rank_key, size_key in (("RANK", "WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")):
        if rank_key in os.environ and size_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ[size_key])
    return 0, 1


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run (``rank`` of ``world``) and collectives over all of them."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this is the process that writes the run directory and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether there are other processes to talk to."""
        return self.world > 1

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.active:
            dist.barrier()

    def gather_objects(self, obj: T) -> list[T]:
        """Every process's ``obj`` (picklable, made by this program, never read from a file), in rank order."""
        if not self.active:
            return [obj]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """``obj`` as process ``src`` has it."""
        if not self.active:
            return obj
        box: list[Any] = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """``values`` combined element-wise over every process: ``sum``, ``min`` or ``max`` (in float64)."""
        if not self.active:
            return [float(v) for v in values]
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return tensor.tolist()


def current() -> Ranks:
    """The ranks of the default process group, or a world of one without one."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()
