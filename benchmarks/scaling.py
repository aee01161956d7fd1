"""Training throughput on 1 and N processes, and the scaling efficiency, for the tiny and default recipes.

    python benchmarks/scaling.py                              # tiny and default, on 1 and 2 processes
    python benchmarks/scaling.py --configs tiny               # about a minute
    python benchmarks/scaling.py --processes 1 2 4 --steps 20 --batch-size 32

Each configuration trains both stages through the real command line, ``python -m blipkit train RECIPE
... --processes N``, with the same global batch (``data.batch_size``) for every N, so that every run
does the same work per optimizer step. ``tiny`` is the tiny random recipe as it ships (stage 1 with
ITC, ITM and ITG); ``default`` is the offline demo (EfficientNet-Lite0, MiniLM-initialised Q-Former
with 8 queries and ITC + ITG, SmolLM2-135M with LoRA) on 400 images and without the lexical warm start
of the projection, which only costs time before stage 2's first step. Every step is logged, and a
stage's throughput is the median ``samples_per_s`` (global samples of a step over its wall time) of
its steps after the first ``--warmup``, pooled over ``--repeats`` runs of each kind; the kinds
alternate, so that a slow spell of the machine hits all of them. The runs share one feature cache in a
temporary directory, filled by an unmeasured run first, so that the frozen encoder runs once per
configuration and no measured run encodes images or writes the cache.

Prints one row per configuration and stage: samples/s on 1 process, on 1 process with cores / N
threads (CPU only), and on N processes, side by side; then two efficiencies at each N > 1:
- ``eff @N`` = throughput(N) / (N x throughput(1)), against one process with all the machine's threads:
  the usual definition, the one a GPU run (a device per process) is held to.
- ``eff/share @N`` (CPU only) = throughput(N) / (N x throughput(1 process with cores / N threads)). On a
  CPU the N processes share the cores (the launcher gives each cores / N threads), so ``eff @N`` there
  also measures how well one process uses all the threads; against a process holding one share of the
  cores, near 1.0 means that running N processes (collectives, gathered negatives, each process's copy
  of the frozen models) costs nothing beyond the compute each one does.
Then the wall time of a whole run, the machine's CPU and GPU count and the torch threads per process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS: dict[str, tuple[str, list[str]]] = {
    "tiny": ("tiny", []),
    "default": ("default", ["~stage2.projection_init", "data.train.options={num_images: 400}"]),
}
STAGES = ("stage1", "stage2")


def train(recipe: str, overrides: list[str], processes: int, run_dir: Path, env: dict[str, str]) -> float:
    """Run ``blipkit train`` on ``processes`` processes into ``run_dir``; returns its wall time in seconds."""
    command = [sys.executable, "-m", "blipkit", "train", recipe, *overrides, "--processes", str(processes)]
    command += ["-o", str(run_dir), "-q"]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command[1:])} failed (exit code {result.returncode}):\n{result.stderr.strip()}")
    return time.perf_counter() - started


def step_rates(run_dir: Path, warmup: int) -> dict[str, list[float]]:
    """Each stage's logged ``samples_per_s`` for its steps after the first ``warmup``."""
    rates: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("stage") in rates and "samples_per_s" in row and row["step"] > warmup:
            rates[row["stage"]].append(row["samples_per_s"])
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument(
        "--processes", nargs="+", type=int, default=[1, 2], help="process counts (1, the baseline, is always run)"
    )
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per stage in each run")
    parser.add_argument("--warmup", type=int, default=4, help="first steps of each stage left out of the median")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind per configuration, interleaved")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch (data.batch_size) for every N")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    if min(args.processes) < 1 or args.repeats < 1:
        parser.error("--processes and --repeats must be at least 1")
    counts = sorted({1, *args.processes})
    scaled = [n for n in counts if n > 1]
    cpus, gpus, threads = os.cpu_count() or 1, torch.cuda.device_count(), torch.get_num_threads()
    # The threads the launcher gives each of N processes on a CPU (cores / N), and beside a GPU each (one).
    share = {n: threads if n == 1 else 1 if gpus else max(1, cpus // n) for n in counts}
    # A run kind is (processes, torch threads of a lone process or None for its default).
    lone = [] if gpus else [(1, t) for t in sorted({share[n] for n in scaled} - {threads})]
    kinds = [(1, None), *lone, *((n, None) for n in scaled)]

    started = time.perf_counter()
    rates: dict[tuple[str, tuple[int, int | None], str], list[float]] = {}
    walls: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="blipkit-scaling-") as scratch:
        env = {**os.environ, "BLIPKIT_CACHE": str(Path(scratch) / "cache")}
        for name in args.configs:
            recipe, extra = CONFIGS[name]
            common = [*extra, f"data.batch_size={args.batch_size}", "checkpoint_every=0"]
            train(recipe, [*common, "stage1.steps=1", "stage2.steps=1"], 1, Path(scratch) / f"{name}-fill", env)
            overrides = [*common, f"stage1.steps={args.steps}", f"stage2.steps={args.steps}", "log_every=1"]
            for repeat in range(args.repeats):
                for n, lone_threads in kinds:
                    run_dir = Path(scratch) / f"{name}-{n}-{lone_threads}-{repeat}"
                    run_env = env if lone_threads is None else {**env, "OMP_NUM_THREADS": str(lone_threads)}
                    wall = train(recipe, overrides, n, run_dir, run_env)
                    if lone_threads is None:
                        walls.setdefault((name, n), []).append(wall)
                    for stage, values in step_rates(run_dir, args.warmup).items():
                        rates.setdefault((name, (n, lone_threads), stage), []).extend(values)

    def column(n: int, lone_threads: int | None) -> str:
        return f"1 proc {lone_threads} thr" if lone_threads is not None else f"{n} proc" + "s" * (n > 1)

    widths = [max(10, len(column(*kind)) + 1) for kind in kinds]
    header = f"{'config':8} {'stage':7}" + "".join(f"{column(*kind):>{w}}" for kind, w in zip(kinds, widths))
    header += "".join(f"{f'eff @{n}':>9}" for n in scaled)
    header += "".join(f"{f'eff/share @{n}':>15}" for n in scaled if not gpus)
    print(header)
    for name in args.configs:
        for stage in STAGES:
            if not rates.get((name, (1, None), stage)):
                continue
            median = {kind: statistics.median(rates[name, kind, stage]) for kind in kinds}
            line = f"{name:8} {stage:7}" + "".join(f"{median[kind]:{w}.1f}" for kind, w in zip(kinds, widths))
            line += "".join(f"{median[n, None] / (n * median[1, None]):9.2f}" for n in scaled)
            if not gpus:
                base = {n: (1, None if share[n] == threads else share[n]) for n in scaled}
                line += "".join(f"{median[n, None] / (n * median[base[n]]):15.2f}" for n in scaled)
            print(line)
    print("(samples/s; eff @N against 1 process with all threads, eff/share @N against 1 with cores / N threads)")
    for name in args.configs:
        runs = ", ".join(f"{statistics.median(walls[name, n]):.0f} s on {n}" for n in counts)
        print(f"{name}: a whole run (loading, both stages, saving) takes {runs} processes (median)")
    print(
        f"({args.steps} steps per stage per run, median over the steps after the first {args.warmup} of "
        f"{args.repeats} runs of each kind, global batch {args.batch_size}; {cpus} CPUs, {gpus} GPUs; torch threads "
        f"per process: {', '.join(f'{share[n]} on {n}' for n in counts)}; {time.perf_counter() - started:.0f} s in all)"
    )


if __name__ == "__main__":
    main()
