"""blipkit export: transformers' Blip2ForConditionalGeneration directories that generate what blipkit does,
and blipkit's own self-contained directories with a model card, written atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from test_blip2_checkpoint import NUM_QUERIES, _images, _randomised, _save_blip2, _spy_generate

import blipkit
from blipkit.cli import cli
from blipkit.config import apply_overrides, load_recipe, recipe_from_dict, recipe_to_dict
from blipkit.model.export import export_model
from blipkit.model.persistence import run_recipe
from blipkit.plugins.llms.tiny import build_tokenizer
from blipkit.train.runner import train

QUESTION = "Question: what colour is the shape? Answer:"
GREEDY = {"max_new_tokens": 6, "num_beams": 1, "do_sample": False}


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def _save_blip2_llama_without_image_token(folder: Path) -> None:
    """A tiny Blip2 with an untied Llama whose tokenizer and vocabulary have no ``<image>`` token."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig, LlamaConfig

    tokenizer = build_tokenizer(add_bos=True)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    vision = Blip2VisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
    )
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    config = Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=NUM_QUERIES,
    )
    torch.manual_seed(3)
    model = Blip2ForConditionalGeneration(config)
    _randomised(model, 0.1)
    _randomised(model.language_model, 0.4)
    _randomised(model.language_projection, 1.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny OPT Blip2, imported, then fine-tuned by blipkit (stage 2, two steps), exported with the CLI."""
    root = tmp_path_factory.mktemp("finetuned")
    _save_blip2(root / "blip2", "opt", seed=7)
    blipkit.load(root / "blip2").save(root / "import")
    data = apply_overrides(recipe_to_dict(run_recipe(root / "import")), [
        f"bridge.pretrained={root / 'import'}", f"projection.pretrained={root / 'import'}", "stages.0.steps=2",
        "stages.0.warmup_steps=0", "stages.0.lr=1e-2", "data.batch_size=4", "data.train.name=shapes",
        "data.train.options={num_images: 8, image_size: 32}",
    ])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BLIPKIT_CACHE", str(root / "cache"))
        train(recipe_from_dict(data), output=root / "run", quiet=True)
        result = invoke("export", str(root / "run"), str(root / "hf"), "--to", "transformers")
    assert result.exit_code == 0, result.output
    return {"source": root / "blip2", "run": root / "run", "export": root / "hf"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BLIPKIT_CACHE", str(root / "cache"))
        train(load_recipe("tiny", ["stage1.steps=2", "stage2.steps=2"]), output=root / "run", quiet=True)
    return root / "run"


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))


def _transformers_ids(directory: Path, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ids of the exported directory through transformers alone, and the processor's pixels."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model, info = Blip2ForConditionalGeneration.from_pretrained(directory, output_loading_info=True)
    assert not any(info.values()), info  # every tensor in its place, none missing or left over
    processor = Blip2Processor.from_pretrained(directory)
    inputs = processor(images=_images(2), text=[prompt] * 2, return_tensors="pt")
    with torch.no_grad():
        return model.eval().generate(**inputs, **GREEDY), inputs["pixel_values"]


def _assert_same_greedy_ids(model: Any, directory: Path, prompt: str) -> None:
    expected, pixels = _transformers_ids(directory, prompt)
    calls = _spy_generate(model)
    model.generate(pixels, [prompt] * 2, **GREEDY)
    (ours,) = calls
    if not model.llm.is_encoder_decoder:  # decoder-only generate returns the prompt's ids first
        expected = expected[:, expected.shape[1] - ours.shape[1] :]
    assert torch.equal(ours, expected)
    assert not torch.equal(ours[0], ours[1])  # the images steer the text


@pytest.mark.parametrize("prompt", ["", QUESTION])
def test_finetuned_run_generates_the_same_greedy_ids_in_transformers(finetuned: dict[str, Path], prompt: str) -> None:
    _assert_same_greedy_ids(blipkit.load(finetuned["run"]), finetuned["export"], prompt)


def test_export_holds_the_trained_weights_and_what_servers_read(finetuned: dict[str, Path]) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    exported = load_file(str(finetuned["export"] / "model.safetensors"))
    source = load_file(str(finetuned["source"] / "model.safetensors"))
    run = blipkit.load(finetuned["run"])
    assert torch.equal(exported["query_tokens"], run.bridge.query_tokens.detach())
    assert not torch.equal(exported["query_tokens"], source["query_tokens"])  # fine-tuned, not the import
    assert torch.equal(exported["language_projection.weight"], run.projection.proj.weight.detach())
    assert torch.equal(exported["vision_model.post_layernorm.weight"], run.bridge.ln_vision.weight.detach())
    frozen = [k for k in source if k.startswith(("vision_model.encoder.", "language_model."))]
    assert frozen and all(torch.equal(exported[k], source[k]) for k in frozen)
    assert not any(".intermediate." in k or k.startswith("embeddings.") for k in exported)

    config = json.loads((finetuned["export"] / "config.json").read_text())
    processor = json.loads((finetuned["export"] / "processor_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(finetuned["export"])
    assert config["architectures"] == ["Blip2ForConditionalGeneration"]
    assert config["num_query_tokens"] == processor["num_query_tokens"] == NUM_QUERIES
    assert config["image_token_index"] == tokenizer.get_vocab()["<image>"]
    card = (finetuned["export"] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "Blip2ForConditionalGeneration.from_pretrained" in card


def test_round_trip_export_then_blipkit_load(finetuned: dict[str, Path]) -> None:
    images = _images(2)
    settings = {"num_beams": 2, "max_new_tokens": 5}
    assert blipkit.load(finetuned["export"]).caption(images, **settings) == blipkit.load(finetuned["run"]).caption(
        images, **settings
    )


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_t5_and_a_vocabulary_without_image_token(family: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    source = tmp_path / "blip2"
    if family == "t5":
        _save_blip2(source, "t5", seed=5)
    else:
        _save_blip2_llama_without_image_token(source)
    result = export_model(source, tmp_path / "hf", to="transformers")
    assert (result.format, result.fallback) == ("transformers", None)
    _assert_same_greedy_ids(blipkit.load(source), tmp_path / "hf", QUESTION)
    if family == "llama":  # <image> is added after the last token, with zero rows in both matrices
        config = json.loads((tmp_path / "hf" / "config.json").read_text())
        weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
        rows = len(build_tokenizer())
        assert config["image_token_index"] == config["text_config"]["vocab_size"] - 1 == rows
        for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            assert weights[key].shape[0] == rows + 1 and not weights[key][rows].any()


def test_other_parts_fall_back_to_a_self_contained_blipkit_directory(tiny_run: Path, tmp_path: Path) -> None:
    run = shutil.copytree(tiny_run, tmp_path / "run")
    images = _images(2)
    expected = blipkit.load(run).caption(images)
    result = invoke("export", str(run), str(tmp_path / "out"), "--to", "transformers")
    assert result.exit_code == 0, result.output
    note = result.stderr.strip().splitlines()
    assert len(note) == 1 and "transformers format cannot hold this model" in note[0]
    assert "encoder 'tiny-vit' is not a BLIP-2 vision tower" in note[0]
    shutil.rmtree(run)
    assert blipkit.load(tmp_path / "out").caption(images) == expected

    card = (tmp_path / "out" / "README.md").read_text()
    last = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()][-1]
    for text in ("library_name: blipkit", "## Parts", "`tiny-vit`", "`tiny-llama`", "Recipe `tiny`", "`shapes`",
                 f"loss {last['loss']:.4g}", "blipkit.load(", "blipkit caption", "## Licenses"):
        assert text in card, text


def test_existing_directory_is_refused_unless_overwrite(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused = invoke("export", str(tiny_run), str(out))
    assert refused.exit_code == 1 and refused.stderr.count("\n") == 1 and "--overwrite" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    replaced = invoke("export", str(tiny_run), str(out), "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "keep.txt").exists() and (out / "blipkit.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == ["out"]  # no temporary directory left


def test_a_failing_export_leaves_nothing(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from blipkit.model import vlm

    def broken(self: Any, path: Any) -> None:
        (Path(path) / "blipkit.json").write_text("{")
        raise OSError("disk full")

    monkeypatch.setattr(vlm.VisionLanguageModel, "save", broken)
    with pytest.raises(OSError):
        export_model(tiny_run, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []


def test_push_to_hub_offline_is_one_line_and_writes_nothing(tiny_run: Path, tmp_path: Path) -> None:
    result = invoke("export", str(tiny_run), str(tmp_path / "out"), "--push-to-hub", "someone/tiny")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "offline" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_push_without_a_reachable_hub_keeps_the_complete_export(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    result = invoke("export", str(tiny_run), str(tmp_path / "out"), "--push-to-hub", "someone/tiny")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "could not push" in result.stderr and "hf upload someone/tiny" in result.stderr
    assert (tmp_path / "out" / "README.md").exists() and (tmp_path / "out" / "blipkit.json").exists()


def test_unknown_format_lists_the_formats(tiny_run: Path, tmp_path: Path) -> None:
    result = invoke("export", str(tiny_run), str(tmp_path / "out"), "--to", "onnx")
    assert result.exit_code == 2 and "blipkit, " in result.stderr and "transformers" in result.stderr
    assert not (tmp_path / "out").exists()
