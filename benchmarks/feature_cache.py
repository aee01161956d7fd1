"""Epoch time of stage-1 training with and without the frozen-feature cache, side by side.

    python benchmarks/feature_cache.py                 # ViT-B-16-sized open_clip encoder and efficientnet-lite0
    python benchmarks/feature_cache.py --images 64 --batch-size 16 --repeats 3
    python benchmarks/feature_cache.py --device cuda --images 512 --batch-size 64
    python benchmarks/feature_cache.py --objectives itc,itm,itg    # BLIP-2's three stage-1 objectives

Both epochs run the same Q-Former stage-1 steps (the default recipe's bridge as the recipe configures it:
MiniLM-initialised, 8 queries, no dropout, ITC and ITG without ITM; and its stage-1 optimizer) on the
same synthetic shapes images. ``--objectives`` trains another set: with BLIP-2's ITM, a pass over three
image-text pairs per image, the step is about twice as long and the cache gains less. "uncached" encodes
every batch with the frozen encoder, as a training loop without a cache does every epoch; "cached" reads
fp16 tokens from the Arrow cache filled beforehand (the fill is timed separately: it is paid once per
encoder and dataset, across epochs, stages and runs). Uncached and cached epochs alternate,
``--repeats`` times each, and the medians are compared, so that a slow spell of the machine hits both.
Random ViT weights are fine for timing. Prints seconds per epoch and the speed-up; target >= 5x for ViT-B-16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import torch

from blipkit.plugins.bridges.qformer.objectives import stage1_loss
from blipkit.train.memory import reuse_freed_memory


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall times are whole."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch(model, loader_batches, optimizer) -> float:
    device = model.device
    synchronize(device)
    started = time.perf_counter()
    for batch in loader_batches():
        tokens = model.batch_tokens(batch)
        ids = batch["image_keys"].to(device)
        losses = stage1_loss(model.bridge, tokens, batch["bridge_text"], image_ids=ids)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - started


def run(
    encoder_name: str,
    encoder_options: dict,
    images: int,
    batch_size: int,
    device: str,
    repeats: int,
    objectives: list[str] | None,
) -> dict[str, Any]:
    from blipkit.config import load_recipe
    from blipkit.data.feature_cache import CachedFeatureDataset, FeatureCache
    from blipkit.model.vlm import VisionLanguageModel
    from blipkit.plugin_manager import registries
    from blipkit.train.optim import build_optimizer
    from blipkit.data.dataset import open_dataset

    regs = registries()
    recipe = load_recipe("default")
    encoder = regs.encoders.create(encoder_name, **encoder_options)
    options = {**recipe.bridge.options, **({"objectives": objectives} if objectives else {})}
    bridge = regs.bridges.create(recipe.bridge.name, input_dim=encoder.feature_dim, **options)
    model = VisionLanguageModel(encoder, bridge).to(device)
    model.train()
    optimizer = build_optimizer({"bridge": bridge}, recipe.stage1)
    dataset = open_dataset("shapes", "train", {"num_images": images, "image_size": encoder.image_size, "tasks": "caption"})
    collate = regs.objectives.create("blip2-stage1").collator(model, recipe)
    order = list(range(len(dataset)))

    def batches(source, limit: int | None = None):
        def produce():
            for start in range(0, len(order) - batch_size + 1, batch_size)[:limit]:
                yield collate([source[i] for i in order[start : start + batch_size]])
        return produce

    epoch(model, batches(dataset, limit=1), optimizer)  # warm-up: allocator, kernels, lazy initialisation
    cache = FeatureCache(encoder.cache_key)
    synchronize(model.device)
    started = time.perf_counter()
    keys = cache.fill(dataset.records, lambda ims: model.image_tokens(torch.stack([encoder.preprocess(i) for i in ims])))
    fill = time.perf_counter() - started
    cached_dataset = CachedFeatureDataset(dataset, cache, keys)
    uncached, cached = [], []
    for _ in range(repeats):
        uncached.append(epoch(model, batches(dataset), optimizer))
        cached.append(epoch(model, batches(cached_dataset), optimizer))
    uncached_s, cached_s = statistics.median(uncached), statistics.median(cached)
    return {
        "uncached_s": uncached_s,
        "cached_s": cached_s,
        "fill_s": fill,
        "speedup": uncached_s / cached_s,
        "objectives": "+".join(bridge.objectives),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="epochs of each kind; their medians are compared")
    parser.add_argument(
        "--objectives", help="stage-1 losses the bridge trains, comma-separated (default: the default recipe's)"
    )
    args = parser.parse_args()
    os.environ.setdefault("BLIPKIT_CACHE", tempfile.mkdtemp(prefix="blipkit-bench-"))
    objectives = [name.strip() for name in args.objectives.split(",") if name.strip()] if args.objectives else None
    encoders = [
        ("open_clip:ViT-B-16 (random, 224px)", "open_clip:ViT-B-16", {"pretrained": None}),
        ("efficientnet-lite0", "efficientnet-lite0", {}),
    ]
    print(f"{'encoder':38} {'uncached epoch':>15} {'cached epoch':>13} {'one-time fill':>14} {'speed-up':>9}")
    for label, name, options in encoders:
        # The allocator setting blipkit's trainer uses on the CPU, for every epoch of both kinds.
        with reuse_freed_memory(enabled=torch.device(args.device).type == "cpu"):
            r = run(name, options, args.images, args.batch_size, args.device, args.repeats, objectives)
        print(f"{label:38} {r['uncached_s']:14.2f}s {r['cached_s']:12.2f}s {r['fill_s']:13.2f}s {r['speedup']:8.1f}x")
    print(
        f"({args.images} images, batch {args.batch_size}, stage-1 objectives {r['objectives']}, median of "
        f"{args.repeats} epochs each, {torch.get_num_threads()} threads, device {args.device})"
    )


if __name__ == "__main__":
    main()
