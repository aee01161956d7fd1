"""The ``llava:`` dataset format: records per turn pair, skip counts, one-line errors, registry, training."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import blipkit.plugins.datasets.llava as llava_plugin
from blipkit import plugin_manager
from blipkit.data.dataset import open_dataset
from blipkit.errors import DataError, UnknownNameError
from blipkit.plugins.datasets.llava import llava


def _human(value: str) -> dict[str, str]:
    return {"from": "human", "value": value}


def _gpt(value: str) -> dict[str, str]:
    return {"from": "gpt", "value": value}


GOOD_ROWS: list[dict[str, Any]] = [
    {
        "id": "000000033471",
        "image": "coco/bus.png",
        "conversations": [
            _human("<image>\nWhat are the colors of the bus in the image?"),
            _gpt("The bus in the image is white and red."),
            _human("What feature can be seen on the back of the bus?"),
            _gpt("The back of the bus features an advertisement."),
            _human("Is it  <image> moving?"),
            _gpt("No."),
        ],
    },
    {"id": 7, "image": "cat.png", "conversations": [_human("What animal is this?\n\n<image>  "), _gpt(" A cat. ")]},
    {"image": "cat.png", "conversations": [_human("Describe the image."), _gpt("A cat on a mat.")]},
]
TEXT_ONLY_ROW = {"id": "sharegpt-1", "conversations": [_human("Write a poem."), _gpt("Roses are red.")]}
MISSING_IMAGE_ROW = {"id": "gone", "image": "coco/gone.png", "conversations": [_human("<image>\nWhat?"), _gpt("Nothing.")]}
MALFORMED_ROWS = {
    "no conversations": {"id": "m1", "image": "cat.png"},
    "conversations not a list": {"id": "m2", "image": "cat.png", "conversations": "hello"},
    "empty conversations": {"id": "m3", "image": "cat.png", "conversations": []},
    "odd number of turns": {"id": "m4", "image": "cat.png", "conversations": [_human("Q?"), _gpt("A."), _human("Q2?")]},
    "gpt before human": {"id": "m5", "image": "cat.png", "conversations": [_gpt("A."), _human("Q?")]},
    "two human turns": {"id": "m6", "image": "cat.png", "conversations": [_human("Q?"), _human("A.")]},
    "unknown speaker": {"id": "m7", "image": "cat.png", "conversations": [{"from": "user", "value": "Q?"}, _gpt("A.")]},
    "empty answer": {"id": "m8", "image": "cat.png", "conversations": [_human("Q?"), _gpt("  ")]},
    "question only the image token": {"id": "m9", "image": "cat.png", "conversations": [_human("<image>\n"), _gpt("A.")]},
    "missing value": {"id": "m10", "image": "cat.png", "conversations": [_human("Q?"), {"from": "gpt"}]},
    "turn not an object": {"id": "m11", "image": "cat.png", "conversations": ["Q?", "A."]},
    "image not a string": {"id": "m12", "image": ["a.png", "b.png"], "conversations": [_human("Q?"), _gpt("A.")]},
    "row not an object": ["cat.png", "Q?", "A."],
}


@pytest.fixture(autouse=True)
def _llava_registered() -> None:
    """Add the plugin to the fresh plugin manager (a no-op once it is among the built-in plugins)."""
    manager = plugin_manager.get_plugin_manager()
    if not manager.is_registered(llava_plugin):
        manager.register(llava_plugin, name=llava_plugin.__name__)


def _write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


def _write_dataset(folder: Path, rows: list[Any], images: Path | None = None) -> Path:
    images = images or folder
    _write_image(images / "coco" / "bus.png", 0)
    _write_image(images / "cat.png", 1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "llava_instruct.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _fields(dataset: Any) -> list[tuple[Any, ...]]:
    return [(r.image, r.text, r.question, r.answers, r.image_id, r.task, r.meta) for r in dataset.records]


def _expected(root: Path) -> list[tuple[Any, ...]]:
    bus, cat = root / "coco" / "bus.png", root / "cat.png"
    return [
        (bus, "The bus in the image is white and red.", "What are the colors of the bus in the image?",
         ["The bus in the image is white and red."], "000000033471", "vqa", {"turn": 0, "id": "000000033471"}),
        (bus, "The back of the bus features an advertisement.", "What feature can be seen on the back of the bus?",
         ["The back of the bus features an advertisement."], "000000033471", "vqa", {"turn": 1, "id": "000000033471"}),
        (bus, "No.", "Is it moving?", ["No."], "000000033471", "vqa", {"turn": 2, "id": "000000033471"}),
        (cat, "A cat.", "What animal is this?", ["A cat."], "7", "vqa", {"turn": 0, "id": 7}),
        (cat, "A cat on a mat.", "Describe the image.", ["A cat on a mat."], "cat.png", "vqa", {"turn": 0, "id": None}),
    ]


def _one_line(excinfo: pytest.ExceptionInfo[DataError], *needles: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def test_each_turn_pair_becomes_one_vqa_record(tmp_path: Path) -> None:
    rows = [*GOOD_ROWS, TEXT_ONLY_ROW, MALFORMED_ROWS["odd number of turns"], MISSING_IMAGE_ROW]
    path = _write_dataset(tmp_path, rows)
    dataset = llava(str(path), split="validation")
    assert _fields(dataset) == _expected(tmp_path)
    assert dataset.name == "llava:llava_instruct.json" and dataset.split == "validation"
    assert dataset.tasks == {"vqa"}
    assert dict(dataset.skipped) == {"malformed row": 1, "text-only row": 1, "missing image": 1}
    assert dataset.report() == "skipped 3 of 8 samples: 1 malformed row, 1 text-only row, 1 missing image"
    sample = dataset[3]
    assert sample.image.size == (32, 32)
    assert (sample.question, sample.text, sample.image_id) == ("What animal is this?", "A cat.", "7")


@pytest.mark.parametrize("kind", list(MALFORMED_ROWS))
def test_a_malformed_row_is_skipped_whole_and_counted(tmp_path: Path, kind: str) -> None:
    path = _write_dataset(tmp_path, [*GOOD_ROWS, MALFORMED_ROWS[kind]])
    dataset = llava(str(path))
    assert _fields(dataset) == _expected(tmp_path)
    assert dict(dataset.skipped) == {"malformed row": 1}


def test_image_root_option(tmp_path: Path) -> None:
    images = tmp_path / "images"
    path = _write_dataset(tmp_path / "annotations", GOOD_ROWS, images=images)
    assert not (tmp_path / "annotations" / "cat.png").exists()
    dataset = llava(str(path), image_root=str(images))
    assert _fields(dataset) == _expected(images)
    with pytest.raises(DataError) as excinfo:
        llava(str(path))
    _one_line(excinfo, "llava:llava_instruct.json", "no usable samples", "5 missing image")


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b'[{"id": "1", "image": "cat.png",', ("not valid JSON",)),
        (b"", ("not valid JSON",)),
        (b'{"conversations": []}', ("top level is dict", "expected a list")),
        ('[{"id": "caf\u00e9", "image": "cat.png"}]'.encode("latin-1"), ("not UTF-8",)),
    ],
    ids=["truncated", "empty", "object", "latin-1"],
)
def test_unreadable_files_give_one_line_errors_naming_the_file(tmp_path: Path, content: bytes, needles: tuple[str, ...]) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(DataError) as excinfo:
        llava(str(path))
    _one_line(excinfo, str(path), *needles)


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        llava(str(tmp_path / "nope.json"))
    _one_line(excinfo, "nope.json", "no such file")


def test_a_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = _write_dataset(tmp_path, GOOD_ROWS)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert _fields(llava(str(path))) == _expected(tmp_path)


def test_opens_through_the_registry_by_prefix_and_by_bare_path(tmp_path: Path) -> None:
    path = _write_dataset(tmp_path, GOOD_ROWS)
    by_prefix = open_dataset(f"llava:{path}", "train", {})
    assert _fields(by_prefix) == _expected(tmp_path)
    images = tmp_path / "elsewhere"
    _write_image(images / "coco" / "bus.png", 0)
    _write_image(images / "cat.png", 1)
    assert _fields(open_dataset(str(path), "train", {"image_root": str(images)})) == _expected(images)
    assert plugin_manager.registries().datasets.resolve(str(path)).entry.name == "llava:"


def test_bare_path_claims_only_conversation_lists(tmp_path: Path) -> None:
    datasets = plugin_manager.registries().datasets
    _write_image(tmp_path / "cat.png", 1)
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "cat.png"}], "annotations": [{"image_id": 1, "caption": "a cat"}]}))
    assert datasets.resolve(str(coco)).entry.name == "coco:"
    for name, content in {
        "plain_list.json": [{"image": "cat.png", "caption": "a cat"}],
        "empty_list.json": [],
        "strings.json": ["conversations"],
        "not_json.json": "[{oops",
    }.items():
        other = tmp_path / name
        other.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(UnknownNameError):
            datasets.resolve(str(other))
    renamed = tmp_path / "conversations.txt"
    renamed.write_text(json.dumps(GOOD_ROWS))
    with pytest.raises(UnknownNameError):
        datasets.resolve(str(renamed))


def test_a_short_training_stage_runs_on_llava_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from blipkit.config import load_recipe
    from blipkit.train.runner import train

    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))
    path = _write_dataset(tmp_path / "data", [*GOOD_ROWS, TEXT_ONLY_ROW])
    overrides = ["~stage1", "stage2.steps=2", "stage2.tasks=[vqa]", f"data.train={{name: 'llava:{path}'}}",
                 "data.batch_size=2"]
    result = train(load_recipe("tiny", overrides), output=tmp_path / "run", quiet=True)
    assert result.completed
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [("stage2", 1), ("stage2", 2)]
    assert all(math.isfinite(r["loss"]) for r in rows)
