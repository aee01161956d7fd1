"""``llava:FILE.json``: LLaVA-style visual instruction data, one VQA sample per human -> gpt turn pair.

The file is a JSON list of conversations, as in the LLaVA repository's training data::

    [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                        {"from": "gpt", "value": "White and red."}, ...]}]

A bare ``.json`` path is recognised when its first record has ``conversations``.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from blipkit import hookimpl
from blipkit.data.dataset import MALFORMED_ROW, ImageTextDataset
from blipkit.data.sample import Record
from blipkit.errors import DataError, one_line
from blipkit.plugins.datasets._common import as_text

__all__ = ["TEXT_ONLY", "llava", "parse_conversations", "register_datasets"]

TEXT_ONLY = "text-only row"
IMAGE_TOKEN = re.compile(r"\s*<image>\s*")
# How much of a file the bare-path check reads to find the first record; LLaVA records are a few KiB.
_SNIFF_BYTES = 1 << 20


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def parse_conversations(conversations: Any) -> list[tuple[str, str]] | None:
    """The (question, answer) pairs of a LLaVA ``conversations`` list, or None when it is malformed.

    Turns must alternate human -> gpt with non-empty values; the ``<image>`` token and the whitespace
    around it are removed from the questions.
    """
    if not isinstance(conversations, list) or not conversations or len(conversations) % 2:
        return None
    pairs: list[tuple[str, str]] = []
    for human, gpt in zip(conversations[::2], conversations[1::2]):
        if not isinstance(human, dict) or not isinstance(gpt, dict):
            return None
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            return None
        question = IMAGE_TOKEN.sub(" ", _text(human.get("value"))).strip()
        answer = _text(gpt.get("value")).strip()
        if not question or not answer:
            return None
        pairs.append((question, answer))
    return pairs


def _read_list(path: Path) -> list[Any]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; pass llava:PATH to a LLaVA conversations JSON") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory; pass llava:PATH to a LLaVA conversations JSON file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); re-save it as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({one_line(err)}); fix or regenerate the file") from None
    if not isinstance(data, list):
        raise DataError(
            f"{path}: not a LLaVA conversations file (top level is {type(data).__name__}, expected a list of records)"
        )
    return data


def llava(source: str, split: str = "train", image_root: str | None = None) -> ImageTextDataset:
    """LLaVA conversations JSON: each human -> gpt turn pair of a record with an image is one ``vqa`` record.

    ``image_root`` is the folder the records' ``image`` paths are relative to (default: the JSON's folder).
    ``image_id`` is the record's ``id`` (its ``image`` path when it has none); ``meta`` holds ``turn`` (the
    pair's index in the conversation, from 0) and the record's ``id``. Records without ``image`` are
    text-only and counted as such; records with bad conversations are counted as malformed rows.
    """
    path = Path(source).expanduser()
    root = Path(image_root).expanduser() if image_root else path.parent
    records: list[Record] = []
    skipped = {MALFORMED_ROW: 0, TEXT_ONLY: 0}
    for row in _read_list(path):
        if not isinstance(row, dict):
            skipped[MALFORMED_ROW] += 1
            continue
        if row.get("image") is None:
            skipped[TEXT_ONLY] += 1
            continue
        image = _text(row["image"]).strip()
        pairs = parse_conversations(row.get("conversations"))
        if not image or pairs is None:
            skipped[MALFORMED_ROW] += 1
            continue
        row_id = row.get("id")
        image_id = as_text(row_id) or image
        image_path = root / image
        for turn, (question, answer) in enumerate(pairs):
            records.append(
                Record(image_path, answer, question, [answer], image_id, "vqa", {"turn": turn, "id": row_id})
            )
    return ImageTextDataset(records, name=f"llava:{path.name}", split=split, skipped=skipped)


@functools.lru_cache(maxsize=32)
def _first_record_has_conversations(path: str, mtime_ns: int, size: int) -> bool:
    """Whether the JSON file at ``path`` is a list whose first item has ``conversations``, cached per file version."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_SNIFF_BYTES).decode("utf-8-sig", errors="ignore")
    except OSError:
        return False
    decoder = json.JSONDecoder()
    start = len(head) - len(head.lstrip())
    if not head.startswith("[", start):
        return False
    rest = head[start + 1 :]
    try:
        first, _ = decoder.raw_decode(rest, len(rest) - len(rest.lstrip()))
    except json.JSONDecodeError:
        return False
    return isinstance(first, dict) and "conversations" in first


def _is_llava(name: str) -> bool:
    path = Path(name).expanduser()
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    stat = path.stat()
    return _first_record_has_conversations(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@hookimpl
def register_datasets(register: Any) -> None:
    """Register the ``llava:`` prefix."""
    register(
        "llava:",
        llava,
        description="LLaVA conversations JSON (id, image, conversations); one VQA sample per turn pair; options image_root",
        kind="vqa",
        available=True,
        matches=_is_llava,
    )
