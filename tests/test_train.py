"""The recipe runner: the tiny recipe end to end, schedules, resume, checkpoints."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import blipkit
from blipkit.cli import cli
from blipkit.config import StageConfig, load_recipe
from blipkit.errors import ConfigError
from blipkit.io import load_safetensors
from blipkit.train.optim import build_optimizer, build_scheduler, lr_at
from blipkit.train.runner import train


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    meta = json.loads((run / "blipkit.json").read_text())
    checkpoint = run / meta["checkpoint"]
    tensors = {f"bridge.{k}": v for k, v in load_safetensors(checkpoint / "bridge" / "model.safetensors").items()}
    if (checkpoint / "projection").exists():
        projection = load_safetensors(checkpoint / "projection" / "model.safetensors")
        tensors.update({f"projection.{k}": v for k, v in projection.items()})
    return tensors


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_recipe_end_to_end_through_the_cli(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "tiny", "-o", str(run), "-q"])
    assert result.exit_code == 0, result.output + str(result.exception)
    assert "stage1: loss" in result.output and "stage2: loss" in result.output
    assert f"blipkit caption IMAGE --model {run}" in result.output
    meta = json.loads((run / "blipkit.json").read_text())
    assert meta["recipe"]["name"] == "tiny" and meta["progress"]["completed"] == ["stage1"]
    checkpoint = run / meta["checkpoint"]
    for part in ("bridge/config.json", "bridge/model.safetensors", "projection/model.safetensors",
                 "trainer_state/optimizer.safetensors", "trainer_state/state.json"):
        assert (checkpoint / part).is_file(), part
    assert not list((run / "checkpoints").glob(".*.tmp"))
    rows = _metrics(run)
    assert [(r["stage"], r["step"]) for r in rows] == [("stage1", s) for s in range(1, 5)] + [("stage2", s) for s in range(1, 5)]
    assert {"itc", "itm", "itg", "itm_acc"} <= set(rows[0]) and "lm" in rows[-1]
    assert all(math.isfinite(r["loss"]) for r in rows)
    with Image.open(run / "curves.png") as image:
        assert image.format == "PNG" and image.width > 100

    model = blipkit.load(run)
    assert model.llm is not None and model.projection is not None
    picture = Image.new("RGB", (32, 32), (200, 30, 30))
    captions = model.caption([picture], num_beams=1, max_new_tokens=4, min_new_tokens=1)
    assert len(captions) == 1 and isinstance(captions[0], str)
    assert (tmp_path / "cache" / "last-run").read_text() == str(run.resolve())


def test_existing_run_is_not_overwritten_by_accident(tmp_path: Path) -> None:
    recipe = load_recipe("tiny", ["~stage1", "stage2.steps=1"])
    train(recipe, output=tmp_path / "run", quiet=True)
    result = CliRunner().invoke(cli, ["train", "tiny", "~stage1", "stage2.steps=1", "-o", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "already holds a run" in result.stderr and "--resume" in result.stderr


def test_schedule_warmup_cosine_and_minimum() -> None:
    stage = StageConfig(steps=100, lr=1e-3, min_lr=1e-5, warmup_steps=10)
    assert lr_at(0, stage) == 0.0
    assert lr_at(5, stage) == pytest.approx(5e-4)
    assert lr_at(10, stage) == pytest.approx(1e-3)
    assert lr_at(55, stage) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(100, stage) == pytest.approx(1e-5)
    layer = torch.nn.Linear(2, 2)
    optimizer = build_optimizer({"bridge": layer}, stage)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert optimizer.param_groups[1]["params"][0] is layer.bias
    scheduler = build_scheduler(optimizer, stage)
    seen = []
    for _ in range(100):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr_at(s, stage) for s in range(100)])


def test_schedule_counts_optimizer_steps_under_accumulation(tmp_path: Path) -> None:
    overrides = ["~stage1", "stage2.steps=3", "stage2.warmup_steps=2", "stage2.grad_accum=2", "stage2.min_lr=0.0"]
    train(load_recipe("tiny", overrides), output=tmp_path / "run", quiet=True)
    rows = _metrics(tmp_path / "run")
    stage = load_recipe("tiny", overrides).stage2
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(s, stage) for s in range(3)])


def test_lr_scale_gives_a_part_its_own_schedule() -> None:
    stage = StageConfig(steps=20, lr=1e-4, min_lr=1e-5, warmup_steps=4, lr_scale={"projection": 30})
    bridge, projection = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)
    optimizer = build_optimizer({"bridge": bridge, "projection": projection}, stage)
    scheduler = build_scheduler(optimizer, stage)
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert by_param[id(projection.weight)]["weight_decay"] == 0.05 and by_param[id(projection.bias)]["weight_decay"] == 0.0
    for step in range(20):
        assert by_param[id(bridge.weight)]["lr"] == pytest.approx(lr_at(step, stage))
        assert by_param[id(projection.weight)]["lr"] == pytest.approx(30 * lr_at(step, stage))
        assert by_param[id(projection.bias)]["lr"] == pytest.approx(30 * lr_at(step, stage))
        optimizer.step()
        scheduler.step()


def test_optimizer_is_fused_and_steps_as_reference_adamw() -> None:
    """The fused kernel gives the updates of torch's default (foreach) AdamW over the same groups."""
    stage = StageConfig(steps=5, lr=1e-2, warmup_steps=0, lr_scale={"projection": 3})
    torch.manual_seed(0)
    modules = {"bridge": torch.nn.Linear(4, 3), "projection": torch.nn.Linear(3, 2)}
    reference = {name: copy.deepcopy(module) for name, module in modules.items()}
    initial = copy.deepcopy(modules)
    optimizer = build_optimizer(modules, stage)
    assert optimizer.defaults["fused"] is True
    groups = [
        {"params": [reference[name].weight], "lr": stage.lr * scale, "weight_decay": stage.weight_decay}
        for name, scale in (("bridge", 1), ("projection", 3))
    ] + [
        {"params": [reference[name].bias], "lr": stage.lr * scale, "weight_decay": 0.0}
        for name, scale in (("bridge", 1), ("projection", 3))
    ]
    expected = torch.optim.AdamW(groups, betas=tuple(stage.betas), eps=stage.eps, foreach=True)
    inputs = torch.randn(8, 4)
    for opt, parts in ((optimizer, modules), (expected, reference)):
        for _ in range(stage.steps):
            parts["projection"](parts["bridge"](inputs)).square().sum().backward()
            opt.step()
            opt.zero_grad()
    for name in modules:
        for got, want in zip(modules[name].parameters(), reference[name].parameters(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(modules[name].weight, initial[name].weight, atol=1e-3)


@pytest.mark.parametrize("scale", ["{encoder: 2}", "{projection: 0}", "{projection: -1}"])
def test_lr_scale_rejects_unknown_parts_and_non_positive_values(scale: str) -> None:
    with pytest.raises(ConfigError, match="stage2.lr_scale"):
        load_recipe("tiny", [f"stage2.lr_scale={scale}"])


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """Train 8 steps; train 3 (mid stage 1), resume to 6 (mid stage 2), resume to the end: same weights."""
    recipe = load_recipe("tiny")
    whole = tmp_path / "whole"
    train(recipe, output=whole, quiet=True)
    parts = tmp_path / "parts"
    first = train(recipe, output=parts, stop_after=3, quiet=True)
    assert not first.completed
    assert json.loads((parts / "blipkit.json").read_text())["progress"]["step"] == 3
    result = CliRunner().invoke(cli, ["train", "--resume", str(parts), "--stop-after", "3", "-q"])
    assert result.exit_code == 0, result.output + str(result.exception)
    assert "continue with: blipkit train --resume" in result.output
    train(recipe, output=parts, resume=True, quiet=True)
    expected, got = _weights(whole), _weights(parts)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert [r["loss"] for r in _metrics(parts)] == [r["loss"] for r in _metrics(whole)]


def test_bridge_without_stage1_skips_it(tmp_path: Path) -> None:
    recipe = load_recipe("tiny", ["bridge.name=mlp", "bridge.options={num_tokens: 4}", "stage2.steps=2"])
    result = train(recipe, output=tmp_path / "run", quiet=True)
    assert list(result.final) == ["stage2"]
    assert {r["stage"] for r in _metrics(tmp_path / "run")} == {"stage2"}
    model = blipkit.load(tmp_path / "run")
    assert type(model.bridge).__name__ == "MLPProjector"


def test_loss_falls_when_overfitting(tmp_path: Path) -> None:
    overrides = ["~stage1", "stage2.steps=60", "stage2.lr=3e-3", "stage2.warmup_steps=2", "stage2.tasks=[caption]",
                 "data.train.options.num_images=8", "data.batch_size=8", "log_every=1"]
    train(load_recipe("tiny", overrides), output=tmp_path / "run", quiet=True)
    losses = [r["loss"] for r in _metrics(tmp_path / "run")]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_lora_run_saves_adapters_and_reloads(tmp_path: Path) -> None:
    from blipkit.model.lora import has_lora

    overrides = ["~stage1", "stage2.steps=3", "bridge.tuning=lora", "bridge.lora={r: 4}", "llm.lora={r: 4, alpha: 8}"]
    run = tmp_path / "run"
    train(load_recipe("tiny", overrides), output=run, quiet=True)
    checkpoint = run / json.loads((run / "blipkit.json").read_text())["checkpoint"]
    for part in ("bridge/lora.json", "bridge/lora.safetensors", "llm_adapter/adapter_config.json",
                 "llm_adapter/adapter_model.safetensors"):
        assert (checkpoint / part).is_file(), part
    lora = load_safetensors(checkpoint / "bridge" / "lora.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_B" in k), "adapters trained"
    model = blipkit.load(run)
    assert has_lora(model.bridge) and has_lora(model.llm.model)
    picture = Image.new("RGB", (32, 32), (0, 0, 255))
    first = model.caption([picture], num_beams=1, max_new_tokens=4)
    assert first == blipkit.load(run).caption([picture], num_beams=1, max_new_tokens=4)


def test_task_weights_balance_the_mixture() -> None:
    from collections import Counter
    from types import SimpleNamespace

    from blipkit.train.sampling import stage_indices

    records = [SimpleNamespace(task="caption")] * 10 + [SimpleNamespace(task="vqa")] * 40
    dataset = SimpleNamespace(records=records, name="d", tasks={"caption", "vqa"})
    natural = stage_indices(dataset, ["caption", "vqa"])
    assert natural == list(range(50))
    mixed = stage_indices(dataset, ["caption", "vqa"], {"caption": 1, "vqa": 1})
    tasks = Counter(records[i].task for i in mixed)
    assert tasks == {"caption": 40, "vqa": 40}
    assert set(mixed) == set(range(50)), "every sample is still used"
    assert Counter(i for i in mixed if i < 10) == {i: 4 for i in range(10)}
    only = stage_indices(dataset, ["caption"], {"caption": 2.0})
    assert only == list(range(10))


def test_validation_split_is_scored_after_each_stage(tmp_path: Path) -> None:
    overrides = ["stage1.steps=1", "stage2.steps=1",
                 "data.validation={name: shapes, split: validation, options: {num_images: 4, image_size: 32}}"]
    result = train(load_recipe("tiny", overrides), output=tmp_path / "run", quiet=True)
    assert set(result.validation["stage1"]) >= {"retrieval/i2t_r1", "retrieval/t2i_r5"}
    assert set(result.validation["stage2"]) >= {"caption/CIDEr", "caption/shapes_accuracy", "vqa/accuracy"}
    rows = [r for r in _metrics(tmp_path / "run") if "split" in r]
    assert [(r["stage"], r["split"]) for r in rows] == [("stage1", "validation"), ("stage2", "validation")]
    for stage, task in (("stage1", "retrieval"), ("stage2", "caption"), ("stage2", "vqa")):
        assert (tmp_path / "run" / "eval-validation" / stage / f"{task}_scores.json").is_file()


def test_encoder_decoder_llm_trains(tmp_path: Path) -> None:
    recipe = load_recipe("tiny", ["~stage1", "stage2.steps=2", "llm=tiny-t5"])
    train(recipe, output=tmp_path / "run", quiet=True)
    model = blipkit.load(tmp_path / "run")
    assert model.llm.is_encoder_decoder
    answers = model.ask([Image.new("RGB", (32, 32), (0, 200, 0))], ["what color is the circle?"], num_beams=1)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_gradient_checkpointing_gives_the_same_loss(tmp_path: Path) -> None:
    base = ["~stage1", "stage2.steps=2", "log_every=1"]
    train(load_recipe("tiny", base), output=tmp_path / "plain", quiet=True)
    train(load_recipe("tiny", [*base, "gradient_checkpointing=true"]), output=tmp_path / "ckpt", quiet=True)
    plain, ckpt = _metrics(tmp_path / "plain"), _metrics(tmp_path / "ckpt")
    assert [r["loss"] for r in ckpt] == pytest.approx([r["loss"] for r in plain], rel=1e-4)


def test_a_run_saved_with_the_stage_shorthand_resumes_and_loads(tmp_path: Path) -> None:
    """Runs written before recipes listed their stages hold ``stage1``/``stage2`` in blipkit.json: they
    resume (to the weights of an uninterrupted run) and load."""
    recipe = load_recipe("tiny")
    whole = tmp_path / "whole"
    train(recipe, output=whole, quiet=True)
    parts = tmp_path / "parts"
    train(recipe, output=parts, stop_after=5, quiet=True)
    meta = json.loads((parts / "blipkit.json").read_text())
    saved = meta["recipe"]
    for stage in saved.pop("stages"):
        name = stage.pop("name")
        for key in ("objective", "options"):
            stage.pop(key)
        saved[name] = stage
    (parts / "blipkit.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(cli, ["train", "--resume", str(parts), "-q"])
    assert result.exit_code == 0, result.output + str(result.exception)
    expected, got = _weights(whole), _weights(parts)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert [s.name for s in blipkit.load(parts).recipe.stages] == ["stage1", "stage2"]


def test_stages_list_their_objectives(tmp_path: Path) -> None:
    """A recipe may list its stages; each names its objective, and the run trains them in order."""
    listed = ["~stage1", "~stage2", "stages=[{objective: lm, name: captions, steps: 2, tasks: [caption]},"
              " {objective: lm, name: answers, steps: 1, tasks: [vqa], lr: 1.0e-3}]"]
    result = train(load_recipe("tiny", listed), output=tmp_path / "run", quiet=True)
    assert list(result.final) == ["captions", "answers"]
    assert [(r["stage"], r["step"]) for r in _metrics(tmp_path / "run")] == [("captions", 1), ("captions", 2), ("answers", 1)]
    with pytest.raises(ConfigError, match=r"^stages\.0\.objective: name the objective"):
        load_recipe("tiny", ["~stage1", "~stage2", "stages=[{steps: 2}]"])
    with pytest.raises(ConfigError, match="not both"):
        load_recipe("tiny", ["stages=[{objective: lm}]"])
    with pytest.raises(ConfigError, match=r"^captions\.tasks: objective 'lm' trains on caption, vqa, not ocr"):
        load_recipe("tiny", ["~stage1", "~stage2", "stages=[{objective: lm, name: captions, tasks: [ocr]}]"])


def _tiny_coco(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(8):
        Image.new("RGB", (32, 32), (30 * i, 200 - 20 * i, 90)).save(folder / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png"})
        annotations += [{"image_id": i, "caption": f"a colour number {i}"}, {"image_id": i, "caption": f"shade {i}"}]
    path = folder / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_parts_not_the_demos_build_on_blip2_and_data_replaces_its_options(tmp_path: Path) -> None:
    """`blipkit train --encoder X --llm Y --data Z` with no recipe plans BLIP-2's recipe (32 queries, frozen
    LLM), not the shapes demo's; --data replaces the dataset with its options (the demo's shapes options
    would not fit coco:)."""
    from blipkit.config import recipe_with_parts

    captions = _tiny_coco(tmp_path / "coco")
    parts = {"encoder": "tiny-vit", "llm": "tiny-llama", "data": str(captions)}
    recipe = recipe_with_parts(None, parts)
    assert recipe.name == "blip2" and recipe.bridge.options["num_queries"] == 32 and recipe.llm.lora is None
    assert recipe.encoder.options == {} and recipe.data.train.options == {} and recipe.data.train.name == str(captions)
    assert recipe_with_parts(None, {"encoder": "efficientnet-lite0"}).name == "default"
    assert recipe_with_parts("tiny", {"data": str(captions)}).data.train.options == {}
    small = ["bridge.options={init: random, num_layers: 2, hidden_size: 32, num_heads: 4, intermediate_size: 64}",
             "stage1.steps=1", "stage2.steps=1", "stage1.warmup_steps=0", "stage2.warmup_steps=0", "data.batch_size=4",
             "data.num_workers=0"]
    result = CliRunner().invoke(cli, ["train", "--encoder", "tiny-vit", "--llm", "tiny-llama", "--data", str(captions), *small,
                                      "-o", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 0, result.output + str(result.exception)
    plan = result.stderr.splitlines()
    assert plan[0] == f"Plan: recipe 'blip2' -> {tmp_path / 'run'} on 1 process"
    assert f"{captions} (train): 16 samples; feature cache on" in plan[1]
    assert "encoder tiny-vit, bridge qformer, projection linear, llm tiny-llama" in plan[2]
    assert any(line.startswith("  stage1     blip2-stage1: 1 steps x global batch 4 = 4 samples") for line in plan)
    assert any(line.startswith("stage2: trains bridge") and "frozen encoder" in line and "llm" in line for line in plan)
    missing = CliRunner().invoke(cli, ["train", "tiny", "--data", "coco:nowhere.json", "-o", str(tmp_path / "bad")])
    assert missing.exit_code != 0 and "num_images" not in missing.stderr
