"""Training on several processes, through the real launchers (gloo on CPU): the same model as one
process, one run directory, a lost process ending the run, and an exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blipkit.config import load_recipe
from blipkit.data.feature_cache import FeatureCache
from blipkit.io import load_safetensors
from blipkit.train.runner import train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

EXACT = ["bridge.options.dropout=0.0", "bridge.options.objectives=[itc,itg]", "stage2.grad_accum=2", "log_every=1",
         "stage1.eps=1e-5", "stage2.eps=1e-5"]
"""The tiny recipe without randomness in training: no dropout, and no ITM (its hard negatives are drawn
at random from each process's own generator, which no single process can reproduce). Stage 2
accumulates two micro-batches, so accumulation across processes is covered too. Adam's eps is raised
from 1e-8 so that a gradient at the level of float32 rounding (some ITC projection gradients nearly
cancel) is not turned into a full learning-rate step of random sign."""

KILLED = ["stage1.steps=24", "stage2.steps=4", "checkpoint_every=3"]
"""The tiny recipe (dropout and ITM on, so every process's random state matters) with checkpoints every
3 steps and enough stage-1 steps to be killed in the middle."""


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "BLIPKIT_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}


def _blipkit(*args: str, cache: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blipkit", *args], env=_env(cache), capture_output=True, text=True,
                          timeout=timeout)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    meta = json.loads((run / "blipkit.json").read_text())
    checkpoint = run / meta["checkpoint"]
    tensors = {f"bridge.{k}": v for k, v in load_safetensors(checkpoint / "bridge" / "model.safetensors").items()}
    projection = load_safetensors(checkpoint / "projection" / "model.safetensors")
    return {**tensors, **{f"projection.{k}": v for k, v in projection.items()}}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _cache(root: Path) -> dict[str, torch.Tensor]:
    (folder,) = (root / "features").iterdir()
    meta = json.loads((folder / "meta.json").read_text())
    cache = FeatureCache(meta["cache_key"], root=root / "features")
    return {key: cache.get([key])[0] for key in cache._index}


def test_torchrun_on_two_processes_trains_the_model_one_process_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`torchrun --nproc_per_node 2 -m blipkit train` as it is: one run directory with one metrics.jsonl and
    one checkpoint series, a cache equal to one process's, and the weights one process trains at the
    same global batch.

    Tolerance: the processes add up the same gradients in another order (the all-reduce sums two
    half-batch gradients where one process sums over the whole batch), so the weights agree to float32
    rounding carried through 8 Adam steps. Measured: 3.6e-6 at most, and one process alone moves by 2e-6
    between 1 and 2 threads; leaving out the loss weighting (each process's mean taken as it is) moves
    them by 2.8e-3. Hence 2e-5."""
    two = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "blipkit", "train", "tiny", *EXACT, "-o", str(two), "-q"]
    done = subprocess.run(command, env={**_env(tmp_path / "cache2"), "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("stage1: loss") == 1 and done.stdout.count("Model saved in") == 1, done.stdout
    assert "on 2 processes" in done.stdout

    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache1"))
    one = tmp_path / "one"
    train(load_recipe("tiny", EXACT), output=one, quiet=True)

    rows_two, rows_one = _metrics(two), _metrics(one)
    assert [(r["stage"], r["step"]) for r in rows_two] == [(r["stage"], r["step"]) for r in rows_one]
    assert [r["loss"] for r in rows_two] == pytest.approx([r["loss"] for r in rows_one], abs=1e-4)
    assert [p.name for p in (two / "checkpoints").iterdir()] == ["stage2-step-0000004"]
    expected, got = _weights(one), _weights(two)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=2e-5, msg=key)

    cached_two, cached_one = _cache(tmp_path / "cache2"), _cache(tmp_path / "cache1")
    assert cached_two.keys() == cached_one.keys() and len(cached_one) == 48
    for key in cached_one:
        assert torch.equal(cached_two[key], cached_one[key]), key


def _rank_pid(cache: Path, rank: int) -> int | None:
    """The pid of training process ``rank`` of the run that uses ``cache`` (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"BLIPKIT_CACHE={cache}".encode() in environ and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_killed_process_ends_the_run_and_resume_on_two_processes_is_exact(tmp_path: Path) -> None:
    """kill -9 of process 1 in stage 1: process 0 ends within seconds with one line that says how to go on;
    `--resume --processes 2` then finishes with the weights and losses of an uninterrupted run, bit for bit."""
    whole = tmp_path / "whole"
    done = _blipkit("train", "tiny", *KILLED, "-o", str(whole), "-q", "--processes", "2", cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-3000:]

    parts = tmp_path / "parts"
    cache = tmp_path / "cache-parts"
    process = subprocess.Popen([sys.executable, "-m", "blipkit", "train", "tiny", *KILLED, "-o", str(parts), "-q",
                                "--processes", "2"], env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list(parts.glob("checkpoints/stage1-step-*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    victim = _rank_pid(cache, 1)
    assert victim is not None and process.poll() is None, "the run ended before a checkpoint could be interrupted"
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    out, err = process.communicate(timeout=60)
    assert time.monotonic() - killed_at < 20
    assert process.returncode == 1
    lines = [line for line in err.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "SIGKILL" in lines[0] and f"blipkit train --resume {parts} --processes 2" in lines[0], err
    assert "Traceback" not in err
    progress = json.loads((parts / "blipkit.json").read_text())["progress"]
    assert progress["stage"] == "stage1" and 0 < progress["step"] < 24

    resumed = _blipkit("train", "--resume", str(parts), "-q", "--processes", "2", cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = _weights(whole), _weights(parts)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert [r["loss"] for r in _metrics(parts)] == [r["loss"] for r in _metrics(whole)]


def test_a_mistake_on_every_process_is_reported_once(tmp_path: Path) -> None:
    """`accelerate launch -m blipkit train` as it is, into a directory that already holds a run: every process
    stops, with one error line and no traceback."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "blipkit.json").write_text("{}")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               "-m", "blipkit", "train", "tiny", "-o", str(run)]
    started = time.monotonic()
    done = subprocess.run(command, env=_env(tmp_path / "cache"), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error")]
    assert errors == [f"Error: {run} already holds a run: continue it with --resume, replace it with --overwrite, "
                      "or choose another --output"], done.stderr[-3000:]
    assert time.monotonic() - started < 100


def _sharded_worker(rank: int, directory: str) -> None:
    """Train a module sharded with FSDP2 and the same module whole for 3 steps, then gather the sharded
    one's weights and optimizer state with the checkpoint helpers, and load them into a fresh shard."""
    import copy
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from blipkit.train.processes import load_whole_optimizer_state, whole_optimizer_state, whole_state_dicts

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (2,))

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.Linear(5, 3)))

    def shard(module: torch.nn.Module) -> torch.nn.Module:
        fully_shard(module[1], mesh=mesh)
        return fully_shard(module, mesh=mesh)

    sharded, whole_module = shard(build()), build()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (sharded, whole_module)]
    inputs = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for module, optimizer in zip((sharded, whole_module), optimizers, strict=True):
            module(inputs).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    with whole_state_dicts([sharded]):
        weights = sharded.state_dict()
    saved = whole_optimizer_state(optimizers[0])
    fresh = shard(build())
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    load_whole_optimizer_state(fresh_optimizer, saved)
    loaded = {index: {k: v.to_local() if hasattr(v, "to_local") else v for k, v in values.items()}
              for index, values in fresh_optimizer.state_dict()["state"].items()}
    expected = copy.deepcopy(optimizers[1].state_dict()["state"])
    torch.save({"weights": weights, "saved": saved["state"], "loaded": loaded, "expected": expected,
                "reference": whole_module.state_dict(), "sharded_type": type(next(sharded.parameters())).__name__},
               f"{directory}/rank{rank}.pt")
    dist.destroy_process_group()


def test_sharded_weights_and_optimizer_state_are_saved_whole_and_loaded_back_sharded(tmp_path: Path) -> None:
    """What the checkpointer writes under FSDP (GPUs only through accelerate; torch's own FSDP2 runs on CPU
    with gloo): full tensors equal to an unsharded run's, and a resumed optimizer that holds each process's
    shard of them."""
    import torch.multiprocessing as mp

    mp.spawn(_sharded_worker, args=(str(tmp_path),), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["sharded_type"] == "DTensor"
        assert result["weights"].keys() == result["reference"].keys()
        for key, value in result["reference"].items():
            assert type(result["weights"][key]) is torch.Tensor
            torch.testing.assert_close(result["weights"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        for index, values in result["expected"].items():
            for key, value in values.items():
                torch.testing.assert_close(result["saved"][index][key], value, rtol=1e-5, atol=1e-7)
                if value.ndim:
                    rows = value.shape[0]
                    mine = slice(rank * -(-rows // 2), (rank + 1) * -(-rows // 2))
                    torch.testing.assert_close(result["loaded"][index][key], result["saved"][index][key][mine])
