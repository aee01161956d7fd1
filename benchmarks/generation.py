"""Time blipkit's captioning against transformers' Blip2ForConditionalGeneration.generate, same weights.

A BLIP-2 with random weights (a 224px ViT, a 32-query Q-Former and an OPT or T5 language model, each a
few layers; an 8k-word tokenizer so that the vocabulary head costs what a real one does per token) is
saved with ``save_pretrained`` and loaded with ``blipkit.load``: the two sides run identical weights on
identical pixels. Greedy and beam 5 at batch 1, 8 and 32; prints images/s and the ratio
blipkit/transformers, and checks that blipkit's batched ids equal its one-image ids and transformers'.

    python benchmarks/generation.py                    # OPT, CPU (CUDA when available)
    python benchmarks/generation.py --llm t5           # encoder-decoder
    python benchmarks/generation.py --quick            # fewer images and tokens, a smoke run
    python benchmarks/generation.py --threads 1 --clock cpu   # on a CPU that other work shares
    python benchmarks/generation.py --device cuda --images 64 --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import blipkit

IMAGE_SIZE = 224
NUM_QUERIES = 32
VOCAB_WORDS = 8192


def build_tokenizer(family: str) -> Any:
    """A word-level tokenizer over ``VOCAB_WORDS`` made-up words, with pad, unk, BOS, EOS and ``<image>``;
    it puts BOS first as OPT's does, or EOS last as T5's does."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    vocab = {token: index for index, token in enumerate(specials + [f"w{i}" for i in range(VOCAB_WORDS)])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    special = ("<s>", vocab["<s>"]) if family == "opt" else ("</s>", vocab["</s>"])
    template = "<s> $A" if family == "opt" else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[special])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<image>"],
    )


def save_blip2(folder: Path, family: str) -> Any:
    """Write a random Blip2ForConditionalGeneration (``opt`` or ``t5``) and its processor; return the model."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
        T5Config,
    )

    tokenizer = build_tokenizer(family)
    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "opt":
        text = OPTConfig(
            vocab_size=len(tokenizer), hidden_size=512, num_hidden_layers=4, ffn_dim=2048, num_attention_heads=8,
            word_embed_proj_dim=512, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id, **special,
        )
    else:
        text = T5Config(
            vocab_size=len(tokenizer), d_model=512, d_kv=64, d_ff=2048, num_layers=4, num_heads=8,
            dropout_rate=0.0, feed_forward_proj="gated-gelu", decoder_start_token_id=tokenizer.pad_token_id, **special,
        )
    vision = Blip2VisionConfig(
        hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
        image_size=IMAGE_SIZE, patch_size=16,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=1536,
        encoder_hidden_size=384,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=NUM_QUERIES, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():  # spread the weights so that different images give different captions
        for param in model.language_projection.parameters():
            param.mul_(20.0)
        if family == "t5":  # a random T5 says one word whatever it reads; sharper weights listen
            for param in model.language_model.parameters():
                param.mul_(4.0)
    model.eval()
    model.save_pretrained(folder)
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer, num_query_tokens=NUM_QUERIES,
    )
    processor.save_pretrained(folder)
    return model


def settings(beams: int, new_tokens: int) -> dict[str, Any]:
    """The generation options both sides run with (blipkit's caption defaults made explicit)."""
    return {"num_beams": beams, "max_new_tokens": new_tokens, "min_new_tokens": 0, "repetition_penalty": 1.0,
            "length_penalty": 1.0, "do_sample": False}


def trimmed(rows: torch.Tensor, stop: int) -> list[list[int]]:
    """Each row of ids up to and including its first ``stop`` (the rest is padding)."""
    out = []
    for row in rows.tolist():
        out.append(row[: row.index(stop) + 1] if stop in row else row)
    return out


class Sides:
    """The same weights as a blipkit model and as transformers' Blip2ForConditionalGeneration."""

    def __init__(self, folder: Path, reference: Any, device: torch.device) -> None:
        self.reference = reference.to(device)
        self.model = blipkit.load(folder, device=device)
        self.eos = self.model.llm.eos_token_id
        self.decoder_only = not self.model.llm.is_encoder_decoder
        self.seen: list[torch.Tensor] = []
        original = self.model.llm._run_generate

        def spy(**inputs: Any) -> torch.Tensor:
            self.seen.append(original(**inputs))
            return self.seen[-1]

        self.model.llm._run_generate = spy

    def blipkit(self, pixels: torch.Tensor, options: dict[str, Any]) -> list[str]:
        """Captions the way ``blipkit caption`` makes them (after image loading)."""
        return self.model.caption(pixels, prompt="", **options)

    def transformers(self, pixels: torch.Tensor, options: dict[str, Any]) -> list[str]:
        """Captions through transformers' own generate and decode."""
        inputs: dict[str, torch.Tensor] = {}
        if not self.decoder_only:  # T5 has no BOS: the encoder reads [image tokens][EOS], as blipkit's does
            config = self.reference.config
            row = [config.image_token_index] * NUM_QUERIES + [self.eos]
            inputs["input_ids"] = torch.tensor([row] * len(pixels), device=pixels.device)
        with torch.no_grad():
            ids = self.reference.generate(pixel_values=pixels, **inputs, **options)
        if self.decoder_only:  # transformers returns [image tokens][BOS] before the new ids
            ids = ids[:, NUM_QUERIES + 1 :]
        self.seen.append(ids)
        return self.model.llm.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def ids(self, run: Callable[[torch.Tensor, dict[str, Any]], list[str]], pixels: torch.Tensor,
            options: dict[str, Any], batch: int) -> list[list[int]]:
        """The new token ids of every image, generated ``batch`` images at a time."""
        rows: list[list[int]] = []
        for start in range(0, len(pixels), batch):
            self.seen.clear()
            run(pixels[start : start + batch], options)
            (ids,) = self.seen
            rows += trimmed(ids[:, 1:] if not self.decoder_only else ids, self.eos)
        return rows


def timed(run: Callable[[], object], device: torch.device, clock: str) -> float:
    """Seconds ``run`` takes: wall time, or with ``clock`` "cpu" the CPU time of this process (which other
    processes on a shared machine barely change)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = now()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return now() - start


def measure(sides: Sides, pixels: torch.Tensor, options: dict[str, Any], batch: int, repeats: int,
            device: torch.device, clock: str) -> tuple[float, float, list[list[int]], list[list[int]]]:
    """Images/s of blipkit and transformers over ``pixels``, and the ids each generated (in a first pass,
    which also warms up). The two then run alternately ``repeats`` times and each keeps its fastest run: other
    work on the machine only ever slows a run down."""
    ours_ids = sides.ids(sides.blipkit, pixels, options, batch)
    theirs_ids = sides.ids(sides.transformers, pixels, options, batch)
    def over_all(side: str) -> None:
        for start in range(0, len(pixels), batch):
            getattr(sides, side)(pixels[start : start + batch], options)
        sides.seen.clear()

    times: dict[str, list[float]] = {"blipkit": [], "transformers": []}
    for _ in range(repeats):
        for side in times:
            times[side].append(timed(functools.partial(over_all, side), device, clock))
    ours, theirs = (len(pixels) / min(times[side]) for side in times)
    return ours, theirs, ours_ids, theirs_ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", choices=["opt", "t5"], default="opt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--images", type=int, default=32, help="images per timing (a multiple of each batch size)")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side (the fastest counts)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: time by this process's CPU time, for a CPU shared with other work (use --threads 1)")
    parser.add_argument("--quick", action="store_true", help="8 images, 8 new tokens, batch 1 and 8, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.images, args.new_tokens, args.repeats, args.batch_sizes = 8, 8, 1, "1,8"
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures CPU runs only")
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    torch.manual_seed(1)
    pixels = torch.randn(args.images, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    with tempfile.TemporaryDirectory() as folder:
        sides = Sides(Path(folder), save_blip2(Path(folder), args.llm), device)
    print(f"BLIP-2 ({args.llm}) with random weights, {args.images} images of {IMAGE_SIZE}px, "
          f"{args.new_tokens} new tokens, {device}, {torch.get_num_threads()} threads, {args.clock} time")
    print(f"{'decoding':10} {'batch':>5} {'blipkit img/s':>14} {'transformers img/s':>19} {'ratio':>6}", flush=True)
    problems = []
    for beams, label in ((1, "greedy"), (5, "beam 5")):
        options = settings(beams, args.new_tokens)
        single: list[list[int]] | None = None
        for batch in batches:
            measured = measure(sides, pixels, options, batch, args.repeats, device, args.clock)
            ours, theirs, ours_ids, theirs_ids = measured
            print(f"{label:10} {batch:5d} {ours:14.2f} {theirs:19.2f} {ours / theirs:5.2f}x", flush=True)
            if single is None:
                single = sides.ids(sides.blipkit, pixels, options, 1) if batch != 1 else ours_ids
                if len({tuple(row) for row in single}) < 2:
                    problems.append(f"{label}: every image gets the same caption; the check proves nothing")
            if ours_ids != single:
                problems.append(f"{label}: blipkit at batch {batch} differs from blipkit at batch 1")
            if theirs_ids != single:
                problems.append(f"{label}: transformers at batch {batch} differs from blipkit at batch 1")
    print("batched ids equal one-image ids and transformers' ids: " + ("yes" if not problems else "NO"))
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
