"""Built-in dataset formats: image folder + metadata, COCO captions JSON, VQA v2 JSON, and ``hf:`` datasets.

Each is a prefix, ``imagefolder:DIR``, ``coco:FILE.json``, ``vqav2:QUESTIONS.json``, ``hf:ID_OR_DIR``, and
the first three (and a ``save_to_disk`` folder for ``hf:``) are also recognised from the bare path.
"""

from __future__ import annotations

import csv
import functools
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from blipkit import hookimpl
from blipkit.data.dataset import MALFORMED_ROW, NOT_UTF8, ImageTextDataset
from blipkit.data.images import load_image, load_image_bytes
from blipkit.data.sample import Record, most_frequent_answer
from blipkit.data.stream import StreamingDataset
from blipkit.errors import DataError, one_line
from blipkit.io import read_json
from blipkit.plugins.datasets._hf_stream import streaming_hf
from blipkit.plugins.datasets._common import (
    LOCAL_BUILDERS,
    TEXT_COLUMNS,
    as_answers,
    as_text,
    require_keys,
    row_records,
    split_name,
)

__all__ = ["coco", "hf_dataset", "imagefolder", "register_datasets", "vqav2"]

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
NO_ANSWERS = "no answers"
NO_QUESTION = "answers to a question not in the questions file"


# --------------------------------------------------------------------------- image folder + metadata


def _metadata_file(root: Path, split: str) -> Path | None:
    if root.is_file() and root.name in METADATA_FILES:
        return root
    for folder in dict.fromkeys((root / split, root / split_name(split), root)):
        for name in METADATA_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def _undecodable(text: str) -> bool:
    """Whether ``text``, read with ``errors="surrogateescape"``, held bytes that are not UTF-8."""
    return any("\udc80" <= char <= "\udcff" for char in text)


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The rows of a JSONL file, and how many lines were skipped and why (not UTF-8, not a JSON object)."""
    rows: list[dict[str, Any]] = []
    skipped = {MALFORMED_ROW: 0, NOT_UTF8: 0}
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as handle:
        for line in handle:
            if not line.strip():
                continue
            if _undecodable(line):
                skipped[NOT_UTF8] += 1
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped[MALFORMED_ROW] += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                skipped[MALFORMED_ROW] += 1
    return rows, skipped


def _read_csv(path: Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The rows of a CSV file with a ``file_name`` column, and how many were skipped for bytes that are not UTF-8."""
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "file_name" not in reader.fieldnames:
            raise DataError(f"{path}: CSV has no 'file_name' column (columns: {', '.join(reader.fieldnames or [])})")
        rows = list(reader)
    kept = [row for row in rows if not any(_undecodable(f"{key}{value}") for key, value in row.items())]
    return kept, {NOT_UTF8: len(rows) - len(kept)}


def imagefolder(source: str, split: str = "train") -> ImageTextDataset:
    """A folder of images described by ``metadata.jsonl`` or ``metadata.csv`` (the HF imagefolder layout).

    Columns: ``file_name`` (relative to the metadata file) and ``text`` or ``caption`` (a string, or a list
    of captions in JSONL); VQA rows have ``question`` and ``answer`` and/or ``answers``. The metadata may sit
    in ``DIR/<split>/`` or in ``DIR`` itself.
    """
    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such directory; pass a folder that holds images and metadata.jsonl")
    meta = _metadata_file(root, split)
    if meta is None:
        raise DataError(f"{root}: no metadata.jsonl or metadata.csv; add one with columns file_name and text")
    rows, skipped = _read_jsonl(meta) if meta.suffix == ".jsonl" else _read_csv(meta)
    skipped = Counter(skipped)
    records: list[Record] = []
    for row in rows:
        file_name = as_text(row.get("file_name"))
        if not file_name:
            skipped[MALFORMED_ROW] += 1
            continue
        records.extend(row_records(row, meta.parent / file_name, Path(file_name).as_posix()))
    return ImageTextDataset(records, name=f"imagefolder:{root.name}", split=split, skipped=skipped)


def _is_imagefolder(name: str) -> bool:
    path = Path(name).expanduser()
    folders = (path, *(path / split for split in ("train", "validation", "val", "test")))
    return path.is_dir() and any((folder / f).is_file() for folder in folders for f in METADATA_FILES)


# --------------------------------------------------------------------------- COCO captions


def coco(source: str, split: str = "train", image_dir: str | None = None) -> ImageTextDataset:
    """COCO captions JSON: ``{"images": [{id, file_name}], "annotations": [{image_id, caption}]}``.

    ``image_dir`` holds the image files (default: the JSON file's folder).
    """
    path = Path(source).expanduser()
    data = read_json(path)
    require_keys(data, ("images", "annotations"), path, "COCO captions")
    folder = Path(image_dir).expanduser() if image_dir else path.parent
    files: dict[str, str] = {}
    malformed = 0
    for image in data["images"]:
        if isinstance(image, dict) and "id" in image and as_text(image.get("file_name")):
            files[str(image["id"])] = as_text(image["file_name"])
        else:
            malformed += 1
    records: list[Record] = []
    for ann in data["annotations"]:
        image_id = str(ann.get("image_id")) if isinstance(ann, dict) else ""
        if image_id not in files or "caption" not in ann:
            malformed += 1
            continue
        records.append(Record(folder / files[image_id], as_text(ann["caption"]), image_id=image_id))
    return ImageTextDataset(records, name=f"coco:{path.name}", split=split, skipped={MALFORMED_ROW: malformed})


@functools.lru_cache(maxsize=32)
def _json_kind(path: str, mtime_ns: int, size: int) -> str:
    """``coco``, ``vqav2`` or '' for a JSON file, cached per file version."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return ""
    if not isinstance(data, dict):
        return ""
    anns, questions = data.get("annotations"), data.get("questions")
    if isinstance(data.get("images"), list) and isinstance(anns, list) and anns and isinstance(anns[0], dict):
        return "coco" if "caption" in anns[0] else ""
    if isinstance(questions, list) and questions and isinstance(questions[0], dict) and "question_id" in questions[0]:
        return "vqav2"
    return ""


def _json_file_kind(name: str) -> str:
    path = Path(name).expanduser()
    if path.suffix.lower() != ".json" or not path.is_file():
        return ""
    stat = path.stat()
    return _json_kind(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _is_coco(name: str) -> bool:
    return _json_file_kind(name) == "coco"


def _is_vqav2(name: str) -> bool:
    return _json_file_kind(name) == "vqav2"


# --------------------------------------------------------------------------- VQA v2


def _guess_annotations(questions: Path, subtype: str) -> Path:
    sibling = questions.with_name(questions.name.replace("OpenEnded_", "").replace("questions", "annotations"))
    candidates = [sibling] + sorted(
        p for p in questions.parent.glob("*annotations*.json") if not subtype or subtype in p.name
    )
    for candidate in candidates:
        if candidate != questions and candidate.is_file():
            return candidate
    raise DataError(
        f"{questions}: no VQA annotations file found beside it (looked for {sibling.name}); pass annotations=PATH"
    )


def _image_split(subtype: str, questions: Path, split: str) -> str:
    for text in (subtype, questions.name):
        found = re.search(r"(train|val|test)(?:-dev)?(?=\d{4})", text)
        if found:
            return found.group(1)
    return split_name(split)


def vqav2(
    source: str,
    split: str = "train",
    annotations: str | None = None,
    image_dir: str | None = None,
    image_pattern: str = "COCO_{split}2014_{image_id:012d}.jpg",
    image_split: str | None = None,
) -> ImageTextDataset:
    """Official VQA v2 files: ``source`` is the questions JSON, ``annotations`` the answers JSON.

    The target text is the most frequent of the ten answers. Image files are found as
    ``image_dir / image_pattern.format(split=..., image_id=...)``; ``split`` in the pattern is taken from the
    questions file (``train2014`` -> ``train``) unless ``image_split`` is given. ``image_dir`` defaults to the
    questions file's folder, or its ``<data_subtype>`` subfolder (e.g. ``train2014/``) when that exists.
    """
    questions_path = Path(source).expanduser()
    questions = read_json(questions_path)
    require_keys(questions, ("questions",), questions_path, "VQA v2 questions")
    subtype = as_text(questions.get("data_subtype"))
    ann_path = Path(annotations).expanduser() if annotations else _guess_annotations(questions_path, subtype)
    ann_data = read_json(ann_path)
    require_keys(ann_data, ("annotations",), ann_path, "VQA v2 annotations")
    if image_dir:
        folder = Path(image_dir).expanduser()
    else:
        folder = questions_path.parent
        if subtype and (folder / subtype).is_dir():
            folder = folder / subtype
    pattern_split = image_split or _image_split(subtype, questions_path, split)

    by_question: dict[Any, dict[str, Any]] = {}
    skipped = {MALFORMED_ROW: 0, NO_ANSWERS: 0, NO_QUESTION: 0}
    for ann in ann_data["annotations"]:
        if isinstance(ann, dict) and "question_id" in ann:
            by_question[ann["question_id"]] = ann
        else:
            skipped[MALFORMED_ROW] += 1
    asked = {q.get("question_id") for q in questions["questions"] if isinstance(q, dict)}
    skipped[NO_QUESTION] = sum(1 for question_id in by_question if question_id not in asked)
    records: list[Record] = []
    for q in questions["questions"]:
        if not isinstance(q, dict) or not {"question_id", "image_id", "question"} <= q.keys():
            skipped[MALFORMED_ROW] += 1
            continue
        ann = by_question.get(q["question_id"])
        answers = as_answers(ann.get("answers")) if ann else None
        if not answers:
            skipped[NO_ANSWERS] += 1
            continue
        try:
            file_name = image_pattern.format(split=pattern_split, image_id=q["image_id"])
        except (KeyError, ValueError, IndexError) as err:
            raise DataError(
                f"image_pattern '{image_pattern}' does not fit image id {q['image_id']!r} ({one_line(err)}); "
                "use the fields {split} and {image_id}"
            ) from None
        text = most_frequent_answer(answers, preferred=as_text(ann.get("multiple_choice_answer")) or None)
        meta = {"question_id": q["question_id"]}
        meta.update({k: ann[k] for k in ("answer_type", "question_type") if k in ann})
        records.append(
            Record(folder / file_name, text, as_text(q["question"]), answers, str(q["image_id"]), "vqa", meta)
        )
    return ImageTextDataset(records, name=f"vqav2:{questions_path.name}", split=split, skipped=skipped)


# --------------------------------------------------------------------------- hf: (the datasets library)




def _is_saved_hf(name: str) -> bool:
    path = Path(name).expanduser()
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _load_hf(source: str, split: str, config: str | None) -> Any:
    import datasets

    path = Path(source).expanduser()
    if source.startswith(("/", "./", "../", "~")) and not path.exists():
        raise DataError(f"hf:{source}: no such file or folder")
    try:
        if _is_saved_hf(source):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"hf:{source}: no split '{split}'; it has: {', '.join(loaded)}")
                return loaded[split]
            return loaded
        if path.is_file():
            builder = LOCAL_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"hf:{source}: cannot read {path.suffix} files; use parquet, csv, json(l) or arrow")
            return datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
        return datasets.load_dataset(str(path) if path.is_dir() else source, config, split=split)
    except DataError:
        raise
    except Exception as err:  # the datasets library raises many types for "not found" and "offline"
        detail = one_line(f"{type(err).__name__}: {err}")[:200]
        if path.exists():
            raise DataError(f"hf:{source}: cannot load the local dataset ({detail})") from None
        raise DataError(
            f"hf:{source}: dataset '{source}' is not in the local cache and cannot be downloaded here ({detail}); "
            "where the hub is reachable run datasets.load_dataset(...).save_to_disk(DIR), then pass hf:DIR"
        ) from None


def _hf_image(table: Any, index: int, column: str, label: str) -> Any:
    value = table[index][column]
    if isinstance(value, dict):
        if value.get("bytes"):
            return load_image_bytes(value["bytes"], f"{label} row {index}")
        value = value.get("path")
    if isinstance(value, str) and value:
        return load_image(value)
    if value is not None and hasattr(value, "convert"):
        return value
    raise DataError(f"{label} row {index}: no image in column '{column}'")


def hf_dataset(
    source: str,
    split: str = "train",
    image_column: str = "image",
    text_column: str = "text",
    question_column: str | None = None,
    answers_column: str | None = None,
    config: str | None = None,
    streaming: bool = False,
) -> ImageTextDataset | StreamingDataset:
    """A dataset read with the ``datasets`` library: a hub id (cached), a ``save_to_disk`` folder, or local files.

    ``question_column`` / ``answers_column`` default to ``question`` / ``answers`` when those columns exist,
    which makes the rows VQA samples; a text cell holding a list gives one caption sample per entry.
    ``streaming``: read it shard by shard, never all in memory (``plugins/datasets/_hf_stream.py``).
    """
    import datasets

    if streaming:
        text_columns = (text_column, *TEXT_COLUMNS, "captions")
        to_records = functools.partial(_stream_row_records, text_columns=text_columns, question=question_column or "question",
                                       answers=answers_column or "answers")
        return streaming_hf(source, split, image_column, config, to_records)

    table = _load_hf(source, split, config)
    if isinstance(table, datasets.DatasetDict):
        raise DataError(f"hf:{source}: pass a split; it has: {', '.join(table)}")
    columns = list(table.column_names)

    def need(column: str, option: str) -> str:
        if column not in columns:
            raise DataError(f"hf:{source}: no column '{column}' ({option}); columns: {', '.join(columns)}")
        return column

    need(image_column, "image_column")
    question = need(question_column, "question_column") if question_column else "question"
    answers = need(answers_column, "answers_column") if answers_column else "answers"
    text_columns = (text_column,) if text_column in columns else TEXT_COLUMNS + ("captions",)
    if question not in columns and not set(text_columns) & set(columns):
        need(text_column, "text_column")
    if isinstance(table.features[image_column], datasets.Image):
        table = table.cast_column(image_column, datasets.Image(decode=False))
    images = table.select_columns([image_column])
    rows = table.remove_columns([image_column]).to_list()
    label = f"hf:{source}"
    records: list[Record] = []
    for index, row in enumerate(rows):
        image_id = as_text(row.get("image_id")) or f"{split}/{index}"
        image = functools.partial(_hf_image, images, index, image_column, label)
        records.extend(row_records(row, image, image_id, text_columns, question, answers))
    return ImageTextDataset(records, name=label, split=split)


def _stream_row_records(row: dict[str, Any], image: Any, image_id: str, text_columns: tuple[str, ...], question: str,
                        answers: str) -> list[Record]:
    return row_records(row, image, image_id, text_columns, question, answers)


@hookimpl
def register_datasets(register: Any) -> None:
    """Register the file-based formats and the ``hf:`` prefix."""
    register(
        "imagefolder:",
        imagefolder,
        description="folder of images with metadata.jsonl/csv (file_name, text | question, answers)",
        kind="captions",
        available=True,
        matches=_is_imagefolder,
    )
    register(
        "coco:",
        coco,
        description="COCO captions JSON (images + annotations); option image_dir",
        kind="captions",
        available=True,
        matches=_is_coco,
    )
    register(
        "vqav2:",
        vqav2,
        description="VQA v2 questions JSON + annotations JSON; options annotations, image_dir, image_pattern",
        kind="vqa",
        available=True,
        matches=_is_vqav2,
    )
    register(
        "hf:",
        hf_dataset,
        description="any datasets-library dataset: hub id (cached) or local folder; options image/text/question/answers_column",
        kind="captions",
        available=None,
        matches=_is_saved_hf,
    )
