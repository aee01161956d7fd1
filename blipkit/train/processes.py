"""The processes of a training run: the Accelerator (precision, strategy, time-outs), work the main
process does for all, whole tensors from sharded ones, and the error a lost process leaves behind."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from blipkit.config import Recipe
from blipkit.distributed import Ranks, current
from blipkit.errors import BlipkitError, ConfigError, ReportedByMainError

__all__ = [
    "frozen_dtype",
    "load_whole_optimizer_state",
    "main_first",
    "make_accelerator",
    "peer_lost",
    "precision",
    "ranks_of",
    "shard_like",
    "under_elastic_agent",
    "whole",
    "whole_optimizer_state",
    "whole_state_dicts",
]

T = TypeVar("T")
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket closed")


def precision(recipe: Recipe) -> str:
    """accelerate's mixed-precision mode: fp32 on CPU, bf16 (fp16 where bf16 is missing) on GPU for ``auto``."""
    if recipe.precision == "fp32" or not torch.cuda.is_available():
        return "no"
    if recipe.precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return recipe.precision


def frozen_dtype(accelerator: Any) -> torch.dtype | None:
    """The dtype to store the frozen encoder and LLM in: half precision on GPU under mixed precision (they
    need no fp32 master weights), None (as loaded) otherwise. Under FSDP the parts keep their dtypes and
    FSDP's mixed-precision policy casts what it gathers."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


def make_accelerator(recipe: Recipe, logging_dir: Path | None = None) -> Any:
    """The run's Accelerator: DDP over the processes a launcher started (gloo on CPU), FSDP2 with
    ``distributed.strategy: fsdp`` or an accelerate config that asks for it, DeepSpeed when accelerate's
    config asks for it; the recipe's time-out at every collective; its trackers writing under
    ``logging_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs

    on_gpu = torch.cuda.is_available()
    plugin = None
    if recipe.distributed.strategy == "fsdp":
        if not on_gpu:
            raise ConfigError(
                "distributed.strategy: fsdp runs on GPUs only (accelerate shards with FSDP on GPUs); "
                "use distributed.strategy=ddp on CPU"
            )
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True)
    accelerator = Accelerator(
        log_with=list(recipe.log_with) or None,
        project_dir=str(logging_dir) if logging_dir is not None else None,
        mixed_precision=precision(recipe),
        cpu=not on_gpu,
        fsdp_plugin=plugin,
        kwargs_handlers=[
            # Stage 1 without ITM leaves its head unused; stage 2 leaves the Q-Former's text branch unused.
            DistributedDataParallelKwargs(find_unused_parameters=True),
            InitProcessGroupKwargs(timeout=timedelta(seconds=recipe.distributed.timeout_s)),
        ],
    )
    if accelerator.distributed_type == DistributedType.FSDP and (recipe.bridge.tuning == "lora" or recipe.llm.lora is not None):
        raise ConfigError(
            "FSDP does not train LoRA adapters in blipkit yet; use distributed.strategy=ddp, or remove "
            "bridge.tuning and llm.lora"
        )
    return accelerator


def main_first(ranks: Ranks, work: Callable[[], T]) -> T:
    """Run ``work`` on the main process only and hand its result to every process; a BlipkitError it
    raises ends every process with the same exit code, reported once (by the main process)."""
    if not ranks.active:
        return work()
    outcome: tuple[str, Any, int] = ("ok", None, 0)
    if ranks.is_main:
        try:
            outcome = ("ok", work(), 0)
        except BlipkitError as err:
            outcome = ("error", str(err), err.exit_code)
            ranks.broadcast_object(outcome)
            raise
    outcome = ranks.broadcast_object(outcome)
    kind, value, code = outcome
    if kind == "error":
        raise ReportedByMainError(value, code)
    return value


def peer_lost(err: BaseException, ranks: Ranks) -> bool:
    """Whether ``err`` is a collective failing because another process of the run went away."""
    if not ranks.active:
        return False
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err).lower() for text in _PEER_GONE)


def under_elastic_agent() -> bool:
    """Whether torchrun's (or accelerate launch's) agent started this process; it then reports a lost
    process itself."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` entire: a sharded (FSDP) tensor is gathered from every process, so every process must
    call this in the same order; any other tensor is returned as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextmanager
def whole_state_dicts(modules: Iterable[nn.Module | None]) -> Iterator[None]:
    """Within the block, ``state_dict()`` of each module gives entire tensors (sharded ones gathered once,
    here, on every process), so every saver writes full safetensors; outside it nothing changes."""
    chosen = [m for m in modules if m is not None and _is_sharded(m)]
    states = [{k: whole(v) for k, v in m.state_dict().items()} for m in chosen]
    for module, state in zip(chosen, states, strict=True):
        module.state_dict = lambda *args, _state=state, **kwargs: dict(_state)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module in chosen:
            del module.state_dict


def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut the way ``like`` is sharded (FSDP), or ``full`` itself when ``like`` is not sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full.to(like.device)
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)


def ranks_of(accelerator: Any) -> Ranks:
    """The run's processes as the Accelerator set them up."""
    return current() if accelerator.num_processes > 1 else Ranks()


def whole_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """The optimizer's state dict with sharded tensors gathered whole (every process, in the same order)."""
    state = optimizer.state_dict()
    return {
        "state": {index: {k: whole(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
                  for index, values in state["state"].items()},
        "param_groups": state["param_groups"],
    }


def load_whole_optimizer_state(optimizer: Any, saved: dict[str, Any]) -> None:
    """Load what ``whole_optimizer_state`` gave into ``optimizer``, each tensor the shape of its parameter
    cut the way that parameter is sharded (FSDP)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def fit(key: str, value: Any, param: torch.Tensor) -> Any:
        # Moments have their parameter's shape; the step count is a scalar of its own, even for a scalar parameter.
        if key != "step" and isinstance(value, torch.Tensor) and value.shape == param.shape:
            return shard_like(value, param)
        return value

    state = {index: {k: fit(k, v, params[int(index)]) for k, v in values.items()} for index, values in saved["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
