"""Run a model over a dataset split and score it: captions (COCO metrics and the dataset's own scorer), VQA
accuracy, and retrieval recall@K."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blipkit.errors import DataError
from blipkit.io import atomic_path, atomic_write_json

if TYPE_CHECKING:
    from blipkit.model.vlm import VisionLanguageModel

__all__ = ["EvalResult", "EvalRun", "evaluate", "evaluate_split", "progress_total", "write_results"]

TASKS = ("caption", "vqa", "retrieval")


@dataclass
class EvalResult:
    """Predictions (one dict per image or question) and scores of one task."""

    task: str
    predictions: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[str, Any] = field(default_factory=dict)


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _selected(dataset: Any, task: str, limit: int | None = None) -> list[int]:
    """The indices of the records that ``task`` evaluates (the first ``limit``)."""
    if task not in TASKS:
        raise DataError(f"unknown evaluation task '{task}'; use one of: {', '.join(TASKS)}")
    wanted = "caption" if task == "retrieval" else task
    return [i for i, record in enumerate(dataset.records) if record.task == wanted][:limit]


def progress_total(dataset: Any, task: str, limit: int | None = None) -> int:
    """What ``evaluate`` counts through its ``progress`` callback: distinct images for captions and retrieval,
    questions for VQA."""
    indices = _selected(dataset, task, limit)
    if task == "vqa":
        return len(indices)
    return len({dataset.records[i].image_id for i in indices})


def evaluate(
    model: VisionLanguageModel,
    dataset: Any,
    task: str,
    batch_size: int = 16,
    generation: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    limit: int | None = None,
) -> EvalResult:
    """Generate for every caption image or VQA question of ``dataset`` (the first ``limit`` samples of the
    task, when given) and score the results.

    Captions: one per distinct image, scored against all of that image's reference captions (BLEU,
    ROUGE-L, CIDEr) and by the dataset's own ``caption_scorer`` when it has one (the shapes data's: whether
    each caption names the drawn colours and shapes).
    VQA: one answer per question, scored with the official VQA accuracy. ``dataset`` may be a
    feature-cached view (its samples then carry encoder tokens instead of images).
    """
    indices = _selected(dataset, task, limit)
    if not indices:
        raise DataError(f"dataset '{dataset.name}' has no {task} samples to evaluate")
    if task == "caption":
        return _evaluate_captions(model, dataset, indices, batch_size, generation or {}, progress)
    if task == "retrieval":
        return _evaluate_retrieval(model, dataset, indices, batch_size, progress)
    return _evaluate_vqa(model, dataset, indices, batch_size, generation or {}, progress)


def _inputs(model: VisionLanguageModel, samples: list[Any]) -> Any:
    import torch

    if all(s.image_tokens is not None for s in samples):
        return torch.stack([s.image_tokens for s in samples])
    return model.image_tokens(model.pixel_values([s.image for s in samples]))


def _evaluate_captions(
    model: VisionLanguageModel, dataset: Any, indices: list[int], batch_size: int,
    generation: dict[str, Any], progress: Callable[[int], None] | None,
) -> EvalResult:
    references: dict[str, list[str]] = {}
    first: dict[str, int] = {}
    for index in indices:
        record = dataset.records[index]
        references.setdefault(record.image_id, []).append(record.text)
        first.setdefault(record.image_id, index)
    result = EvalResult("caption")
    settings = {**model.generation_defaults(), **generation}
    prompt = model.recipe.data.caption_prompt
    for chunk in _batches(list(first.values()), batch_size):
        samples = [s for s in (dataset[i] for i in chunk) if s is not None]
        if samples:
            captions = model.generate_from_tokens(_inputs(model, samples), [prompt] * len(samples), **settings)
            for sample, caption in zip(samples, captions):
                result.predictions.append(
                    {**sample.meta, "image_id": sample.image_id, "caption": caption, "references": references[sample.image_id]}
                )
        if progress is not None:
            progress(len(chunk))
    if not result.predictions:
        raise DataError(f"no image of dataset '{dataset.name}' could be read; nothing to score")
    from blipkit.eval.captions import caption_scores

    predictions = {p["image_id"]: p["caption"] for p in result.predictions}
    result.scores = caption_scores(predictions, {k: references[k] for k in predictions})
    scorer = getattr(dataset, "caption_scorer", None)
    if scorer is not None:
        result.scores.update(scorer(result.predictions))
    return result


def _evaluate_vqa(
    model: VisionLanguageModel, dataset: Any, indices: list[int], batch_size: int,
    generation: dict[str, Any], progress: Callable[[int], None] | None,
) -> EvalResult:
    from blipkit.eval.vqa import vqa_scores

    result = EvalResult("vqa")
    settings = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, **generation}
    for chunk in _batches(indices, batch_size):
        samples = [s for s in (dataset[i] for i in chunk) if s is not None]
        if samples:
            prompts = [model.vqa_prompt(s.question or "") for s in samples]
            answers = model.generate_from_tokens(_inputs(model, samples), prompts, **settings)
            for sample, answer in zip(samples, answers):
                result.predictions.append(
                    {"image_id": sample.image_id, "question": sample.question, "answer": answer,
                     "answers": sample.answers or [sample.text],
                     **({"question_id": sample.meta["question_id"]} if "question_id" in sample.meta else {}),
                     **({"answer_type": sample.meta["answer_type"]} if "answer_type" in sample.meta else {})}
                )
        if progress is not None:
            progress(len(chunk))
    if not result.predictions:
        raise DataError(f"no image of dataset '{dataset.name}' could be read; nothing to score")
    types = [p.get("answer_type") for p in result.predictions]
    result.scores = vqa_scores(
        [p["answer"] for p in result.predictions],
        [p["answers"] for p in result.predictions],
        types if all(t is not None for t in types) else None,
    )
    return result


def _evaluate_retrieval(
    model: VisionLanguageModel, dataset: Any, indices: list[int], batch_size: int,
    progress: Callable[[int], None] | None, rerank_k: int = 128,
) -> EvalResult:
    """Image<->text recall@1/5/10 over the captions: ITC similarity, then ITM re-ranking of the top k
    (when the Q-Former was trained with ITM)."""
    import torch

    from blipkit.eval.retrieval import rerank_topk, retrieval_recall

    first: dict[str, int] = {}
    texts: list[str] = []
    text_image: list[str] = []
    for index in indices:
        record = dataset.records[index]
        first.setdefault(record.image_id, index)
        texts.append(record.text)
        text_image.append(record.image_id)
    bridge = model.retrieval_bridge()
    tokens: dict[str, torch.Tensor] = {}
    for chunk in _batches(list(first.values()), batch_size):
        samples = [s for s in (dataset[i] for i in chunk) if s is not None]
        if samples:
            for sample, row in zip(samples, _inputs(model, samples).float().cpu()):
                tokens[sample.image_id] = row
        if progress is not None:
            progress(len(chunk))
    if not tokens:
        raise DataError(f"no image of dataset '{dataset.name}' could be read; nothing to score")
    image_ids = list(tokens)
    keep = [i for i, image_id in enumerate(text_image) if image_id in tokens]
    texts = [texts[i] for i in keep]
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    targets = [row_of[text_image[i]] for i in keep]
    stacked = torch.stack([tokens[i] for i in image_ids])
    with torch.no_grad():
        image_embeds = torch.cat([bridge.image_embeds(c.to(model.device)) for c in stacked.split(batch_size)])
        text_embeds = torch.cat([bridge.text_embeds(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)])
        itc = model.similarity(image_embeds, text_embeds).cpu()

        def itm_i2t(row: int, candidates: torch.Tensor) -> torch.Tensor:
            pairs = stacked[row].expand(len(candidates), *stacked.shape[1:]).to(model.device)
            return model.itm_score_tokens(pairs, [texts[int(c)] for c in candidates]).cpu()

        def itm_t2i(row: int, candidates: torch.Tensor) -> torch.Tensor:
            return model.itm_score_tokens(stacked[candidates].to(model.device), [texts[row]] * len(candidates)).cpu()

        if bridge.has_itm:
            i2t = rerank_topk(itc, itm_i2t, k=min(rerank_k, itc.shape[1]))
            t2i = rerank_topk(itc.t().contiguous(), itm_t2i, k=min(rerank_k, itc.shape[0]))
        else:
            i2t, t2i = itc, itc.t().contiguous()
    result = EvalResult("retrieval")
    result.scores = retrieval_recall(i2t, targets, similarity_t2i=t2i)
    result.predictions = [
        {"image_id": image_id, "best_text": texts[int(i2t[row].argmax())]} for row, image_id in enumerate(image_ids)
    ]
    return result


def write_results(result: EvalResult, out_dir: Path) -> tuple[Path, Path]:
    """Write ``<task>_predictions.jsonl`` and ``<task>_scores.json`` into ``out_dir`` atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions = out_dir / f"{result.task}_predictions.jsonl"
    with atomic_path(predictions) as tmp:
        tmp.write_text("".join(json.dumps(p) + "\n" for p in result.predictions))
    scores = out_dir / f"{result.task}_scores.json"
    atomic_write_json(scores, result.scores)
    return predictions, scores


@dataclass
class EvalRun:
    """What ``evaluate_split`` did: the result, where it wrote it, and the samples it skipped."""

    result: EvalResult
    predictions: Path
    scores: Path
    skipped: dict[str, int]


def evaluate_split(
    model: str | Path | None,
    task: str,
    data: str,
    split: str = "test",
    options: dict[str, Any] | None = None,
    batch_size: int = 16,
    generation: dict[str, Any] | None = None,
    out: str | Path | None = None,
    quiet: bool = False,
) -> EvalRun:
    """Load a model (a run directory or checkpoint; None: the last ``blipkit train`` run), score it on a
    dataset split through the feature cache, and write ``<task>_predictions.jsonl`` and
    ``<task>_scores.json`` into ``out`` (default: ``RUN/eval-SPLIT``): ``blipkit eval`` in Python."""
    from blipkit.data.dataset import open_dataset
    from blipkit.features import cached_features
    from blipkit.model.build import load_model
    from blipkit.model.persistence import last_run
    from blipkit.train.feedback import CountProgress

    run = Path(model) if model else last_run()
    vlm = load_model(run)
    dataset = cached_features(vlm, open_dataset(data, split, options or {}), quiet=quiet)
    with CountProgress(f"{task} ({split})", progress_total(dataset, task), quiet=quiet) as bar:
        result = evaluate(vlm, dataset, task, batch_size=batch_size, generation=generation, progress=bar.advance)
    predictions, scores = write_results(result, Path(out) if out else run / f"eval-{split}")
    return EvalRun(result, predictions, scores, dict(dataset.skipped))
