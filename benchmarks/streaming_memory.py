"""Peak memory of training on streaming data does not grow with the dataset: 10k against 100k samples.

    python benchmarks/streaming_memory.py                       # 10k and 100k samples
    python benchmarks/streaming_memory.py --sizes 10000 100000 --steps 30

Writes synthetic WebDataset shards (16x16 PNGs with captions, 5000 samples a shard) for each size, then, in
a fresh process per size and measure: (1) reads one whole epoch of the stream through blipkit's readers
(decoding every image, shuffle buffer of 1000) and (2) trains the tiny recipe for ``--steps`` steps on it
with ``webdataset:``. Prints the peak resident memory of each process (ru_maxrss) and the ratio of the
largest size to the smallest; the goal is within 10% (1.10).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

PER_SHARD = 5000

READ_EPOCH = """
import sys, torch
from blipkit.data.collate import Collator
from blipkit.data.dataset import open_dataset
from blipkit.data.stream import StreamBatches
dataset = open_dataset(sys.argv[1], "train", {})
collate = Collator(lambda image: torch.zeros(1), lambda kept: {})
batches = iter(StreamBatches(dataset, ["caption"], 64, collate, 0, 0, 1, 1, 1000))
seen = 0
while seen < int(sys.argv[2]):
    seen += len(next(batches)["image_ids"])
print(seen)
"""


def write_shards(folder: Path, samples: int) -> str:
    """``samples`` synthetic samples in shards of ``PER_SHARD``; returns the webdataset: pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = (samples + PER_SHARD - 1) // PER_SHARD
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as archive:
            for i in range(shard * PER_SHARD, min(samples, (shard + 1) * PER_SHARD)):
                picture = io.BytesIO()
                Image.new("RGB", (16, 16), (i % 256, (i // 256) % 256, 90)).save(picture, format="PNG")
                for name, data in ((f"{i:07d}.png", picture.getvalue()), (f"{i:07d}.txt", f"sample {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return f"webdataset:{folder}/{{00000..{shards - 1:05d}}}.tar"


MEASURE = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if done.returncode:
    sys.exit(done.stderr[-2000:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_mib(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run ``command`` alone in a fresh process; its peak resident memory (MiB) and wall time (s)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return int(done.stdout.split()[-1]) / 1024, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            pattern = write_shards(Path(tmp) / f"n{size}", size)
            read_mib, read_s = peak_rss_mib([sys.executable, "-c", READ_EPOCH, pattern, str(size * 9 // 10)])
            env = {"BLIPKIT_CACHE": str(Path(tmp) / "cache"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
            train = [sys.executable, "-m", "blipkit", "train", "tiny", f"data.train={{name: '{pattern}'}}", "~stage1",
                     f"stage2.steps={args.steps}", "stage2.tasks=[caption]", "-o", str(Path(tmp) / f"run{size}"), "-q"]
            train_mib, train_s = peak_rss_mib(train, env)
            rows.append({"samples": size, "read_epoch_mib": round(read_mib, 1), "read_s": round(read_s, 1),
                         "train_mib": round(train_mib, 1), "train_s": round(train_s, 1)})
    print(json.dumps(rows, indent=2))
    for key in ("read_epoch_mib", "train_mib"):
        print(f"{key}: largest / smallest = {rows[-1][key] / rows[0][key]:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
