"""transformers InstructBLIP checkpoints load as blipkit models that compute what transformers computes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import blipkit
from blipkit.plugins.checkpoints import instructblip as instructblip_plugin
from blipkit.plugins.llms.tiny import build_tokenizer
from test_blip2_checkpoint import _images, _randomised, _spy_generate

NUM_QUERIES = 4
IMAGE_SIZE = 32
PROMPT = "Question: what colour is the shape? Short answer:"
PROMPTS = ["A short image caption:", "Question: is there a red circle on the left? Short answer:"]


def _qformer_tokenizer() -> Any:
    """A tiny BERT tokenizer saved as InstructBLIP's processors save theirs: [DEC] as bos, cut from the left."""
    from transformers import BertTokenizer

    from blipkit.plugins.bridges.qformer.init import build_tokenizer as bert_tokenizer

    tokenizer = BertTokenizer(vocab=dict(bert_tokenizer("char").get_vocab()), truncation_side="left")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def _text_config(family: str, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, T5Config

    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "llama":
        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id, **special,
        )
    return T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="relu", decoder_start_token_id=tokenizer.pad_token_id, **special,
    )


def _save_instructblip(folder: Path, family: str, seed: int) -> Any:
    """A tiny random InstructBlipForConditionalGeneration (Llama or T5) saved with its processor into ``folder``."""
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )

    tokenizer = build_tokenizer(add_bos=family == "llama", add_eos=family == "t5")
    qformer_tokenizer = _qformer_tokenizer()
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = InstructBlipProcessor(
        image_processor=image_processor, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=NUM_QUERIES,
    )
    vision = InstructBlipVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=8, layer_norm_eps=1e-6,
    )
    qformer = InstructBlipQFormerConfig(
        vocab_size=len(qformer_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=160, pad_token_id=qformer_tokenizer.pad_token_id,
    )
    config = InstructBlipConfig(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
        text_config=_text_config(family, tokenizer).to_dict(), num_query_tokens=NUM_QUERIES,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config)
    _randomised(model, 0.1)
    _randomised(model.qformer, 0.2)
    _randomised(model.language_model, 0.4)
    _randomised(model.language_projection, 0.5)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


@pytest.fixture(scope="module", params=["llama", "t5"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp(f"instructblip-{request.param}")
    model, processor = _save_instructblip(folder, request.param, seed=5)
    return {"family": request.param, "dir": folder, "model": model, "processor": processor,
            "loaded": blipkit.load(folder)}


@pytest.mark.parametrize("prompts", [PROMPTS, [""] * 2], ids=["instructions", "empty"])
def test_greedy_generation_equals_transformers(checkpoint: dict[str, Any], prompts: list[str]) -> None:
    reference, processor, model = checkpoint["model"], checkpoint["processor"], checkpoint["loaded"]
    processor.tokenizer.padding_side = "left"  # prompts of different lengths: decoder-only models need it
    inputs = processor(images=_images(2), text=prompts, padding="longest", return_tensors="pt")
    greedy = {"max_new_tokens": 8, "num_beams": 1, "do_sample": False}
    with torch.no_grad():
        expected = reference.generate(**inputs, **greedy)
    calls = _spy_generate(model)
    texts = model.generate(inputs["pixel_values"], prompts, **greedy)
    (ours,) = calls
    if checkpoint["family"] == "llama":  # decoder-only generate returns the input ids first
        expected = expected[:, expected.shape[1] - ours.shape[1] :]
    assert torch.equal(ours, expected)
    assert texts == model.llm._decode(expected[:, 1:] if checkpoint["family"] == "t5" else expected)


def test_the_instruction_steers_the_queries(checkpoint: dict[str, Any]) -> None:
    model = checkpoint["loaded"]
    tokens = model.image_tokens(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)).expand(2, -1, -1)
    objective = model.inference_objective()
    with torch.no_grad():
        prefix = objective.prefix(model, tokens, PROMPTS)
        plain = model.prefix(tokens)[0]
    assert (prefix[0] - prefix[1]).abs().max() > 1e-3
    assert (prefix[0] - plain[0]).abs().max() > 1e-3


def test_logits_equal_transformers(checkpoint: dict[str, Any]) -> None:
    reference, processor, model = checkpoint["model"], checkpoint["processor"], checkpoint["loaded"]
    llm = model.llm
    image_token = reference.config.image_token_index
    query_ids = torch.full((2, NUM_QUERIES), image_token)
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    qformer = processor(text=PROMPTS, padding="longest", return_tensors="pt")
    batch = llm.tokenize(PROMPTS, ["a red circle", "yes"])
    captured: list[torch.Tensor] = []
    handle = llm.model.register_forward_hook(lambda module, args, out: captured.append(out.logits))
    with torch.no_grad():
        prefix, _ = model.prefix(model.image_tokens(pixels), instructions=PROMPTS)
        loss = llm.loss(prefix, batch)
        handle.remove()
        common = {
            "pixel_values": pixels,
            "qformer_input_ids": qformer["qformer_input_ids"],
            "qformer_attention_mask": qformer["qformer_attention_mask"],
            "input_ids": torch.cat([query_ids, batch.input_ids], dim=1),
            "attention_mask": torch.cat([torch.ones_like(query_ids), batch.attention_mask], dim=1),
        }
        if llm.is_encoder_decoder:
            out = reference(**common, labels=batch.labels, decoder_attention_mask=batch.decoder_attention_mask)
        else:
            out = reference(**common, labels=torch.cat([torch.full_like(query_ids, -100), batch.labels], dim=1))
        features = reference.get_image_features(
            pixel_values=pixels, qformer_input_ids=common["qformer_input_ids"],
            qformer_attention_mask=common["qformer_attention_mask"],
        ).pooler_output
    assert (prefix - features).abs().max() < 1e-5
    (logits,) = captured
    expected = out.logits
    if not llm.is_encoder_decoder:
        labels = torch.cat([torch.full_like(query_ids, -100), batch.labels], dim=1)
        keep = (labels[:, 1:] != -100).any(dim=0).nonzero().squeeze(1)
        expected = expected[:, keep]
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max() < 1e-4
    assert abs(loss.item() - out.loss.item()) < 1e-5


def test_save_and_reload_keeps_the_instruction_path(checkpoint: dict[str, Any], tmp_path: Path) -> None:
    model = checkpoint["loaded"]
    assert model.recipe.stages[-1].objective == "instructblip"
    assert (model.recipe.bridge.name, model.recipe.projection.name) == ("qformer", "linear")
    assert model.vqa_prompt("{}") == "Question: {} Short answer:"
    images = _images(2)
    short = {"num_beams": 2, "max_new_tokens": 6}
    answers = model.ask(images, ["what colour is it?", "is it round?"], **short)
    captions = model.caption(images, **short)
    model.save(tmp_path / "run")
    reloaded = blipkit.load(tmp_path / "run")
    assert reloaded.inference_objective().__class__.__name__ == "InstructionTuning"
    assert reloaded.ask(images, ["what colour is it?", "is it round?"], **short) == answers
    assert reloaded.caption(images, **short) == captions


def test_other_directories_are_not_claimed(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "blip-2"}')
    assert instructblip_plugin.load_model(str(tmp_path)) is None
    assert instructblip_plugin.load_model("someone/some-text-model") is None
