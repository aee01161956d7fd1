"""The lexical warm start: projector read-outs, spelled targets, the ridge fit against a float64 reference,
and ``stage2.projection_init`` in recipes and runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blipkit.config import load_recipe
from blipkit.recipe_check import validate_recipe
from blipkit.data.collate import Collator, LanguageModelText
from blipkit.errors import ConfigError, DataError
from blipkit.model.build import add_language_model, build_model
from blipkit.plugins.bridges.projectors import LinearProjector, MLPProjector
from blipkit.train.lexical import lexical_init, reading_samples, spelled_targets, teach_reading
from blipkit.data.dataset import open_dataset
from blipkit.features import cached_features
from blipkit.train.runner import train


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "projector",
    [
        LinearProjector(6, 5),
        LinearProjector(6, 5, bias=False),
        LinearProjector(6, 5, num_tokens=4),
        MLPProjector(6, 5, hidden_dim=7, layer_norm=True),
        MLPProjector(6, 6, hidden_dim=7),
        MLPProjector(6, 5, hidden_dim=7, num_tokens=4, dropout=0.3),
    ],
    ids=["linear", "linear-no-bias", "linear-pooled", "mlp-skip-linear", "mlp-skip-identity", "mlp-pooled"],
)
def test_readout_reproduces_forward_for_any_installed_weight(projector: torch.nn.Module) -> None:
    torch.manual_seed(0)
    projector.eval()
    tokens = torch.randn(3, 9, 6)
    features, fixed = projector.readout(tokens)
    weight = torch.randn(features.shape[-1], projector.output_dim)
    projector.set_readout(weight)
    expected = features.double() @ weight.double() + (fixed.double() if fixed is not None else 0.0)
    got = projector(tokens).queries.double()
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)
    features_after, _ = projector.readout(tokens)
    assert torch.equal(features_after, features), "installing a read-out must not change its features"


def test_spelled_targets_cycle_over_the_target_tokens_without_eos() -> None:
    embeddings = torch.arange(3 * 6, dtype=torch.float64).reshape(3, 6, 1).expand(3, 6, 2)
    labels = torch.tensor(
        [
            [-100, -100, 11, 12, 13, 2],  # prompt, 3 target tokens, EOS
            [-100, 21, 2, -100, -100, -100],  # 1 target token, EOS, padding
            [-100, -100, -100, -100, 2, -100],  # EOS only
        ]
    )
    targets, usable = spelled_targets(embeddings, labels, num_queries=5)
    assert usable.tolist() == [True, True, False]
    assert targets[0, :, 0].tolist() == [2, 3, 4, 2, 3]
    assert targets[1, :, 0].tolist() == [7] * 5
    assert torch.equal(targets[2], torch.zeros(5, 2, dtype=torch.float64))


def _tiny(tmp_path: Path, *overrides: str):
    recipe = load_recipe("tiny", [f"output={tmp_path / 'run'}", *overrides])
    torch.manual_seed(0)
    model = build_model(recipe, with_llm=False)
    dataset = cached_features(model, open_dataset("shapes", "train", {"num_images": 24, "image_size": 32}), quiet=True)
    add_language_model(model, recipe)
    return recipe, model, dataset


@pytest.mark.parametrize("projection", ["linear", "mlp"])
def test_fit_equals_a_float64_ridge_solution_and_reports_its_r2(tmp_path: Path, projection: str) -> None:
    recipe, model, dataset = _tiny(tmp_path, f"projection.name={projection}", "data.caption_prompt=A picture of")
    ridge = 1e-3
    fit = lexical_init(model, dataset, recipe, ridge=ridge, quiet=True)

    captions = [i for i, r in enumerate(dataset.records) if r.task == "caption"]
    collator = Collator(model.encoder.preprocess, LanguageModelText(model.llm.tokenize, caption_prompt="A picture of"))
    batch = collator([dataset[i] for i in captions])
    model.eval()
    with torch.no_grad():
        queries = model.bridge(batch["image_tokens"].float()).queries
        features, fixed = model.projection.readout(queries)
        design = features.double().flatten(0, 1)
        goal = []
        for row in batch["lm"].labels:
            ids = row[row != -100][:-1]
            goal.append(model.llm.embed(ids[torch.arange(queries.shape[1]) % len(ids)]).double())
        goal = torch.stack(goal).flatten(0, 1)
        offset = fixed.double().flatten(0, 1) if fixed is not None else torch.zeros_like(goal)
        gram = design.T @ design + ridge * len(design) * torch.eye(design.shape[1], dtype=torch.float64)
        reference = torch.linalg.solve(gram, design.T @ (goal - offset))
        prefix = model.projection(queries).queries.double().flatten(0, 1)
    expected = design @ reference + offset
    assert fit.samples == len(captions) and fit.features == design.shape[1]
    assert torch.allclose(prefix, expected, atol=1e-4 * float(expected.abs().max()))
    r2 = 1 - float((goal - prefix).pow(2).sum() / (goal - goal.mean(0)).pow(2).sum())
    assert fit.r2 == pytest.approx(r2, abs=1e-3)
    assert 0.0 < fit.r2 < 1.0


def test_training_runs_the_fit_before_stage_2_only_on_a_fresh_start(tmp_path: Path) -> None:
    recipe = load_recipe("tiny", ["stage2.projection_init=lexical"])
    validate_recipe(recipe)
    result = train(recipe, output=tmp_path / "run", quiet=True)
    assert result.completed and result.projection_fit is not None and result.projection_fit.samples == 48
    resumed = train(recipe, output=tmp_path / "run2", quiet=True, stop_after=6)
    assert not resumed.completed and resumed.projection_fit is not None
    continued = train(recipe, output=tmp_path / "run2", quiet=True, resume=True)
    assert continued.completed and continued.projection_fit is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage1.projection_init=lexical"], "stage1.projection_init"),
        (["stage2.projection_init=spelled"], "expected lexical"),
        (["stage2.projection_init=lexical", "projection.name=moe"], "no linear read-out"),
        (["stage2.projection_init=lexical", "projection.pretrained=."], "projection.pretrained"),
    ],
)
def test_bad_projection_init_is_a_one_line_config_error(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        validate_recipe(load_recipe("tiny", overrides))
    assert "\n" not in str(caught.value)


def test_a_dataset_without_captions_is_refused(tmp_path: Path) -> None:
    recipe, model, _ = _tiny(tmp_path)
    questions = cached_features(
        model, open_dataset("shapes", "train", {"num_images": 8, "image_size": 32, "tasks": "vqa"}), quiet=True
    )
    with pytest.raises(DataError, match="has none"):
        lexical_init(model, questions, recipe, quiet=True)


def test_reading_samples_pair_each_sample_with_its_images_caption() -> None:
    dataset = open_dataset("shapes", "train", {"num_images": 6, "image_size": 32})
    samples = reading_samples(dataset, ["caption", "vqa"], "A picture of", "Q: {} A:".format)
    captions = {r.image_id: r.text for r in dataset.records if r.task == "caption"}
    assert len(samples) == len(dataset.records) > len(captions)
    for (caption, prompt, target), record in zip(samples, dataset.records, strict=True):
        assert caption == captions[record.image_id] and target == record.text
        assert prompt == ("A picture of" if record.task == "caption" else f"Q: {record.question} A:")
    assert len(reading_samples(dataset, ["vqa"], "", "{}".format)) == len(dataset.records) - len(captions)
    questions = open_dataset("shapes", "train", {"num_images": 6, "image_size": 32, "tasks": "vqa"})
    with pytest.raises(DataError, match="no training sample has an image with a caption"):
        reading_samples(questions, ["vqa"], "", "{}".format)


def test_reading_warmup_trains_only_the_adapters_and_lowers_their_loss(tmp_path: Path) -> None:
    recipe, model, dataset = _tiny(tmp_path, "llm.lora={r: 4, alpha: 8}")
    before = {name: p.detach().clone() for name, p in model.llm.named_parameters()}
    trainable = {name for name, p in model.llm.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in name for name in trainable)
    report = teach_reading(model, dataset, recipe, ["caption", "vqa"], 4, steps=30, lr=1e-2, batch_size=8, quiet=True)
    assert report.steps == 30 and report.samples == len(dataset.records)
    assert report.last_loss < 0.8 * report.first_loss
    for name, p in model.llm.named_parameters():
        assert torch.equal(p, before[name]) == (name not in trainable), name
    assert "30 steps" in str(report)


def test_reading_warmup_runs_before_stage_2_and_is_refused_without_its_prerequisites(tmp_path: Path) -> None:
    overrides = ["stage2.projection_init=lexical", "llm.lora={r: 4, alpha: 8}", "stage2.options.reading_steps=3"]
    recipe = load_recipe("tiny", overrides)
    validate_recipe(recipe)
    result = train(recipe, output=tmp_path / "run", quiet=True)
    report = str(result.prepared["stage2"])
    assert result.completed and result.projection_fit is not None
    assert "projection fitted" in report and "LLM adapters taught to read spelled captions: 3 steps" in report
    for dropped, message in (
        ("stage2.projection_init=lexical", "set stage2.projection_init: lexical"),
        ("llm.lora={r: 4, alpha: 8}", "add llm.lora"),
    ):
        with pytest.raises(ConfigError, match=message) as caught:
            validate_recipe(load_recipe("tiny", [o for o in overrides if o != dropped]))
        assert "\n" not in str(caught.value)
    for bad in ("-1", "1.5", "true"):
        with pytest.raises(ConfigError, match="reading_steps"):
            validate_recipe(load_recipe("tiny", [*overrides[:2], f"stage2.options.reading_steps={bad}"]))
