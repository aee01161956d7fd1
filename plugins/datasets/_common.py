"""Helpers shared by the built-in dataset formats: turning loose rows into records."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from blipkit.data.sample import Record, most_frequent_answer
from blipkit.errors import DataError

TEXT_COLUMNS = ("text", "caption")
ANSWER_COLUMNS = ("answer", "multiple_choice_answer")


LOCAL_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}
"""The datasets-library builder that reads a local file of each suffix."""

def as_text(value: Any) -> str:
    """A cell as stripped text ('' for None or non-text)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return ""


def as_answers(value: Any) -> list[str] | None:
    """Reference answers from a list of strings, a list of ``{"answer": ...}`` dicts, a JSON list string or one string."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return [text]
        else:
            return [text] if text else None
    if isinstance(value, Mapping) and "answer" in value:
        value = value["answer"] if isinstance(value["answer"], list) else [value]
    if not isinstance(value, (list, tuple)):
        return None
    answers = [as_text(a.get("answer") if isinstance(a, Mapping) else a) for a in value]
    return [a for a in answers if a] or None


def row_records(
    row: Mapping[str, Any],
    image: Any,
    image_id: str,
    text_columns: tuple[str, ...] = TEXT_COLUMNS,
    question_column: str = "question",
    answers_column: str = "answers",
) -> list[Record]:
    """Records for one table row: a VQA sample when it has a question, else one caption sample per caption.

    For VQA the target is the most frequent of ``answers`` (ties go to the ``answer`` or text column), or
    that column alone when the row has no answer list.
    A caption cell holding a list gives one sample per caption.
    """
    question = as_text(row.get(question_column))
    if question:
        answers = as_answers(row.get(answers_column))
        given = next((as_text(row.get(c)) for c in (*ANSWER_COLUMNS, *text_columns) if as_text(row.get(c))), "")
        text = most_frequent_answer(answers, preferred=given or None) if answers else given
        return [Record(image, text, question, answers or ([text] if text else None), image_id, "vqa")]
    value = next((row[c] for c in text_columns if row.get(c) is not None), None)
    captions = value if isinstance(value, (list, tuple)) else [value]
    return [Record(image, as_text(caption), image_id=image_id) for caption in captions] or [
        Record(image, "", image_id=image_id)
    ]


def require_keys(data: Any, keys: tuple[str, ...], path: Path, what: str) -> None:
    """Raise DataError naming ``path`` unless ``data`` is a JSON object with list values at ``keys``."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a {what} file (top level is {type(data).__name__}, expected an object)")
    for key in keys:
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: not a {what} file (no '{key}' list at the top level)")


def split_name(split: str) -> str:
    """The short form used in COCO file names: ``validation`` -> ``val``."""
    return {"validation": "val", "valid": "val", "dev": "val"}.get(split, split)
