"""Inference commands of the ``blipkit`` CLI: caption, ask, retrieve, attention, eval."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from blipkit.errors import DataError, one_line

if TYPE_CHECKING:
    from blipkit.batch_inference import Question


def _resolve_model(model: str | None) -> str:
    from blipkit.model.persistence import last_run

    return model or str(last_run())


class _Skips:
    """The inputs a command over several images could not use: each is named on stderr when it is met, and
    ``finish`` then ends the command with exit status 1 (after every good result was printed)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, item: object, err: DataError) -> None:
        self.count += 1
        message = one_line(err)
        # print, not click.echo: a progress bar on stderr takes print's lines through itself, above the bar
        print(f"Skipped {message if message.startswith(str(item)) else f'{item}: {message}'}", file=sys.stderr, flush=True)

    def finish(self, total: int, done: str) -> None:
        """Raise when anything was skipped: ``total`` inputs in all, ``done`` says what became of the others."""
        if self.count == total:
            raise DataError(f"none of the {total} inputs could be used (each is named above)")
        if self.count:
            raise DataError(f"skipped {self.count} of {total} inputs (each is named above); {done}")


def _image_paths(inputs: tuple[str, ...], skips: _Skips) -> list[Path]:
    """The image files that ``inputs`` name; with several inputs, one that names no image is skipped
    (DataError when none is left)."""
    from blipkit.data.images import iter_image_paths

    paths = list(iter_image_paths(inputs, on_error=skips if len(inputs) > 1 else None))
    if not paths:
        skips.finish(skips.count, "")
    return paths


def _progress(label: str, total: int, quiet: bool) -> Any:
    """A counting progress bar on stderr for more than one input, unless ``quiet``. It is shown only while
    the results go to a file or pipe: on a terminal, the printed results already show the progress, and
    lines written to stdout would cut through the bar."""
    from blipkit.train.feedback import CountProgress

    return CountProgress(label, total, quiet=quiet or total < 2 or sys.stdout.isatty())


def _batch_size(unit: str) -> Any:
    return click.option(
        "--batch-size", "-b", type=click.IntRange(min=1), default=8, show_default=True,
        help=f"{unit} per forward pass: larger is faster (on a GPU especially) and needs more memory; beam search "
        "and greedy decoding give the same results at any size.",
    )


@click.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--model", "-m", help="Run directory or BLIP-2 checkpoint (default: the last 'blipkit train' run).")
@click.option("--prompt", default=None, help="Text the caption continues (default: the recipe's caption prompt).")
@click.option("--beams", type=click.IntRange(min=1), default=None, help="Beam width (default 5).")
@click.option("--sample", is_flag=True, help="Nucleus sampling instead of beam search.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=None, help="With --sample (default 0.9).")
@click.option("--temperature", type=click.FloatRange(min=0.0, min_open=True), default=None, help="With --sample (default 1.0).")
@click.option("--num-captions", "-n", type=click.IntRange(min=1), default=1, show_default=True, help="Captions per image.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Longest caption in tokens.")
@_batch_size("Images")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per image: {image, caption} (or captions).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (shown when the results go to a file or pipe).")
def caption(images: tuple[str, ...], model: str | None, prompt: str | None, beams: int | None, sample: bool,
            top_p: float | None, temperature: float | None, num_captions: int, max_new_tokens: int | None,
            batch_size: int, as_json: bool, quiet: bool) -> None:
    """Caption IMAGES (files, folders or globs) with a trained model.

    \b
    Beam search by default (BLIP-2's settings: 5 beams, repetition penalty 1.5); --sample draws
    diverse captions with nucleus sampling. Images go through the model --batch-size at a time:
      blipkit caption photos/ --model runs/default --json
      blipkit caption 'shots/*.jpg' --batch-size 32 --beams 1
      blipkit caption cat.jpg --sample --top-p 0.9 -n 3

    \b
    Exit status:
      0  every image was captioned
      1  some input was skipped (a missing path, an unreadable image: each is named on stderr, and
         every other image is still captioned), or an error stopped the command
      2  a usage or configuration mistake
    """
    import blipkit
    from blipkit.batch_inference import caption_files

    if (top_p is not None or temperature is not None) and not sample:
        raise click.UsageError("--top-p and --temperature go with --sample")
    if sample and beams is not None:
        raise click.UsageError("choose --beams (beam search) or --sample (nucleus sampling), not both")
    skips = _Skips()
    paths = _image_paths(images, skips)
    total = len(paths) + skips.count
    vlm = blipkit.load(_resolve_model(model))
    generation: dict[str, Any] = {k: v for k, v in (("num_beams", beams), ("max_new_tokens", max_new_tokens),
                                                    ("top_p", top_p), ("temperature", temperature)) if v is not None}
    if sample:
        generation["do_sample"] = True
    alone = len(paths) == 1 and not skips.count
    with _progress("images", len(paths), quiet) as bar:
        for path, texts in caption_files(vlm, paths, batch_size, prompt=prompt, num_captions=num_captions,
                                         on_skip=None if alone else skips, progress=bar.advance, **generation):
            if as_json:
                field = {"caption": texts[0]} if num_captions == 1 else {"captions": texts}
                click.echo(json.dumps({"image": str(path), **field}))
            else:
                for text in texts:
                    click.echo(f"{path}: {text}")
    skips.finish(total, "every other image was captioned")


def _questions(
    inputs: tuple[str, ...], question: str | None, questions_file: str | None, skips: _Skips
) -> list[Question]:
    """The questions to answer: QUESTION about each image that ``inputs`` name, or the rows of a JSONL file."""
    from blipkit.batch_inference import Question, read_questions

    if questions_file is not None:
        if inputs or question is not None:
            raise click.UsageError("give either IMAGE... QUESTION or --questions FILE, not both")
        asked = read_questions(questions_file, on_skip=skips)
        if not asked:
            if skips.count:
                skips.finish(skips.count, "")
            raise DataError(f"{questions_file}: no questions in it; write one JSON object per line: "
                            '{"image": "photo.jpg", "question": "what is it?"}')
        return asked
    if question is None or not inputs:
        raise click.UsageError("give the images and then the question (blipkit ask photo.jpg 'what is it?'), "
                               "or a file of questions (--questions FILE)")
    return [Question(path, question) for path in _image_paths(inputs, skips)]


@click.command()
@click.argument("images", nargs=-1)
@click.argument("question", required=False)
@click.option("--questions", "questions_file", type=click.Path(dir_okay=False),
              help='JSONL file, one {"image": ..., "question": ...} per line (relative images are in its folder; '
              "other keys, such as an id, are copied to the --json output).")
@click.option("--model", "-m", help="Run directory (default: the last 'blipkit train' run).")
@click.option("--beams", type=click.IntRange(min=1), default=None, help="Beam width (default 5).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Longest answer in tokens (default 10).")
@_batch_size("Questions")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per question: {image, question, answer}.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (shown when the results go to a file or pipe).")
def ask(images: tuple[str, ...], question: str | None, questions_file: str | None, model: str | None,
        beams: int | None, max_new_tokens: int | None, batch_size: int, as_json: bool, quiet: bool) -> None:
    """Answer QUESTION about each of IMAGES (files, folders or globs), or every question of a --questions file.

    \b
    One image prints the answer alone; several print IMAGE: ANSWER lines (with the question, for a
    --questions file). Questions go through the model --batch-size at a time:
      blipkit ask cat.jpg "what colour is the cat?"
      blipkit ask photos/ extra.png "how many people are there?" --json
      blipkit ask --questions questions.jsonl --batch-size 32 --json > answers.jsonl

    \b
    Exit status:
      0  every question was answered
      1  some input was skipped (a missing path, an unreadable image, a bad line of the questions
         file: each is named on stderr, and every other question is still answered), or an error
         stopped the command
      2  a usage or configuration mistake
    """
    import blipkit
    from blipkit.batch_inference import answer_questions

    skips = _Skips()
    asked = _questions(images, question, questions_file, skips)
    total = len(asked) + skips.count
    vlm = blipkit.load(_resolve_model(model))
    generation = {k: v for k, v in (("num_beams", beams), ("max_new_tokens", max_new_tokens)) if v is not None}
    alone = len(asked) == 1 and not skips.count and questions_file is None
    with _progress("questions", len(asked), quiet) as bar:
        for item, answer in answer_questions(vlm, asked, batch_size, on_skip=None if alone else skips,
                                             progress=bar.advance, **generation):
            if as_json:
                click.echo(json.dumps({**item.fields, "image": str(item.image), "question": item.question,
                                       "answer": answer}))
            elif alone:
                click.echo(answer)
            else:
                click.echo(f"{item.image}: {item.question} -> {answer}" if questions_file else f"{item.image}: {answer}")
    skips.finish(total, "every other question was answered")


@click.command()
@click.option("--model", "-m", help="Run directory (default: the last 'blipkit train' run).")
@click.option("--images", "image_inputs", multiple=True, required=True,
              help="Image files, folders or globs to search (repeatable).")
@click.option("--text", required=True, help="What to look for.")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1), help="How many images to show.")
@click.option("--rerank-k", default=128, show_default=True, type=click.IntRange(min=1),
              help="ITC candidates re-ranked with image-text matching.")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per result: {image, score}.")
def retrieve(model: str | None, image_inputs: tuple[str, ...], text: str, top_k: int, rerank_k: int, as_json: bool) -> None:
    """Find the images that best match --text: contrastive similarity, then ITM re-ranking (BLIP-2's way).

    Needs a model whose Q-Former was trained with stage 1. A Q-Former trained without ITM (the default
    recipe's) ranks by contrastive similarity alone. Exit status 1 when some input was skipped (each is
    named on stderr; the others are still searched), as for caption.
    """
    import blipkit
    from blipkit.inference import retrieve_images

    skips = _Skips()
    paths = _image_paths(image_inputs, skips)
    total = len(paths) + skips.count
    vlm = blipkit.load(_resolve_model(model))
    ranked = retrieve_images(
        vlm, paths, text, top_k=top_k, rerank_k=rerank_k, on_skip=lambda path, why: skips(path, DataError(why))
    )
    for rank, (path, score) in enumerate(ranked, start=1):
        click.echo(json.dumps({"image": str(path), "score": round(score, 4)}) if as_json else f"{rank}. {path}  {score:.3f}")
    skips.finish(total, "every other image was searched")


@click.command()
@click.argument("image")
@click.option("--model", "-m", help="Run directory (default: the last 'blipkit train' run).")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--per-query", is_flag=True, help="One heatmap per learned query (a grid) instead of their mean.")
def attention(image: str, model: str | None, out: str, per_query: bool) -> None:
    """Draw the Q-Former's cross-attention over IMAGE as a heatmap (averaged over layers and heads)."""
    import blipkit
    from blipkit.data.images import load_image
    from blipkit.inference import attention_heatmap
    from blipkit.io import atomic_path

    vlm = blipkit.load(_resolve_model(model))
    picture = attention_heatmap(vlm, load_image(image), per_query=per_query)
    with atomic_path(out) as tmp:
        picture.save(tmp, format="PNG")
    click.echo(f"Wrote {out} ({picture.width}x{picture.height})")


@click.command(name="eval")
@click.option("--model", "-m", help="Run directory (default: the last 'blipkit train' run).")
@click.option("--task", type=click.Choice(["caption", "vqa", "retrieval"]), required=True)
@click.option("--data", "data_name", required=True, help="Dataset: a name (shapes), prefix:source or path.")
@click.option("--split", default="test", show_default=True)
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Where to write predictions and scores "
              "(default: RUN/eval-SPLIT).")
@click.option("--beams", type=click.IntRange(min=1), help="Beam width (default: 5).")
@click.option("--batch-size", "-b", default=16, show_default=True, type=click.IntRange(min=1),
              help="Images (or questions) per forward pass; results are the same at any size.")
@click.option("--option", "options", multiple=True, help="Dataset option KEY=VALUE (repeatable), e.g. num_images=50.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def evaluate_command(model: str | None, task: str, data_name: str, split: str, out: str | None, beams: int | None,
                     batch_size: int, options: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Score a model on a dataset split: captions (BLEU, ROUGE-L, CIDEr), VQA accuracy, or retrieval recall@K.

    Writes TASK_predictions.jsonl and TASK_scores.json, and prints the scores.
    """
    from blipkit.config import apply_overrides
    from blipkit.eval.evaluate import evaluate_split

    done = evaluate_split(model, task, data_name, split, apply_overrides({}, list(options)), batch_size,
                          {"num_beams": beams} if beams else {}, out, quiet)
    result = done.result
    if as_json:
        click.echo(json.dumps(result.scores, indent=2))
    else:
        for key, value in result.scores.items():
            if isinstance(value, float):
                click.echo(f"{key:28} {value:.4f}")
            elif not isinstance(value, dict):
                click.echo(f"{key:28} {value}")
        click.echo(f"predictions: {done.predictions}\nscores:      {done.scores}")
    if done.skipped:
        click.echo("skipped: " + ", ".join(f"{n} {reason}" for reason, n in done.skipped.items()), err=True)


COMMANDS = [caption, ask, retrieve, attention, evaluate_command]
