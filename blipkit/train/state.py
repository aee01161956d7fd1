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
    directory: Path,
    optimizer_state: dict[str, Any],
    scheduler: Any,
    progress: dict[str, Any],
    rngs: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
    scaler: dict[str, Any] | None = None,
) -> None:
    """Write optimizer.safetensors, one RNG file per process (rng.safetensors for the first,
    rng-rank<N>.safetensors for the others) and state.json into ``directory``.

    ``optimizer_state`` is an optimizer's ``state_dict()`` with whole tensors; ``rngs`` holds every
    process's ``rng_state()`` in rank order; ``scaler`` a GradScaler's state (fp16 training).
    """
    directory.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = _split_optimizer(optimizer_state)
    save_safetensors(opt_tensors, directory / "optimizer.safetensors")
    for rank, (tensors, _) in enumerate(rngs):
        save_safetensors(tensors, directory / _rng_file(rank))
    state = {
        "progress": progress,
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict(),
        "rng": rngs[0][1],
        "rng_ranks": [meta for _, meta in rngs[1:]],
    }
    if scaler is not None:
        state["scaler"] = scaler
    atomic_write_json(directory / "state.json", state)


def _rng_file(rank: int) -> str:
    return "rng.safetensors" if rank == 0 else f"rng-rank{rank}.safetensors"


def load_trainer_state(directory: Path, rank: int = 0) -> dict[str, Any]:
    """Read what ``save_trainer_state`` wrote: progress, optimizer/scheduler state dicts, the GradScaler's
    state (or None), and process ``rank``'s RNG parts (None when the run was saved with fewer processes)."""
    meta = read_json(directory / "state.json")
    metas = [meta["rng"], *meta.get("rng_ranks", [])]
    rng = None
    if rank < len(metas):
        rng = (load_safetensors(directory / _rng_file(rank)), metas[rank])
    return {
        "progress": meta["progress"],
        "optimizer": _join_optimizer(load_safetensors(directory / "optimizer.safetensors"), meta["optimizer"]),
        "scheduler": meta["scheduler"],
        "scaler": meta.get("scaler"),
        "rng": rng,
        "saved_processes": len(metas),
    }
