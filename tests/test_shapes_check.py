"""Checking captions of shapes pictures: the relation, the strict check, and ``blipkit shapes --caption``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from blipkit.cli import cli
from blipkit.config import load_recipe
from blipkit.errors import DataError
from blipkit.plugins.datasets.shapes_scoring import (
    caption_right,
    check_captions,
    read_metadata,
    relation_correct,
    score_captions,
    score_line,
)
from blipkit.train.runner import train

RED_CIRCLE_BLUE_SQUARE = [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}]


@pytest.mark.parametrize(
    ("caption", "relation", "right"),
    [
        ("a red circle left of a blue square", "left of", True),
        ("a blue square right of a red circle", "left of", True),
        ("a red circle above a blue square", "above", True),
        ("a blue square below the red circle", "above", True),
        ("a red circle above a blue square", "left of", False),
        ("a blue square left of a red circle", "left of", False),
        ("a red circle left of a blue square", "above", False),
        ("a red circle and a blue square", "left of", False),
        ("a red circle", "left of", False),
    ],
)
def test_relation_correct(caption: str, relation: str, right: bool) -> None:
    assert relation_correct(caption, RED_CIRCLE_BLUE_SQUARE, relation) is right


def test_caption_right_needs_binding_and_relation() -> None:
    assert caption_right("a red circle left of a blue square", RED_CIRCLE_BLUE_SQUARE, "left of")
    assert not caption_right("a blue circle left of a red square", RED_CIRCLE_BLUE_SQUARE, "left of")
    assert not caption_right("a red circle above a blue square", RED_CIRCLE_BLUE_SQUARE, "left of")
    assert caption_right("a red circle", RED_CIRCLE_BLUE_SQUARE[:1], None)


def test_score_captions_reports_exact_two_shape_captions() -> None:
    predictions = [
        {"caption": "a red circle left of a blue square", "objects": RED_CIRCLE_BLUE_SQUARE, "relation": "left of"},
        {"caption": "a red circle above a blue square", "objects": RED_CIRCLE_BLUE_SQUARE, "relation": "left of"},
        {"caption": "a red circle", "objects": RED_CIRCLE_BLUE_SQUARE[:1], "relation": None},
    ]
    scores = score_captions(predictions)
    assert scores["shapes_two_shapes"] == 1.0 and scores["shapes_two_shapes_exact"] == 0.5
    assert scores["shapes_single_shape"] == 1.0


def test_check_captions_and_score_line() -> None:
    rows = [
        {"text": "a red circle left of a blue square", "objects": RED_CIRCLE_BLUE_SQUARE, "relation": "left of"},
        {"text": "a red circle", "objects": RED_CIRCLE_BLUE_SQUARE[:1], "relation": None},
        {"text": "a red circle", "objects": RED_CIRCLE_BLUE_SQUARE[:1], "relation": None},
    ]
    checked = check_captions(rows, ["a blue square right of a red circle", "a red circle", "a blue circle"])
    assert [c.right for c in checked] == [True, True, False]
    assert checked[2].truth == "a red circle" and checked[0].objects == 2
    assert score_line(checked).startswith("2 of 3 captions right (1 of 2 single-shape, 1 of 1 two-shape")
    with pytest.raises(DataError, match="one per picture"):
        check_captions(rows, ["a red circle"])


def test_read_metadata_refuses_other_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="blipkit shapes"):
        read_metadata(tmp_path / "metadata.jsonl")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a cat"}) + "\n")
    with pytest.raises(DataError, match="not written by 'blipkit shapes'"):
        read_metadata(tmp_path / "metadata.jsonl")


def test_shapes_command_captions_and_scores_the_pictures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))
    train(load_recipe("tiny", ["stage1.steps=2", "stage2.steps=2"]), output=tmp_path / "run", quiet=True)
    folder = tmp_path / "pictures"
    result = CliRunner().invoke(cli, ["shapes", str(folder), "-n", "3", "--image-size", "32", "--caption"])
    assert result.exit_code == 0, result.output + str(result.exception)
    lines = result.stdout.splitlines()
    assert lines[0] == f"Wrote 3 test images and metadata.jsonl to {folder}"
    assert lines[1] == f"Captions by {(tmp_path / 'run').resolve()}, beside the truth:"
    rows = read_metadata(folder / "metadata.jsonl")
    for line, row in zip(lines[2:5], rows):
        assert line.split()[0] in {"right", "WRONG"} and line.endswith(f"(truth: {row['text']})")
    right = sum(line.split()[0] == "right" for line in lines[2:5])
    assert lines[5].startswith(f"{right} of 3 captions right (") and len(lines) == 6


def test_shapes_command_model_needs_caption(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["shapes", str(tmp_path / "p"), "--model", str(tmp_path)])
    assert result.exit_code == 2 and "--model goes with --caption" in result.output
