"""Recipes: YAML loading, overrides, schema errors that name the key, validation against registries."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from blipkit.cli import cli
from blipkit.config import apply_overrides, load_recipe, recipe_from_dict, recipe_to_dict
from blipkit.recipe_check import validate_recipe
from blipkit.errors import ConfigError
from blipkit.plugin_manager import registries

SHIPPED = ("default", "tiny", "blip2", "blip2-stage1", "blip2-stage2", "vqa-finetune")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_load_and_name_their_launch_command(name: str) -> None:
    path = Path(registries().recipes.resolve(name).entry.factory())
    header = path.read_text().splitlines()[:2]
    assert header[0].startswith("# ") and header[1].startswith(f"# Launch: blipkit train{'' if name == 'default' else ' ' + name}")
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe


def test_blip2_hyperparameters_follow_the_paper() -> None:
    recipe = load_recipe("blip2")
    assert recipe.bridge.options["num_queries"] == 32 and recipe.bridge.options["init"] == "bert-base-uncased"
    for stage, min_lr, steps in ((recipe.stage1, 1e-5, 250_000), (recipe.stage2, 5e-5, 80_000)):
        assert (stage.lr, stage.warmup_steps, stage.weight_decay, stage.grad_clip) == (1e-4, 2000, 0.05, 1.0)
        assert tuple(stage.betas) == (0.9, 0.999) and stage.min_lr == min_lr and stage.steps == steps
    assert load_recipe("blip2-stage1").stage2 is None and load_recipe("blip2-stage2").stage1 is None


def test_overrides_set_remove_and_type() -> None:
    data = {"stage1": {"steps": 5}, "data": {"train": {"name": "shapes"}}}
    out = apply_overrides(data, ["stage1.lr=3e-4", "data.train.options.num_images=12", "~stage1.steps",
                                 "stage2.tasks=[caption, vqa]", "bridge.options={init: minilm}"])
    assert out["stage1"] == {"lr": 3e-4}
    assert out["data"]["train"]["options"] == {"num_images": 12}
    assert out["stage2"]["tasks"] == ["caption", "vqa"]
    assert out["bridge"]["options"] == {"init": "minilm"}
    assert data["stage1"] == {"steps": 5}, "overrides must not change their input"
    recipe = load_recipe("tiny", ["~stage1", "stage2.lr=5e-4", "encoder=siglip", "data.train=hf:dir"])
    assert recipe.stage1 is None and recipe.stage2.lr == 5e-4
    assert recipe.encoder.name == "siglip" and recipe.encoder.options == {}
    assert recipe.data.train.name == "hf:dir" and recipe.data.train.split == "train"
    shorthand = load_recipe("tiny", ["bridge=mlp", "bridge.options={num_tokens: 8}"])
    assert shorthand.bridge.name == "mlp" and shorthand.bridge.options == {"num_tokens": 8}


def test_removing_a_listed_stage_by_index_or_name() -> None:
    data = {"stages": [{"name": "warm", "steps": 1}, {"name": "main", "steps": 2}, {"name": "tail", "steps": 3}]}
    assert apply_overrides(data, ["~stages.1"])["stages"] == [data["stages"][0], data["stages"][2]]
    assert apply_overrides(data, ["~stages.tail", "~stages.0"])["stages"] == [data["stages"][1]]
    assert len(data["stages"]) == 3, "overrides must not change their input"
    with pytest.raises(ConfigError, match="no element 'later' in a list of 3"):
        apply_overrides(data, ["~stages.later"])
    recipe = load_recipe("instructblip-tiny", ["~stages.stage1"])
    assert [stage.name for stage in recipe.stages] == ["instruct"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage1.stepz=3"], r"^stage1\.stepz: unknown key; stage1 takes: steps, lr"),
        (["data.batchsize=3"], r"^data\.batchsize: unknown key"),
        (["stage1.steps=many"], r"^stage1\.steps: expected int, got 'many'"),
        (["stage1.steps=0"], r"^stage1\.steps: must be at least 1"),
        (["precision=fp8"], r"^precision: expected one of"),
        (["~stage1", "~stage2"], r"no stage"),
        (["stage2.tasks=[ocr]"], r"^stage2\.tasks"),
        (["stage1=5"], r"^stage1: expected a mapping"),
        (["data=~"], r"^data: cannot be empty"),
        (["stage1.min_lr=1.0"], r"^stage1: need 0 <= min_lr <= lr"),
        (["nonsense"], r"expected key=value or ~key"),
    ],
)
def test_schema_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_recipe("tiny", overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["encoder.name=siglp"], r"^encoder\.name: unknown encoder 'siglp'; did you mean 'siglip'"),
        (["llm.name=tiny-lama"], r"^llm\.name: unknown llm 'tiny-lama'; did you mean 'tiny-llama'"),
        (["bridge.options.num_querys=4"], r"^bridge\.options\.num_querys: bridge 'qformer' takes no option 'num_querys'"),
        (["bridge.options.input_dim=4"], r"^bridge\.options\.input_dim: set by blipkit"),
        (["encoder.options.layr=-2"], r"^encoder\.options\.layr:"),
        (["data.train.name=missing/captions.json"], r"^data\.train\.name: .*no such file or folder: missing/captions\.json"),
        (["data.train.options.num_imagez=3"], r"^data\.train\.options\.num_imagez:"),
        (["bridge.pretrained=nowhere/run"], r"^bridge\.pretrained: nowhere/run does not exist"),
    ],
)
def test_validation_names_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_recipe(load_recipe("tiny", overrides))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_validate_without_loading_weights(name: str) -> None:
    validate_recipe(load_recipe(name, ["data.train.name=shapes"]))


def test_recipes_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    listing = runner.invoke(cli, ["recipes", "ls", "--json"])
    assert {e["name"] for e in __import__("json").loads(listing.output)} >= set(SHIPPED)
    copied = runner.invoke(cli, ["recipes", "cp", "tiny", str(tmp_path)])
    assert copied.exit_code == 0 and (tmp_path / "tiny.yaml").read_text().startswith("# Smoke run")
    again = runner.invoke(cli, ["recipes", "cp", "tiny", str(tmp_path)])
    assert again.exit_code == 2 and "exists" in again.stderr
    ok = runner.invoke(cli, ["recipes", "validate", str(tmp_path / "tiny.yaml"), "stage1.steps=2"])
    assert ok.exit_code == 0 and ok.output.strip().endswith(": ok")
    (tmp_path / "bad.yaml").write_text("stage1: {steps: 2}\nbridge: {name: qformer, options: {heads: 2}}\n")
    bad = runner.invoke(cli, ["recipes", "validate", str(tmp_path / "bad.yaml")])
    assert bad.exit_code == 2
    assert bad.stderr.strip() == "Error: bridge.options.heads: bridge 'qformer' takes no option 'heads'; it takes: " + bad.stderr.split("it takes: ")[1].strip()
    (tmp_path / "broken.yaml").write_text("stage1: [unclosed\n")
    broken = runner.invoke(cli, ["recipes", "validate", str(tmp_path / "broken.yaml")])
    assert broken.exit_code == 2 and "not valid YAML" in broken.stderr and len(broken.stderr.strip().splitlines()) == 1
    missing = runner.invoke(cli, ["train", "no-such-recipe"])
    assert missing.exit_code == 2 and "unknown recipe 'no-such-recipe'" in missing.stderr
