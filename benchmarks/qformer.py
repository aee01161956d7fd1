"""Time blipkit's Q-Former against transformers' Blip2QFormerModel, side by side.

Same configuration (BLIP-2: 12 layers x 768, 32 queries, 257 x 1408 image tokens) and the same
weights; fp32; forward + backward with frozen image features. Also times blipkit's full stage-1 step
(ITC + ITM + ITG), which transformers does not implement. FLOPs are counted analytically from the
matmuls each path performs, and compared with a plain matmul measured in the same run.

    python benchmarks/qformer.py                 # CPU (and CUDA when available), batch 1, 4, 8
    python benchmarks/qformer.py --quick         # fewer repeats, batch 1 and 4
    python benchmarks/qformer.py --batch-sizes 2,16 --device cuda
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from blipkit.plugins.bridges.qformer.keymap import map_transformers
from blipkit.plugins.bridges.qformer.model import QFormer
from blipkit.plugins.bridges.qformer.objectives import stage1_loss
from blipkit.plugins.bridges.qformer.weights import load_mapped

QUERIES, HIDDEN, LAYERS, HEADS, FFN, FREQ = 32, 768, 12, 12, 3072, 2
IMAGE_TOKENS, IMAGE_DIM, EMBED, TEXT_LEN = 257, 1408, 256, 32


@dataclass
class Shape:
    """One pass through the Q-Former stack."""

    batch: int
    rows: int  # hidden positions in the pass
    past: int = 0  # cached key/value positions prepended to self-attention
    query_rows: int = 0  # positions that cross-attend
    images_projected: int = 0  # images whose cross-attention keys/values this pass computes


def pass_flops(s: Shape) -> float:
    """Forward matmul FLOPs (2 per multiply-add) of one pass through every layer."""
    total = 0.0
    for layer in range(LAYERS):
        total += 2 * s.batch * s.rows * HIDDEN * HIDDEN * 4  # q, k, v, output projections
        total += 2 * 2 * s.batch * s.rows * (s.rows + s.past) * HIDDEN  # scores and context
        total += 2 * 2 * s.batch * s.rows * HIDDEN * FFN  # feed-forward
        if layer % FREQ == 0 and s.query_rows:
            total += 2 * s.batch * s.query_rows * HIDDEN * HIDDEN * 2  # query and output projections
            total += 2 * 2 * s.images_projected * IMAGE_TOKENS * IMAGE_DIM * HIDDEN  # image keys, values
            total += 2 * 2 * s.batch * s.query_rows * IMAGE_TOKENS * HIDDEN  # scores and context
    return total


def query_path_flops(batch: int) -> float:
    """Forward + backward (3x forward: ln_vision is trainable, so every matmul needs both gradients)."""
    return 3 * pass_flops(Shape(batch, QUERIES, query_rows=QUERIES, images_projected=batch))


def stage1_flops(batch: int, text_len: int, vocab: int) -> float:
    """Forward + backward of ITC + ITM + ITG as blipkit runs them (ITM reuses the query pass's image
    keys/values instead of projecting 3B images again)."""
    forward = pass_flops(Shape(batch, QUERIES, query_rows=QUERIES, images_projected=batch))
    forward += pass_flops(Shape(batch, text_len))
    forward += pass_flops(Shape(3 * batch, QUERIES + text_len, query_rows=QUERIES))
    forward += pass_flops(Shape(batch, text_len, past=QUERIES))
    forward += 2 * batch * (text_len - 1) * (HIDDEN * HIDDEN + HIDDEN * vocab)  # LM head
    forward += 2 * batch * (QUERIES + 1) * HIDDEN * EMBED  # ITC projections
    return 3 * forward


def interleaved(
    steps: dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int, clock: str = "wall"
) -> dict[str, float]:
    """Best time of each step in milliseconds; the steps take turns in every round, so a load spike
    from other processes hits them alike, and the best round is the least disturbed one.

    ``clock="cpu"`` measures this thread's CPU time instead of wall time (with one torch thread all
    work runs on it), which other processes on a shared machine barely disturb.
    """
    now = time.thread_time if clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = now()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= warmup:
                times[name].append((now() - start) * 1000)
    return {name: min(values) for name, values in times.items()}


def matmul_step(device: torch.device, size: int) -> tuple[Callable[[], None], float]:
    """A plain fp32 square matmul (the ceiling to compare against) and its FLOPs."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    return (lambda: torch.mm(a, b)), 2.0 * size**3


def build(device: torch.device) -> tuple[torch.nn.Module, torch.nn.Parameter, torch.nn.LayerNorm, QFormer]:
    """transformers' Q-Former (with query tokens and ln_vision) and blipkit's with the same weights."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    config = Blip2QFormerConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        cross_attention_frequency=FREQ,
        encoder_hidden_size=IMAGE_DIM,
        vocab_size=30523,
    )
    reference = Blip2QFormerModel(config)
    query_tokens = torch.nn.Parameter(torch.randn(1, QUERIES, HIDDEN) * 0.02)
    ln_vision = torch.nn.LayerNorm(IMAGE_DIM, eps=1e-5)
    state = {f"qformer.{k}": v for k, v in reference.state_dict().items()}
    state["query_tokens"] = query_tokens.data
    state["vision_model.post_layernorm.weight"] = ln_vision.weight.data
    state["vision_model.post_layernorm.bias"] = ln_vision.bias.data
    ours = QFormer(
        input_dim=IMAGE_DIM, num_queries=QUERIES, num_layers=LAYERS, hidden_size=HIDDEN, num_heads=HEADS,
        intermediate_size=FFN, cross_attention_freq=FREQ, tokenizer="minilm", embed_dim=EMBED,
    )
    load_mapped(ours, map_transformers(state)[0], "benchmark")
    for module in (reference, ln_vision, ours):
        module.to(device).train()
    return reference, torch.nn.Parameter(query_tokens.to(device)), ln_vision, ours


def run(
    device: torch.device, batch_sizes: list[int], repeats: int, warmup: int, stage1: bool, clock: str
) -> None:
    """Print one table for ``device``."""
    torch.manual_seed(0)
    reference, query_tokens, ln_vision, ours = build(device)
    matmul, matmul_flops = matmul_step(device, 2048 if device.type == "cpu" else 8192)
    name = f"CPU, {torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    clock = clock if device.type == "cpu" else "wall"
    print(
        f"\n{name}; fp32; {clock} clock, best of {repeats} after {warmup} warm-up; "
        "% matmul = achieved / plain matmul rate"
    )
    header = (
        f"{'workload':<26}{'batch':>6}{'ms':>10}{'GFLOP':>8}{'GFLOP/s':>9}{'matmul':>8}{'% matmul':>10}"
        f"{'blipkit/transformers':>22}"
    )
    print(header)
    print("-" * len(header))
    texts = [f"a photo of {i} red circles and a blue square left of a tall green tree" for i in range(max(batch_sizes))]

    for batch in batch_sizes:
        image = torch.randn(batch, IMAGE_TOKENS, IMAGE_DIM, device=device)
        tokens = ours.tokenize(texts[:batch])

        def transformers_step() -> None:
            out = reference(
                query_embeds=query_tokens.expand(batch, -1, -1), encoder_hidden_states=ln_vision(image)
            ).last_hidden_state
            out.pow(2).mean().backward()
            reference.zero_grad(set_to_none=True)

        def blipkit_step() -> None:
            ours(image).queries.pow(2).mean().backward()
            ours.zero_grad(set_to_none=True)

        def stage1_step() -> None:
            stage1_loss(ours, image, tokens)["loss"].backward()
            ours.zero_grad(set_to_none=True)

        steps = {"matmul": matmul, "transformers": transformers_step, "blipkit": blipkit_step}
        if stage1 and batch > 1:
            steps["stage1"] = stage1_step
        ms = interleaved(steps, device, repeats, warmup, clock)
        rate = matmul_flops / ms["matmul"] / 1e6
        query = query_path_flops(batch)
        rows = [
            ("query path: transformers", ms["transformers"], query, ""),
            ("query path: blipkit", ms["blipkit"], query, f"{ms['transformers'] / ms['blipkit']:.2f}x speed"),
        ]
        if "stage1" in ms:
            flops = stage1_flops(batch, tokens["input_ids"].shape[1], len(ours.tokenizer))
            rows.append(("stage-1 step: blipkit", ms["stage1"], flops, "n/a"))
        for label, millis, flops, ratio in rows:
            gflops = flops / millis / 1e6
            print(
                f"{label:<26}{batch:>6}{millis:>10.1f}{flops / 1e9:>8.1f}{gflops:>9.1f}{rate:>8.0f}"
                f"{100 * gflops / rate:>9.0f}%{ratio:>22}"
            )


def main() -> None:
    """Parse flags and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,4,8; --quick: 1,4)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and batch sizes")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    parser.add_argument("--no-stage1", action="store_true", help="skip the stage-1 step")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="cpu: time this thread's CPU use (forces --threads 1; steady on a shared machine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1 if args.clock == "cpu" else args.threads)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,4" if args.quick else "1,4,8")).split(",")]
    repeats = args.repeats or (2 if args.quick else 3)
    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    for name in devices:
        if name == "cuda" and not torch.cuda.is_available():
            continue
        run(torch.device(name), batch_sizes, repeats, warmup=1, stage1=not args.no_stage1, clock=args.clock)


if __name__ == "__main__":
    main()
