"""The instruction-aware Q-Former computes what transformers' InstructBlipQFormerModel computes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from blipkit.plugins.bridges.qformer.keymap import map_transformers
from blipkit.plugins.bridges.qformer.model import QFormer

QUERIES, HIDDEN, IMAGE_DIM, LAYERS = 4, 32, 24, 3
INSTRUCTIONS = [
    "",
    "What colour is the square?",
    "Question: is there a red circle to the left of the blue triangle? Short answer:",
    "describe " * 150,  # longer than the 128 tokens InstructBLIP keeps
]


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def pair() -> tuple[QFormer, Any, torch.Tensor]:
    """A random blipkit Q-Former and a transformers InstructBlipQFormerModel holding the same weights."""
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

    torch.manual_seed(3)
    bridge = QFormer(
        input_dim=IMAGE_DIM, num_queries=QUERIES, num_layers=LAYERS, hidden_size=HIDDEN, num_heads=4,
        intermediate_size=64, dropout=0.0, init="random", tokenizer="char", max_position_embeddings=160,
    )
    config = InstructBlipQFormerConfig(
        vocab_size=len(bridge.tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=160, encoder_hidden_size=IMAGE_DIM,
        pad_token_id=bridge.tokenizer.pad_token_id, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    reference = _randomised(InstructBlipQFormerModel(config))
    query_tokens = torch.randn(1, QUERIES, HIDDEN)
    state = {f"qformer.{k}": v for k, v in reference.state_dict().items()}
    mapped, unused = map_transformers({**state, "query_tokens": query_tokens})
    assert unused == []
    result = bridge.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys
    assert {k.split(".")[0] for k in result.missing_keys} == {"ln_vision", "lm_head", "vision_proj", "text_proj", "itm_head", "temp"}
    _randomised(bridge.ln_vision)
    return bridge.eval(), reference, query_tokens


def test_instructed_queries_equal_instructblip_qformer(pair: tuple[QFormer, Any, torch.Tensor]) -> None:
    bridge, reference, query_tokens = pair
    batch = len(INSTRUCTIONS)
    image_tokens = torch.randn(batch, 17, IMAGE_DIM)
    tokens = bridge.tokenize_instructions(INSTRUCTIONS)
    lengths = tokens["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == batch and max(lengths) == tokens["input_ids"].shape[1] == 128
    with torch.no_grad():
        ours = bridge.instructed(image_tokens, INSTRUCTIONS).queries
        expected = reference(
            input_ids=tokens["input_ids"],
            attention_mask=torch.cat([torch.ones(batch, QUERIES, dtype=torch.long), tokens["attention_mask"]], dim=1),
            query_embeds=query_tokens.expand(batch, -1, -1),
            encoder_hidden_states=bridge.ln_vision(image_tokens),
            encoder_attention_mask=torch.ones(batch, image_tokens.shape[1], dtype=torch.long),
        ).last_hidden_state[:, :QUERIES]
        plain = bridge(image_tokens).queries
    assert ours.shape == (batch, QUERIES, HIDDEN)
    assert (ours - expected).abs().max() < 1e-5
    # The instruction reaches the queries: without it (or with another one) they differ.
    assert (ours - plain).abs().max() > 1e-2
    assert (ours[1] - bridge.instructed(image_tokens[1:2], [INSTRUCTIONS[2]]).queries[0]).abs().max() > 1e-2


def test_padding_does_not_change_a_row(pair: tuple[QFormer, Any, torch.Tensor]) -> None:
    bridge, _, _ = pair
    image_tokens = torch.randn(2, 17, IMAGE_DIM)
    with torch.no_grad():
        padded = bridge.instructed(image_tokens, INSTRUCTIONS[1:3]).queries
        alone = bridge.instructed(image_tokens[:1], INSTRUCTIONS[1:2]).queries
    assert (padded[0] - alone[0]).abs().max() < 1e-5


def test_instruction_tokens_equal_the_processor(pair: tuple[QFormer, Any, torch.Tensor]) -> None:
    """The Q-Former's tokens of an instruction are the processor's qformer_input_ids (InstructBLIP's
    tokenizer cuts from the left, at LAVIS's 128)."""
    from transformers import BertTokenizer, BlipImageProcessor, InstructBlipProcessor

    from blipkit.plugins.llms.tiny import build_tokenizer

    bridge, _, _ = pair
    qformer_tokenizer = BertTokenizer(vocab=dict(bridge.tokenizer.get_vocab()), truncation_side="left")
    qformer_tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessor(), tokenizer=build_tokenizer(), qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=QUERIES,
    )
    expected = processor(text=INSTRUCTIONS, padding="longest", truncation=True, max_length=128, return_tensors="pt")
    ours = bridge.tokenize_instructions(INSTRUCTIONS)
    assert torch.equal(ours["input_ids"], expected["qformer_input_ids"])
    assert torch.equal(ours["attention_mask"], expected["qformer_attention_mask"])
    assert bridge.tokenizer.truncation_side == "right"  # stage-1 captions still keep their start
