"""Batched captions and answers equal one-image-at-a-time ones, and a bad image skips only itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import blipkit
from blipkit.batch_inference import Question, answer_questions, caption_files, read_questions
from blipkit.cli import cli
from blipkit.config import load_recipe
from blipkit.errors import DataError
from blipkit.model.build import build_model
from blipkit.model.vlm import VisionLanguageModel

QUESTIONS = [
    "what?",
    "what colour is the big shape on the left?",
    "how many shapes",
    "is there a red circle in the middle of the picture?",
    "what shape",
    "where",
]


def _steered(llm: str) -> VisionLanguageModel:
    """The tiny recipe's model with spread bridge and projection weights, so that each image gets its own text."""
    model = build_model(load_recipe("tiny", [f"llm.name={llm}"])).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for param in [*model.bridge.parameters(), *model.projection.parameters()]:
            param.add_(torch.randn_like(param) * 0.5)
        if llm == "tiny-t5":  # the random T5 repeats one word whatever its input; sharper weights listen
            for param in model.llm.parameters():
                param.mul_(8.0)
    return model


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-t5"])
def model(request: pytest.FixtureRequest) -> VisionLanguageModel:
    return _steered(request.param)


@pytest.mark.parametrize("beams", [1, 5])
def test_batched_equals_one_at_a_time(model: VisionLanguageModel, beams: int) -> None:
    images = _images(len(QUESTIONS))
    settings = {"num_beams": beams, "max_new_tokens": 6}
    captions = model.caption(images, **settings)
    answers = model.ask(images, QUESTIONS, **settings)
    assert len(set(captions)) > 2 and len(set(answers)) > 2, "the check needs texts that differ per image"
    assert captions == [model.caption([image], **settings)[0] for image in images]
    assert answers == [model.ask([image], [question], **settings)[0] for image, question in zip(images, QUESTIONS)]
    two = model.caption(images[:2], num_captions=2, **settings)
    assert two[:2] == model.caption(images[:1], num_captions=2, **settings)


def test_beams_share_one_prefill_and_give_the_same_text(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _steered("tiny-llama")
    images = _images(4)
    settings = {"num_beams": 5, "max_new_tokens": 6}
    shared: list[dict[str, object]] = []
    original = type(model.llm)._shared_cache

    def spy(llm: object, inputs: dict[str, torch.Tensor], options: dict[str, object]) -> dict[str, object]:
        shared.append(original(llm, inputs, options))
        return shared[-1]

    monkeypatch.setattr(type(model.llm), "_shared_cache", spy)
    answers = model.ask(images, QUESTIONS[:4], **settings)
    assert len(shared) == 1 and "cache" in shared[0], "beam search should reuse one prefill per image"
    monkeypatch.setattr(type(model.llm), "_shared_cache", lambda llm, inputs, options: {})
    assert model.ask(images, QUESTIONS[:4], **settings) == answers


def _files(folder: Path, count: int) -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = []
    for number, image in enumerate(_images(count)):
        paths.append(folder / f"{number}.png")
        image.save(paths[-1])
    return paths


def test_a_bad_image_skips_only_itself(model: VisionLanguageModel, tmp_path: Path) -> None:
    paths = _files(tmp_path, 5)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    paths.insert(2, broken)
    skipped: list[object] = []
    counted: list[int] = []
    settings = {"num_beams": 5, "max_new_tokens": 6}
    done = list(caption_files(model, paths, batch_size=4, on_skip=lambda item, err: skipped.append(item),
                              progress=counted.append, **settings))
    assert skipped == [broken] and counted == [4, 2]
    assert [path for path, _ in done] == [p for p in paths if p != broken]
    assert [texts[0] for _, texts in done] == model.caption([p for p in paths if p != broken], **settings)

    questions = [Question(path, question) for path, question in zip(paths, QUESTIONS)]
    skipped.clear()
    answered = list(answer_questions(model, questions, batch_size=4, on_skip=lambda item, err: skipped.append(item),
                                     **settings))
    assert skipped == [broken] and [q for q, _ in answered] == [q for q in questions if q.image != broken]
    assert [a for _, a in answered] == [model.ask([q.image], [q.question], **settings)[0] for q, _ in answered]
    with pytest.raises(DataError, match="broken.png"):
        list(caption_files(model, paths, batch_size=4))


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_eval_gives_the_same_predictions_at_any_batch_size(model: VisionLanguageModel, task: str) -> None:
    from blipkit.data.dataset import open_dataset
    from blipkit.eval.evaluate import evaluate, progress_total

    data = open_dataset("shapes", "test", {"num_images": 3, "image_size": 32})
    counted: list[int] = []
    one = evaluate(model, data, task, batch_size=1, generation={"max_new_tokens": 4}, progress=counted.append)
    many = evaluate(model, data, task, batch_size=5, generation={"max_new_tokens": 4})
    assert len(one.predictions) >= 3 and one.predictions == many.predictions
    assert sum(counted) == progress_total(data, task) == (3 if task == "caption" else len(one.predictions))


def test_read_questions_skips_bad_rows(tmp_path: Path) -> None:
    file = tmp_path / "questions.jsonl"
    rows = ['{"image": "a.png", "question": "what?", "id": 7}', "", "{not json", '{"question": "no image"}',
            '["a list"]', '{"image": "/abs/b.png", "question": ""}']
    file.write_text("\n".join(rows) + "\n")
    skipped: list[tuple[object, str]] = []
    questions = read_questions(file, on_skip=lambda item, err: skipped.append((item, str(err))))
    assert questions == [Question(tmp_path / "a.png", "what?", {"id": 7}), Question(Path("/abs/b.png"), "")]
    assert [item for item, _ in skipped] == [f"{file} line {n}" for n in (3, 4, 5)]
    assert "not JSON" in skipped[0][1] and '"image"' in skipped[1][1]
    with pytest.raises(DataError, match="line 3: not JSON"):
        read_questions(file)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _steered("tiny-llama").save(tmp_path_factory.mktemp("batched") / "run")


def _invoke(*args: str) -> object:
    return CliRunner().invoke(cli, list(args))


def test_cli_ask_many_images_and_a_questions_file(run_dir: Path, tmp_path: Path) -> None:
    paths = _files(tmp_path / "images", 3)
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    model = blipkit.load(run_dir)
    expected = [model.ask([p], ["what colour?"], num_beams=5)[0] for p in paths]

    many = _invoke("ask", str(tmp_path / "images"), "what colour?", "-m", str(run_dir), "-b", "2")
    assert many.exit_code == 1, many.output  # broken.png was skipped; the others are answered
    assert many.stdout.splitlines() == [f"{p}: {answer}" for p, answer in zip(paths, expected)]
    assert "Skipped" in many.stderr and "broken.png" in many.stderr
    assert many.stderr.strip().splitlines()[-1].startswith("Error: skipped 1 of 4 inputs")

    file = tmp_path / "questions.jsonl"
    rows = [{"image": f"images/{p.name}", "question": q, "id": n} for n, (p, q) in enumerate(zip(paths, QUESTIONS))]
    file.write_text("\n".join(json.dumps(row) for row in rows) + "\nnot json\n")
    asked = _invoke("ask", "--questions", str(file), "-m", str(run_dir), "--json", "--batch-size", "2")
    assert asked.exit_code == 1 and "line 4: not JSON" in asked.stderr
    lines = [json.loads(line) for line in asked.stdout.splitlines()]
    assert [(line["id"], line["question"]) for line in lines] == [(row["id"], row["question"]) for row in rows]
    assert [line["answer"] for line in lines] == [model.ask([p], [q])[0] for p, q in zip(paths, QUESTIONS)]

    alone = _invoke("ask", str(paths[0]), "what colour?", "-m", str(run_dir))
    assert alone.exit_code == 0 and alone.stdout == expected[0] + "\n"
    both = _invoke("ask", str(paths[0]), "what?", "--questions", str(file), "-m", str(run_dir))
    assert both.exit_code == 2 and "not both" in both.stderr
    nothing = _invoke("ask", "what?", "-m", str(run_dir))
    assert nothing.exit_code == 2 and "--questions" in nothing.stderr


def test_cli_caption_batches_give_the_same_lines(run_dir: Path, tmp_path: Path) -> None:
    paths = _files(tmp_path / "images", 5)
    outputs = [
        _invoke("caption", str(tmp_path / "images"), "-m", str(run_dir), "--beams", "5", "-b", size).stdout
        for size in ("1", "3")
    ]
    assert outputs[0] == outputs[1] and len(set(outputs[0].splitlines())) == len(paths)
