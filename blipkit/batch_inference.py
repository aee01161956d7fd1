"""Captions and answers for many image files, generated in batches: an unreadable image skips only itself.

The next batch's images are read and preprocessed in a background thread while the current batch
generates. Batched results equal one-image-at-a-time results for beam search and greedy decoding
(the language model wrappers pad prompts and set attention masks and positions per row).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blipkit.data.images import load_image
from blipkit.errors import DataError, one_line

if TYPE_CHECKING:
    from blipkit.model.vlm import VisionLanguageModel

__all__ = ["DEFAULT_BATCH_SIZE", "Question", "answer_questions", "caption_files", "read_questions"]

DEFAULT_BATCH_SIZE = 8

OnSkip = Callable[[object, DataError], None]
"""Told about each input that could not be used (the input, and why); without one, the error is raised."""


@dataclass(frozen=True)
class Question:
    """A question about one image file; ``fields`` holds the rest of its JSONL row (ids), echoed back."""

    image: Path
    question: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Loaded:
    """One batch read from disk: which rows loaded, their pixels, and the error of each path that did not."""

    rows: list[int]
    pixels: torch.Tensor | None
    failed: dict[Path, DataError]


def _load(model: VisionLanguageModel, paths: list[Path]) -> _Loaded:
    pixels: dict[Path, torch.Tensor] = {}
    failed: dict[Path, DataError] = {}
    for path in dict.fromkeys(paths):
        try:
            pixels[path] = model.pixel_values([load_image(path)])[0]
        except DataError as err:
            failed[path] = err
    rows = [row for row, path in enumerate(paths) if path in pixels]
    return _Loaded(rows, torch.stack([pixels[paths[row]] for row in rows]) if rows else None, failed)


def _batches(model: VisionLanguageModel, paths: Sequence[Path], batch_size: int) -> Iterator[tuple[int, _Loaded]]:
    """(offset of the batch in ``paths``, the batch loaded), reading each next batch while this one is used."""
    if batch_size < 1:
        raise DataError(f"batch size {batch_size} is not positive; pass 1 or more")
    starts = list(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load, model, list(paths[:batch_size])) if starts else None
        for number, start in enumerate(starts):
            loaded = pending.result()
            if number + 1 < len(starts):
                following = starts[number + 1]
                pending = pool.submit(_load, model, list(paths[following : following + batch_size]))
            yield start, loaded


def _report(loaded: _Loaded, paths: Sequence[Path], start: int, size: int, on_skip: OnSkip | None) -> None:
    """Pass each row whose image failed to ``on_skip``, in input order (raise the first without one)."""
    kept = set(loaded.rows)
    for row in range(min(size, len(paths) - start)):
        if row not in kept:
            err = loaded.failed[paths[start + row]]
            if on_skip is None:
                raise err
            on_skip(paths[start + row], err)


def caption_files(
    model: VisionLanguageModel,
    paths: Sequence[Path],
    batch_size: int = DEFAULT_BATCH_SIZE,
    prompt: str | None = None,
    num_captions: int = 1,
    on_skip: OnSkip | None = None,
    progress: Callable[[int], None] | None = None,
    **generation: Any,
) -> Iterator[tuple[Path, list[str]]]:
    """Yield (path, its ``num_captions`` captions) in input order, ``batch_size`` images per forward pass;
    ``generation`` as for ``VisionLanguageModel.caption``. Unreadable images go to ``on_skip``."""
    for start, loaded in _batches(model, paths, batch_size):
        _report(loaded, paths, start, batch_size, on_skip)
        if loaded.pixels is not None:
            texts = model.caption(loaded.pixels, prompt=prompt, num_captions=num_captions, **generation)
            for number, row in enumerate(loaded.rows):
                yield paths[start + row], texts[number * num_captions : (number + 1) * num_captions]
        if progress is not None:
            progress(min(batch_size, len(paths) - start))


def answer_questions(
    model: VisionLanguageModel,
    questions: Sequence[Question],
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_skip: OnSkip | None = None,
    progress: Callable[[int], None] | None = None,
    **generation: Any,
) -> Iterator[tuple[Question, str]]:
    """Yield (question, answer) in input order, ``batch_size`` questions per forward pass (an image asked
    about twice in a batch is read once); ``generation`` as for ``VisionLanguageModel.ask``."""
    paths = [q.image for q in questions]
    for start, loaded in _batches(model, paths, batch_size):
        _report(loaded, paths, start, batch_size, on_skip)
        if loaded.pixels is not None:
            batch = [questions[start + row] for row in loaded.rows]
            answers = model.ask(loaded.pixels, [q.question for q in batch], **generation)
            yield from zip(batch, answers)
        if progress is not None:
            progress(min(batch_size, len(paths) - start))


def _question(row: Any, folder: Path) -> Question:
    if not isinstance(row, dict):
        raise DataError('not a JSON object; write {"image": "photo.jpg", "question": "what is it?"}')
    image, question = row.get("image"), row.get("question")
    if not isinstance(image, str) or not image.strip():
        raise DataError('no "image" (the image file, relative to this file\'s folder)')
    if not isinstance(question, str):
        raise DataError('no "question" (text)')
    fields = {key: value for key, value in row.items() if key not in ("image", "question")}
    return Question(folder / image, question, fields)


def read_questions(path: str | Path, on_skip: OnSkip | None = None) -> list[Question]:
    """Read a JSONL file of ``{"image": ..., "question": ...}`` rows (relative images are in the file's
    folder; other keys are kept in ``Question.fields``); a row that cannot be used goes to ``on_skip``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read as a JSONL file of questions ({one_line(err)})") from None
    questions = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            try:
                row = json.loads(line)
            except ValueError as err:
                raise DataError(f"not JSON ({one_line(err)})") from None
            questions.append(_question(row, path.parent))
        except DataError as err:
            where = f"{path} line {number}"
            if on_skip is None:
                raise DataError(f"{where}: {err}") from None
            on_skip(where, err)
    return questions
