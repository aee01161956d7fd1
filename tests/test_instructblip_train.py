"""The ``instructblip`` objective: templated instructions, the Q-Former reading them, the tiny recipe end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import blipkit
from blipkit.cli import cli
from blipkit.config import load_recipe, recipe_from_dict, recipe_to_dict
from blipkit.data.sample import Sample
from blipkit.errors import ConfigError
from blipkit.plugin_manager import registries
from blipkit.recipe_check import validate_recipe
from blipkit.plugins.objectives.instruction_tuning import CAPTION_TEMPLATES, VQA_TEMPLATES, InstructionText, checked_templates

QUESTION = "what colour is the square?"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny InstructBLIP recipe trained through the CLI."""
    root = tmp_path_factory.mktemp("instructblip")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BLIPKIT_CACHE", str(root / "cache"))
        result = CliRunner().invoke(
            cli, ["train", "instructblip-tiny", "--output", str(root / "run"), "stages.stage1.steps=1",
                  "stages.instruct.steps=2", "--quiet"]
        )
    assert result.exit_code == 0, result.output + str(result.exception)
    return root / "run"


def _samples(count: int) -> list[Sample]:
    caption = [Sample(None, f"a red square {i}", image_id=f"img{i}") for i in range(count)]
    vqa = [Sample(None, "red", question=f"{QUESTION} {i}", image_id=f"img{i}", task="vqa") for i in range(count)]
    return caption + vqa


def test_the_trained_model_answers_through_ask(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "instruct"] == [1, 2]
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 40), (220, 30, 30)).save(image)
    result = CliRunner().invoke(cli, ["ask", str(image), QUESTION, "-m", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output + str(result.exception)
    assert json.loads(result.stdout)["answer"].strip()
    model = blipkit.load(run_dir)
    assert type(model.inference_objective()).__name__ == "InstructionTuning"
    tokens = model.image_tokens(model.pixel_values([image])).expand(2, -1, -1)
    with torch.no_grad():
        prefix = model.inference_objective().prefix(model, tokens, [model.vqa_prompt(QUESTION), "A short image description:"])
    assert (prefix[0] - prefix[1]).abs().max() > 1e-4  # the prompt reaches the queries


def test_the_loss_trains_the_qformer_through_the_instruction(run_dir: Path) -> None:
    model = blipkit.load(run_dir)
    objective = registries().objectives.create("instructblip")
    samples = _samples(2)
    for sample in samples:
        sample.image = Image.new("RGB", (32, 32), (200, 40, 40))
    batch = objective.collator(model, model.recipe)(samples)
    model.train()
    losses = objective.loss(model, batch)
    losses["loss"].backward()
    words = model.bridge.embeddings.word.weight.grad
    tokens = model.bridge.tokenize_instructions(batch["instructions"])
    used = tokens["input_ids"][tokens["attention_mask"].bool()].unique()
    assert words is not None and words[used].abs().sum(1).gt(0).all()
    assert objective.items(batch) == batch["lm"].num_targets() > 0


def test_templates_are_drawn_per_sample_from_the_seed() -> None:
    templates = checked_templates(None)
    tokenize = registries().llms.create("tiny-llama").tokenize
    samples = _samples(24)
    first = InstructionText(tokenize, templates, seed=0)(samples)["instructions"]
    again = InstructionText(tokenize, templates, seed=0)(list(reversed(samples)))["instructions"]
    other = InstructionText(tokenize, templates, seed=1)(samples)["instructions"]
    assert first == list(reversed(again))  # the same sample gets the same template wherever it is drawn
    assert first != other
    captions, questions = first[:24], first[24:]
    assert len(set(captions)) >= 6 and set(captions) <= set(templates["caption"])
    assert len({q.replace(" 1", "").split(QUESTION)[0] for q in questions}) >= 4
    assert all(QUESTION in q and "<Image>" not in q for q in questions)


@pytest.mark.parametrize("name", ["instructblip", "instructblip-tiny"])
def test_the_recipes_hold_their_evaluation_prompts_out_of_training(name: str) -> None:
    path = Path(registries().recipes.resolve(name).entry.factory())
    assert path.read_text().splitlines()[1] == f"# Launch: blipkit train {name}"
    recipe = load_recipe(name)
    validate_recipe(recipe)
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe
    assert [s.objective for s in recipe.stages] == ["blip2-stage1", "instructblip"]
    templates = checked_templates(None)
    assert recipe.data.caption_prompt not in templates["caption"]
    assert recipe.data.vqa_prompt not in templates["vqa"]
    assert len(CAPTION_TEMPLATES) >= 10 and len(VQA_TEMPLATES) >= 8


@pytest.mark.parametrize(
    ("templates", "words"),
    [
        ({"vqa": ["What is shown?"]}, "'{}'"),
        ({"caption": ["Describe {}"]}, "takes no question"),
        ({"ocr": ["Read it"]}, "unknown task 'ocr'"),
        ({"caption": []}, "non-empty list"),
    ],
)
def test_bad_templates_are_one_line_config_errors(templates: dict, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        registries().objectives.create("instructblip", templates=templates)
    assert words in str(info.value) and "\n" not in str(info.value)
