"""transformers BLIP-2 checkpoints load as blipkit models that compute what transformers computes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import blipkit
from blipkit.errors import BlipkitError, ModelUnavailableError
from blipkit.plugin_manager import registries
from blipkit.plugins.checkpoints import blip2 as blip2_plugin
from blipkit.plugins.llms.tiny import build_tokenizer

NUM_QUERIES = 4
IMAGE_SIZE = 32
PROMPT = "Question: what colour is the shape? Answer:"


def _randomised(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Spread the weights so that tiny random models give varied, well-separated outputs."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * scale)
    return model.eval()


def _save_blip2(folder: Path, family: str, seed: int) -> Any:
    """A tiny random Blip2ForConditionalGeneration (OPT or T5) saved with its processor into ``folder``."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
        T5Config,
    )

    tokenizer = build_tokenizer(add_bos=family == "opt", add_eos=family == "t5")
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=NUM_QUERIES)
    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "opt":
        text = OPTConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
            word_embed_proj_dim=32, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id, **special,
        )
    else:
        text = T5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
            feed_forward_proj="relu", decoder_start_token_id=tokenizer.pad_token_id, **special,
        )
    vision = Blip2VisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=8, layer_norm_eps=1e-6,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=NUM_QUERIES, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    _randomised(model, 0.1)
    _randomised(model.language_model, 0.4)
    _randomised(model.language_projection, 1.0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


@pytest.fixture(scope="module", params=["opt", "t5"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp(f"blip2-{request.param}")
    model, processor = _save_blip2(folder, request.param, seed=7)
    return {"family": request.param, "dir": folder, "model": model, "processor": processor}


def _images(count: int) -> list[Image.Image]:
    """Noise images of different sizes, each darker than the next, so that they give different prefixes."""
    rng = np.random.default_rng(11)
    return [
        Image.fromarray(rng.integers(96 * i, 96 * i + 64, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(count)
    ]


def _spy_generate(model: Any) -> list[torch.Tensor]:
    """Record the token ids that blipkit's language-model wrapper gets back from transformers' generate."""
    calls: list[torch.Tensor] = []
    original = model.llm._run_generate

    def run(**inputs: Any) -> torch.Tensor:
        calls.append(original(**inputs))
        return calls[-1]

    model.llm._run_generate = run
    return calls


@pytest.mark.parametrize("prompt", ["", PROMPT])
def test_greedy_generation_equals_transformers(checkpoint: dict[str, Any], prompt: str) -> None:
    reference, processor = checkpoint["model"], checkpoint["processor"]
    model = blipkit.load(checkpoint["dir"])
    images = _images(2)
    inputs = processor(images=images, text=[prompt] * 2, return_tensors="pt")
    pixels = inputs["pixel_values"]
    greedy = {"max_new_tokens": 8, "num_beams": 1, "do_sample": False}
    with torch.no_grad():
        if checkpoint["family"] == "opt" and not prompt:
            expected = reference.generate(pixel_values=pixels, **greedy)  # transformers' own caption layout
        else:
            expected = reference.generate(**inputs, **greedy)
    calls = _spy_generate(model)
    texts = model.generate(pixels, [prompt] * 2, **greedy)
    (ours,) = calls
    if checkpoint["family"] == "opt":  # decoder-only generate returns the input ids first
        expected = expected[:, expected.shape[1] - ours.shape[1] :]
    assert torch.equal(ours, expected)
    assert not torch.equal(ours[0], ours[1])  # the images steer the text
    assert texts == model.llm._decode(expected[:, 1:] if checkpoint["family"] == "t5" else expected)


def test_prompt_layout_and_logits_equal_transformers(checkpoint: dict[str, Any]) -> None:
    reference, processor = checkpoint["model"], checkpoint["processor"]
    model = blipkit.load(checkpoint["dir"])
    llm = model.llm
    image_token = reference.config.image_token_index
    query_ids = torch.full((2, NUM_QUERIES), image_token)
    prompt_ids = processor(images=_images(2), text=[PROMPT] * 2, return_tensors="pt")["input_ids"]
    ours = llm._encoder_ids(PROMPT) if llm.is_encoder_decoder else llm._prompt_ids(PROMPT)
    assert prompt_ids[0].tolist() == [image_token] * NUM_QUERIES + ours

    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    batch = llm.tokenize([PROMPT] * 2, ["a red circle", "two blue squares on the left"])
    captured: list[torch.Tensor] = []
    handle = llm.model.register_forward_hook(lambda module, args, out: captured.append(out.logits))
    with torch.no_grad():
        prefix, _ = model.prefix(model.image_tokens(pixels))
        loss = llm.loss(prefix, batch)
        handle.remove()
        if llm.is_encoder_decoder:
            out = reference(
                pixel_values=pixels,
                input_ids=torch.cat([query_ids, batch.input_ids], dim=1),
                attention_mask=torch.cat([torch.ones_like(query_ids), batch.attention_mask], dim=1),
                labels=batch.labels,
                decoder_attention_mask=batch.decoder_attention_mask,
            )
        else:
            out = reference(
                pixel_values=pixels,
                input_ids=torch.cat([query_ids, batch.input_ids], dim=1),
                attention_mask=torch.cat([torch.ones_like(query_ids), batch.attention_mask], dim=1),
                labels=torch.cat([torch.full_like(query_ids, -100), batch.labels], dim=1),
            )
        features = reference.get_image_features(pixel_values=pixels).pooler_output
    assert (prefix - features).abs().max() < 1e-5
    (logits,) = captured
    expected = out.logits
    if not llm.is_encoder_decoder:
        # The decoder-only loss runs the vocabulary head only at positions that predict a label.
        labels = torch.cat([torch.full_like(query_ids, -100), batch.labels], dim=1)
        keep = (labels[:, 1:] != -100).any(dim=0).nonzero().squeeze(1)
        assert len(keep) < expected.shape[1]
        expected = expected[:, keep]
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max() < 1e-4
    assert abs(loss.item() - out.loss.item()) < 1e-5


def test_encoder_is_last_block_without_post_layernorm(checkpoint: dict[str, Any]) -> None:
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    reference = checkpoint["model"]
    model = blipkit.load(checkpoint["dir"])
    encoder = model.encoder
    assert (encoder.num_tokens, encoder.num_prefix_tokens, encoder.patch_grid) == (17, 1, (4, 4))
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    seen: dict[str, torch.Tensor] = {}
    norm = reference.vision_model.post_layernorm
    handle = norm.register_forward_pre_hook(lambda module, args: seen.setdefault("tokens", args[0]))
    with torch.no_grad():
        reference.vision_model(pixel_values=pixels)
        tokens = encoder(pixels)
    handle.remove()
    assert (tokens - seen["tokens"]).abs().max() < 1e-5
    assert torch.equal(model.bridge.ln_vision.weight, norm.weight)
    assert torch.equal(model.bridge.ln_vision.bias, norm.bias)
    assert model.bridge.ln_vision.eps == norm.eps
    projection = reference.language_projection
    assert torch.equal(model.projection.proj.weight, projection.weight)

    by_name = registries().encoders.create(f"hf:{checkpoint['dir']}")
    assert by_name.cache_key == encoder.cache_key
    with torch.no_grad():
        assert torch.equal(by_name(pixels), tokens)
    image = _images(1)[0]
    expected = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})(image, return_tensors="pt")
    torch.testing.assert_close(encoder.preprocess(image), expected.pixel_values[0], rtol=0, atol=1e-6)


def test_hf_llm_name_loads_only_the_language_model(checkpoint: dict[str, Any]) -> None:
    reference = checkpoint["model"].language_model
    llm = registries().llms.create(f"hf:{checkpoint['dir']}")
    assert llm.is_encoder_decoder == (checkpoint["family"] == "t5")
    ours, theirs = llm.model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert registries().llms.resolve(str(checkpoint["dir"])).entry.name == "hf:"


def test_save_and_reload_gives_identical_captions(checkpoint: dict[str, Any], tmp_path: Path) -> None:
    model = blipkit.load(checkpoint["dir"])
    assert model.recipe.encoder.name == model.recipe.llm.name == f"hf:{checkpoint['dir'].resolve()}"
    assert (model.recipe.bridge.name, model.recipe.projection.name) == ("qformer", "linear")
    assert model.recipe.bridge.options["num_queries"] == NUM_QUERIES
    expected_vqa = "Question: {} Short answer:" if checkpoint["family"] == "t5" else "Question: {} Answer:"
    assert model.vqa_prompt("{}") == expected_vqa
    images = _images(2)
    short = {"num_beams": 2, "max_new_tokens": 6}
    captions = model.caption(images, **short)
    answers = model.ask(images, ["what colour is it?"] * 2, **short)
    model.save(tmp_path / "run")
    reloaded = blipkit.load(tmp_path / "run")
    assert reloaded.caption(images, **short) == captions
    assert reloaded.ask(images, ["what colour is it?"] * 2, **short) == answers
    assert all(captions) and captions[0] != captions[1]


def test_non_blip2_directory_is_not_claimed(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    assert blip2_plugin.load_model(str(tmp_path)) is None
    assert blip2_plugin.load_model("someone/some-text-model") is None
    with pytest.raises(BlipkitError) as info:
        blipkit.load(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "not a blipkit run directory" in message


def test_cached_hub_id_loads_offline(
    checkpoint: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / f"models--Salesforce--blip2-tiny-{checkpoint['family']}"
    commit = "0" * 40
    shutil.copytree(checkpoint["dir"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo_id = f"Salesforce/blip2-tiny-{checkpoint['family']}"
    from_hub = blipkit.load(repo_id)
    from_dir = blipkit.load(checkpoint["dir"])
    assert from_hub.recipe.encoder.name == from_hub.recipe.llm.name == f"hf:{repo_id}"
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        hub_prefix = from_hub.prefix(from_hub.image_tokens(pixels))[0]
        assert torch.equal(hub_prefix, from_dir.prefix(from_dir.image_tokens(pixels))[0])


def test_uncached_hub_id_gives_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelUnavailableError) as info:
        blipkit.load("Salesforce/blip2-opt-2.7b")
    message = str(info.value)
    assert "\n" not in message
    assert "Salesforce/blip2-opt-2.7b" in message and "hf download Salesforce/blip2-opt-2.7b" in message


def test_checkpoint_without_language_model_is_refused(tmp_path: Path) -> None:
    from transformers import Blip2ForImageTextRetrieval

    config = _save_blip2(tmp_path / "full", "opt", seed=1)[0].config
    Blip2ForImageTextRetrieval(config).save_pretrained(tmp_path / "itm")
    with pytest.raises(BlipkitError) as info:
        blipkit.load(tmp_path / "itm")
    assert "without a language model" in str(info.value) and "\n" not in str(info.value)
