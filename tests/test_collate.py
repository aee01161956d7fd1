"""Collation, token by token: prefix/prompt masking, EOS, prefix-LM split, VQA answer-only loss."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from blipkit.data.collate import Collator, LanguageModelText, stable_id
from blipkit.data.sample import Sample
from blipkit.plugin_manager import registries


def _samples() -> list[Sample | None]:
    image = Image.new("RGB", (32, 32), (255, 0, 0))
    return [
        Sample(image, "a red circle", image_id="img-1"),
        None,
        Sample(image, "red", question="what color is the circle?", answers=["red"], image_id="img-1", task="vqa"),
    ]


def _preprocess(image: Image.Image) -> torch.Tensor:
    return torch.zeros(3, 32, 32)


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids if int(i) != -100])


def test_decoder_only_labels_cover_target_and_eos_only() -> None:
    llm = registries().llms.create("tiny-llama")
    tok = llm.tokenizer
    collate = Collator(_preprocess, LanguageModelText(llm.tokenize, vqa_prompt="Question: {} Answer:".format))
    batch = collate(_samples())
    assert batch["dropped"] == 1 and batch["size"] == 2
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    lm = batch["lm"]
    caption_labels, vqa_labels = lm.labels
    assert _decode(tok, caption_labels) == "a red circle" + tok.eos_token or _decode(tok, caption_labels).replace(" ", "") == ("aredcircle" + tok.eos_token)
    assert int(caption_labels[lm.attention_mask[0].bool()][-1]) == tok.eos_token_id
    assert int(lm.input_ids[0][0]) == tok.bos_token_id and int(caption_labels[0]) == -100
    kept = [int(i) for i in vqa_labels if int(i) != -100]
    assert kept == tok("red", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompt_ids = tok("Question: what color is the circle? Answer:")["input_ids"]
    assert [int(i) for i in lm.input_ids[1][: len(prompt_ids)]] == prompt_ids
    assert all(int(i) == -100 for i in vqa_labels[: len(prompt_ids)])
    assert (lm.labels[lm.attention_mask == 0] == -100).all()


def test_vqa_loss_ignores_the_question() -> None:
    """The loss is the cross-entropy over the answer (and EOS) positions alone, recomputed in float64."""
    llm = registries().llms.create("tiny-llama")
    collate = Collator(_preprocess, LanguageModelText(llm.tokenize))
    batch = collate([_samples()[2]])["lm"]
    prefix = torch.randn(1, 3, llm.hidden_size)
    loss = llm.loss(prefix, batch)
    answer = llm.tokenizer("red", add_special_tokens=False)["input_ids"] + [llm.tokenizer.eos_token_id]
    assert [int(i) for i in batch.labels[0] if int(i) != -100] == answer
    with torch.no_grad():
        logits = llm.model(inputs_embeds=torch.cat([prefix, llm.embed(batch.input_ids)], 1)).logits[0].double()
    targets = torch.cat([torch.full((3,), -100), batch.labels[0]])
    answer_positions = (targets[1:] != -100).nonzero().flatten()
    expected = torch.nn.functional.cross_entropy(logits[answer_positions], targets[1:][answer_positions])
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_encoder_decoder_prefix_lm_split() -> None:
    llm = registries().llms.create("tiny-t5")
    tok = llm.tokenizer
    collate = Collator(_preprocess, LanguageModelText(llm.tokenize, vqa_prompt="Question: {} Short answer:".format,
                                                      prefix_lm=True))
    caption = Sample(Image.new("RGB", (8, 8)), "a big red circle left of a blue square", image_id="x")
    seen_splits = set()
    for _ in range(8):
        lm = collate([caption])["lm"]
        encoder_text = _decode(tok, lm.input_ids[0][lm.attention_mask[0].bool()]).replace(tok.eos_token, "").strip()
        target_text = _decode(tok, lm.labels[0]).replace(tok.eos_token, "").strip()
        assert f"{encoder_text} {target_text}".strip() == "a big red circle left of a blue square"
        assert target_text, "the decoder target is never empty"
        assert int(lm.labels[0][lm.labels[0] != -100][-1]) == tok.eos_token_id
        seen_splits.add(len(encoder_text.split()))
    assert len(seen_splits) > 1, "the split point is random"
    vqa = collate([_samples()[2]])["lm"]
    assert _decode(tok, vqa.labels[0]).replace(tok.eos_token, "").strip() == "red"
    prompt = _decode(tok, vqa.input_ids[0]).lower().replace(" ", "")
    assert prompt.startswith("question:whatcoloristhecircle?shortanswer:")


def test_stage1_text_is_truncated_to_max_length() -> None:
    bridge = registries().bridges.create("qformer", input_dim=16, init="random", num_queries=2, num_layers=2,
                                         hidden_size=32, num_heads=4, intermediate_size=64)
    from blipkit.plugins.bridges.qformer.pretraining import QFormerText

    collate = Collator(_preprocess, QFormerText(bridge.tokenize, max_length=8))
    long = Sample(Image.new("RGB", (8, 8)), " ".join(["red circle"] * 20), image_id="a")
    short = Sample(Image.new("RGB", (8, 8)), "a blue square", image_id="b")
    batch = collate([long, short, Sample(Image.new("RGB", (8, 8)), "a red circle", image_id="a")])
    ids = batch["bridge_text"]["input_ids"] if isinstance(batch["bridge_text"], dict) else batch["bridge_text"].input_ids
    assert ids.shape[1] == 8
    assert batch["image_keys"].tolist() == [stable_id("a"), stable_id("b"), stable_id("a")]


def test_cached_tokens_replace_pixels() -> None:
    tokens = torch.randn(5, 7)
    sample = Sample(None, "a red circle", image_id="a", image_tokens=tokens)
    llm = registries().llms.create("tiny-llama")
    batch = Collator(_preprocess, LanguageModelText(llm.tokenize))([sample, sample])
    assert "pixel_values" not in batch
    torch.testing.assert_close(batch["image_tokens"], torch.stack([tokens, tokens]))


@pytest.mark.parametrize("image_id", ["shapes/abc/224", "COCO_train2014_000000000009.jpg"])
def test_stable_id_is_deterministic(image_id: str) -> None:
    assert stable_id(image_id) == stable_id(str(image_id)) and 0 <= stable_id(image_id) < 2**60
