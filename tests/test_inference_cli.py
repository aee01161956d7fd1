"""caption, ask, retrieve, attention and eval through the CLI on a tiny trained run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from blipkit.cli import cli
from blipkit.config import load_recipe
from blipkit.train.runner import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BLIPKIT_CACHE", str(root / "cache"))
        train(load_recipe("tiny", ["stage1.steps=2", "stage2.steps=2"]), output=root / "run", quiet=True)
    return root / "run"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name, colour in (("red.png", (220, 30, 30)), ("blue.jpg", (30, 30, 220)), ("green.png", (30, 200, 30))):
        Image.new("RGB", (40, 40), colour).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folder


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))


def invoke(*args: str) -> object:
    return CliRunner().invoke(cli, list(args))


def test_caption_a_folder_as_json_skips_the_corrupt_image(run_dir: Path, images: Path) -> None:
    result = invoke("caption", str(images), "--model", str(run_dir), "--json", "--beams", "1", "--max-new-tokens", "4")
    assert result.exit_code == 1, result.output + str(result.exception)  # 1: an input was skipped
    assert result.stderr.strip().splitlines()[-1].startswith("Error: skipped 1 of 4 inputs")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["blue.jpg", "green.png", "red.png"]
    assert all(isinstance(r["caption"], str) for r in rows)
    assert "Skipped" in result.stderr and "broken.png" in result.stderr


def test_caption_plain_text_and_glob(run_dir: Path, images: Path) -> None:
    result = invoke("caption", str(images / "*.png"), "-m", str(run_dir), "--beams", "1", "--max-new-tokens", "3")
    assert result.exit_code == 1  # broken.png is skipped; the others are still captioned
    assert result.stdout.count(": ") == 2 and "red.png" in result.stdout


def test_ask(run_dir: Path, images: Path) -> None:
    result = invoke("ask", str(images / "red.png"), "what color is the square?", "-m", str(run_dir), "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["question"] == "what color is the square?" and isinstance(answer["answer"], str)


def test_missing_model_and_missing_image_are_one_line_errors(run_dir: Path, images: Path, tmp_path: Path) -> None:
    missing = invoke("caption", str(images / "red.png"), "--model", str(tmp_path / "nothing"))
    assert missing.exit_code == 1
    assert missing.stderr.startswith("Error: ") and len(missing.stderr.strip().splitlines()) == 1
    assert "blipkit train" in missing.stderr
    no_default = invoke("caption", str(images / "red.png"))
    assert no_default.exit_code == 1 and "no --model given" in no_default.stderr
    no_image = invoke("ask", str(images / "nope.png"), "what?", "-m", str(run_dir))
    assert no_image.exit_code == 1 and "nope.png" in no_image.stderr and "Traceback" not in no_image.stderr


def test_retrieve_ranks_images(run_dir: Path, images: Path) -> None:
    result = invoke("retrieve", "-m", str(run_dir), "--images", str(images), "--text", "a red square", "--top-k", "2", "--json")
    assert result.exit_code == 1, result.output + str(result.exception)  # broken.png is skipped
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and rows[0]["score"] >= rows[1]["score"]
    assert "broken.png" in result.stderr


def test_without_itm_retrieval_ranks_by_contrastive_similarity(tmp_path: Path, images: Path) -> None:
    import torch

    import blipkit
    from blipkit.data.images import load_image
    from blipkit.eval.evaluate import evaluate
    from blipkit.data.dataset import open_dataset

    overrides = ["stage1.steps=2", "stage2.steps=1", "bridge.options.objectives=[itc,itg]"]
    train(load_recipe("tiny", overrides), output=tmp_path / "run", quiet=True)
    model = blipkit.load(tmp_path / "run")
    assert model.bridge.objectives == ("itc", "itg")
    result = invoke("retrieve", "-m", str(tmp_path / "run"), "--images", str(images), "--text", "a red square", "--json")
    assert result.exit_code == 1, result.output + str(result.exception)  # broken.png is skipped
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    paths = sorted(p for p in images.iterdir() if p.name != "broken.png")
    with torch.no_grad():
        similarity = model.similarity(model.embed_images([load_image(p) for p in paths]), model.embed_texts(["a red square"]))
    expected = sorted(zip(similarity[:, 0].tolist(), [str(p) for p in paths]), reverse=True)
    assert [r["image"] for r in rows] == [path for _, path in expected]
    assert [r["score"] for r in rows] == [round(score, 4) for score, _ in expected]

    test = open_dataset("shapes", "test", {"num_images": 6, "image_size": 32})
    scores = evaluate(model, test, "retrieval", batch_size=4).scores
    assert {"i2t_r1", "t2i_r1"} <= set(scores)


def test_attention_png_varies_with_the_image(run_dir: Path, images: Path, tmp_path: Path) -> None:
    outputs = []
    for name in ("red.png", "blue.jpg"):
        out = tmp_path / f"heat-{name}.png"
        result = invoke("attention", str(images / name), "-m", str(run_dir), "--out", str(out))
        assert result.exit_code == 0, result.output + str(result.exception)
        with Image.open(out) as picture:
            assert picture.format == "PNG" and picture.size == (32, 32)
            outputs.append(picture.convert("RGB").tobytes())
    assert outputs[0] != outputs[1]
    grid = tmp_path / "grid.png"
    assert invoke("attention", str(images / "red.png"), "-m", str(run_dir), "-o", str(grid), "--per-query").exit_code == 0
    with Image.open(grid) as picture:
        assert picture.size == (4 * 32, 32), "one tile per query (the tiny recipe has 4)"


@pytest.mark.parametrize("task", ["caption", "vqa", "retrieval"])
def test_eval_writes_predictions_and_scores(run_dir: Path, tmp_path: Path, task: str) -> None:
    out = tmp_path / "eval"
    result = invoke("eval", "-m", str(run_dir), "--task", task, "--data", "shapes", "--split", "test",
                    "--option", "num_images=6", "--option", "image_size=32", "--beams", "1", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output + str(result.exception)
    scores = json.loads((out / f"{task}_scores.json").read_text())
    assert scores == json.loads(result.stdout)
    lines = (out / f"{task}_predictions.jsonl").read_text().splitlines()
    if task == "caption":
        assert len(lines) == 6 and {"Bleu_4", "CIDEr", "shapes_single_shape"} <= set(scores)
    elif task == "vqa":
        assert len(lines) > 6 and 0.0 <= scores["accuracy"] <= 1.0
    else:
        assert len(lines) == 6 and {"i2t_r1", "t2i_r5"} <= set(scores)
