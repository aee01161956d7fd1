"""Images/s of blipkit's input pipeline (JPEG decode + the encoder's preprocess) per DataLoader worker count,
against the frozen encoder's own images/s on the same machine.

    python benchmarks/input_pipeline.py                               # 256 JPEGs, workers 0 1 2, ViT-B/16
    python benchmarks/input_pipeline.py --workers 0 1 2 4 --images 512 --repeats 5
    python benchmarks/input_pipeline.py --encoder tiny-vit            # any registered encoder, random weights

The images are synthetic photo-like JPEGs (smooth colour gradients and blobs plus sensor-like noise,
quality 90, 640x480 and every fourth one 480x640), written to a temporary folder, so that decoding costs
what it costs on real photos. The pipeline is the one training runs: an ``ImageTextDataset`` of records
holding the paths, whose ``__getitem__`` decodes with ``blipkit.data.images.load_image``, batched by a
torch ``DataLoader`` with ``num_workers`` whose collate function is blipkit's ``Collator`` (the encoder's
``preprocess`` on every image, then a stack). An epoch is timed from ``iter(loader)`` to the last batch,
on persistent workers started by a warm-up epoch (training starts them once per stage). The encoder is
timed on forward passes of one preprocessed batch, no grad. Pipeline epochs and encoder batches
alternate, ``--repeats`` times each, and medians are compared, so that a slow spell of a shared machine
hits both; the load average before and after shows whether other work shared the CPUs.

Prints images/s per worker count and the ratio pipeline / encoder: above 1 means the data keeps up with
the encoder when the two are timed apart (in training they share the same cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from blipkit.data.collate import Collator
from blipkit.data.dataset import ImageTextDataset
from blipkit.data.sample import Record, Sample
from blipkit.plugin_manager import registries


def write_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` photo-like JPEGs in ``folder``: gradients and soft blobs plus noise, 640x480 or 480x640."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        width, height = (480, 640) if index % 4 == 3 else (640, 480)
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        corners = rng.uniform(0, 255, (2, 2, 3)).astype(np.float32)
        fx, fy = (x / width)[..., None], (y / height)[..., None]
        gradient = (corners[0, 0] * (1 - fx) * (1 - fy) + corners[0, 1] * fx * (1 - fy)
                    + corners[1, 0] * (1 - fx) * fy + corners[1, 1] * fx * fy)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        pixels = 0.6 * gradient + 0.4 * np.asarray(coarse, dtype=np.float32) + rng.normal(0, 12, (height, width, 3))
        path = folder / f"photo_{index:04d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def no_text(samples: list[Sample]) -> dict[str, Any]:
    """The collator's text part: nothing (only images are timed)."""
    return {}


def pipeline_epoch(loader: DataLoader) -> tuple[float, int]:
    """Seconds for one pass over ``loader`` and the number of images it produced."""
    started = time.perf_counter()
    images = sum(batch["size"] for batch in loader)
    return time.perf_counter() - started, images


def encoder_batch(encoder: torch.nn.Module, pixels: torch.Tensor) -> float:
    """Seconds for one forward pass of ``pixels`` through ``encoder``."""
    started = time.perf_counter()
    with torch.inference_mode():
        encoder(pixels)
    return time.perf_counter() - started


def run(
    encoder_name: str,
    encoder_options: dict[str, Any],
    images: int,
    batch_size: int,
    workers: list[int],
    repeats: int,
) -> dict[str, Any]:
    """Median images/s of the pipeline per worker count and of the encoder."""
    encoder = registries().encoders.create(encoder_name, **encoder_options).eval()
    with tempfile.TemporaryDirectory(prefix="blipkit-input-bench-") as folder:
        paths = write_photos(Path(folder), images)
        mean_kib = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        dataset = ImageTextDataset([Record(p, "a photo", image_id=p.stem) for p in paths], name="photos")
        collate = Collator(encoder.preprocess, no_text)
        loaders = {
            n: DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=n, persistent_workers=n > 0)
            for n in workers
        }
        for loader in loaders.values():
            pipeline_epoch(loader)  # warm-up: starts the workers, fills the OS file cache
        pixels = next(iter(loaders[workers[0]]))["pixel_values"]
        encoder_batch(encoder, pixels[:2])  # warm-up: allocator, kernels
        epochs: dict[int, list[float]] = {n: [] for n in workers}
        forward: list[float] = []
        for _ in range(repeats):
            for n, loader in loaders.items():
                seconds, produced = pipeline_epoch(loader)
                epochs[n].append(produced / seconds)
            forward.append(len(pixels) / encoder_batch(encoder, pixels))
    return {
        "pipeline": {n: statistics.median(rates) for n, rates in epochs.items()},
        "encoder": statistics.median(forward),
        "tokens": encoder.num_tokens,
        "dim": encoder.feature_dim,
        "size": encoder.image_size,
        "mean_kib": mean_kib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="synthetic JPEGs per epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader num_workers to time")
    parser.add_argument("--repeats", type=int, default=3, help="epochs and encoder batches of each; medians are compared")
    parser.add_argument("--encoder", default="open_clip:ViT-B-16", help="a registered encoder (random weights)")
    args = parser.parse_args()
    options: dict[str, Any] = {"pretrained": None} if args.encoder.startswith("open_clip:") else {}
    load_before = os.getloadavg()[0]
    r = run(args.encoder, options, args.images, args.batch_size, args.workers, args.repeats)
    label = f"{args.encoder} forward, batch {args.batch_size}"
    print(f"{'':44} {'images/s':>9} {'pipeline / encoder':>19}")
    for n, rate in r["pipeline"].items():
        row = f"pipeline, {n} worker{'' if n == 1 else 's'}"
        print(f"{row:44} {rate:9.1f} {rate / r['encoder']:18.1f}x")
    print(f"{label:44} {r['encoder']:9.1f}")
    print(
        f"({args.images} JPEGs 640x480 (1 in 4 portrait), {r['mean_kib']:.0f} KiB mean -> {r['size']} px, "
        f"{r['tokens']} tokens x {r['dim']}; median of {args.repeats}; {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)"
    )


if __name__ == "__main__":
    main()
