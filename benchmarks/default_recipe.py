"""Does the offline default learn? Train it (or take a run) and score it on held-out shapes pictures.

    python benchmarks/default_recipe.py                    # train `blipkit train`'s default, then evaluate
    python benchmarks/default_recipe.py --run runs/default # evaluate an existing run

Scores two sets of pictures the model never trained on: the ``shapes`` test split, and ``shapes-redrawn``,
the same captions and questions drawn by a second, independent renderer (other shades, backgrounds and
sizes). For each it prints the share of single-shape images whose caption names the right colour and
shape (targets >= 95% and >= 92%), of two-shape captions with both colours bound to the right shapes
(and, ``_exact``, with the relation right too; target >= 75%), the VQA accuracy (target >= 85%),
caption BLEU/CIDEr, chance levels, and the wall time of each phase.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import blipkit
from blipkit.config import load_recipe
from blipkit.eval.evaluate import evaluate, write_results
from blipkit.plugins.datasets.shapes_scoring import SHAPE_WORDS, mentions
from blipkit.eval.vqa import normalize_answer
from blipkit.data.dataset import open_dataset
from blipkit.features import cached_features
from blipkit.train.runner import train

# Chance levels on shapes: 6 colours x 3 shapes for a one-shape caption; answers to colour (1/6),
# shape (1/3) and count (1/2) questions, weighted as the test split asks them.
CHANCE_CAPTION_SINGLE = 1 / 18


def question_type(answer: str) -> str:
    """``count``, ``shape`` or ``colour``: what a shapes question asks, read off its answer."""
    return "count" if answer.isdigit() else "shape" if answer in SHAPE_WORDS else "colour"


def breakdown(captions: list[dict], answers: list[dict]) -> dict[str, float]:
    """Where the errors are: single-shape captions' colour and shape words, and VQA accuracy by question type."""
    single = [p for p in captions if len(p["objects"]) == 1]
    named = [mentions(p["caption"]) for p in single]
    report = {
        "single_shape_colour_right": sum(set(m[0]) == {p["objects"][0]["color"]} for m, p in zip(named, single)),
        "single_shape_shape_right": sum(set(m[1]) == {p["objects"][0]["shape"]} for m, p in zip(named, single)),
    }
    report = {name: count / max(1, len(single)) for name, count in report.items()}
    for kind in ("count", "shape", "colour"):
        rows = [p for p in answers if question_type(p["answers"][0]) == kind]
        right = sum(normalize_answer(p["answer"]) == normalize_answer(p["answers"][0]) for p in rows)
        report[f"vqa_{kind}_accuracy"] = right / max(1, len(rows))
    return report


def score(model: object, name: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Caption and VQA figures of ``model`` on the test split of dataset ``name``, with their timings."""
    started = time.perf_counter()
    options = {"num_images": args.num_images} if args.num_images else {}
    test = cached_features(model, open_dataset(name, "test", options), quiet=True)
    timings = {"load_and_encode_s": time.perf_counter() - started}
    generation = {"num_beams": args.beams}
    started = time.perf_counter()
    caption_generation = {**generation, "max_new_tokens": 16}
    captions = evaluate(model, test, "caption", batch_size=args.batch_size, generation=caption_generation)
    timings["caption_eval_s"] = time.perf_counter() - started
    started = time.perf_counter()
    vqa = evaluate(model, test, "vqa", batch_size=args.batch_size, generation=generation)
    timings["vqa_eval_s"] = time.perf_counter() - started
    write_results(captions, out / name)
    write_results(vqa, out / name)

    questions = [p["answers"][0] for p in vqa.predictions]
    chance = {"count": 1 / 2, "shape": 1 / 3, "colour": 1 / 6}
    report = {
        "single_shape_caption_accuracy": captions.scores["shapes_single_shape"],
        "single_shape_images": captions.scores["shapes_single_count"],
        "two_shape_caption_accuracy": captions.scores["shapes_two_shapes"],
        "two_shape_caption_exact": captions.scores.get("shapes_two_shapes_exact"),
        "two_shape_images": captions.scores["shapes_two_count"],
        "vqa_accuracy": vqa.scores["accuracy"],
        "vqa_questions": vqa.scores["count"],
        "chance_single_shape_caption": CHANCE_CAPTION_SINGLE,
        "chance_vqa": sum(chance[question_type(a)] for a in questions) / len(questions),
        "Bleu_4": captions.scores["Bleu_4"],
        "CIDEr": captions.scores["CIDEr"],
        **breakdown(captions.predictions, vqa.predictions),
        **timings,
    }
    print(f"{name}:")
    for sample in captions.predictions[:5]:
        print(f"  {sample['caption']!r:45} <- {sample['references'][0]!r}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="evaluate this run directory instead of training one")
    parser.add_argument("--output", type=Path, default=Path("runs/benchmark-default"), help="where to train")
    parser.add_argument("--beams", type=int, default=1, help="beam width for captions and answers (default greedy)")
    parser.add_argument("--num-images", type=int, default=None, help="test images per set (default: 240)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("overrides", nargs="*", help="recipe overrides for training, e.g. stage2.steps=100")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    report: dict[str, object] = {}
    run = args.run
    if run is None:
        started = time.perf_counter()
        recipe = load_recipe("default", args.overrides)
        train(recipe, output=args.output, overwrite=True)
        report["train_s"] = time.perf_counter() - started
        run = args.output
    model = blipkit.load(run)
    out = Path(run) / "eval-test"
    for name in ("shapes", "shapes-redrawn"):
        report[name] = score(model, name, args, out)
    print(json.dumps(report, indent=2))
    print(f"predictions and scores written to {out}")


if __name__ == "__main__":
    main()
