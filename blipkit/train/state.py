"""Trainer state (optimizer, scheduler, RNG, data position, step) as safetensors + JSON only.

accelerate's ``save_state`` pickles the optimizer; a run directory is user-supplied on ``--resume``, and
blipkit never unpickles user files, so the state is flattened into tensors and JSON here.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blipkit.io import atomic_write_json, load_safetensors, read_json, save_safetensors

__all__ = ["load_trainer_state", "restore_rng", "rng_state", "save_trainer_state"]


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random generator's state: tensors (torch CPU/CUDA) and JSON (python, numpy)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Put every random generator back where ``rng_state`` found it."""
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars, "indices": list(state["state"])}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(meta["scalars"].get(str(i), {})) for i in meta["indices"]}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state[int(index)][key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_trainer_state(
    directory: Path, optimizer: torch.optim.Optimizer, scheduler: Any, progress: dict[str, Any]
) -> None:
    """Write optimizer.safetensors, rng.safetensors and state.json into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    save_safetensors(opt_tensors, directory / "optimizer.safetensors")
    rng_tensors, rng_meta = rng_state()
    save_safetensors(rng_tensors, directory / "rng.safetensors")
    scheduler_state = scheduler.state_dict()
    atomic_write_json(
        directory / "state.json",
        {"progress": progress, "optimizer": opt_meta, "scheduler": scheduler_state, "rng": rng_meta},
    )


def load_trainer_state(directory: Path) -> dict[str, Any]:
    """Read what ``save_trainer_state`` wrote: progress, optimizer/scheduler state dicts and RNG parts."""
    meta = read_json(directory / "state.json")
    return {
        "progress": meta["progress"],
        "optimizer": _join_optimizer(load_safetensors(directory / "optimizer.safetensors"), meta["optimizer"]),
        "scheduler": meta["scheduler"],
        "rng": (load_safetensors(directory / "rng.safetensors"), meta["rng"]),
    }
