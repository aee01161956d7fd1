"""The Q-Former's optional image position embedding (``image_grid``): what it adds, where, and what it refuses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from blipkit.errors import ConfigError
from blipkit.model import lora
from blipkit.plugins.bridges.qformer.model import QFormer, grid_position_embedding

SIZES = dict(num_queries=4, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, max_position_embeddings=64)


def tiny(**overrides) -> QFormer:
    torch.manual_seed(0)
    return QFormer(input_dim=24, tokenizer="char", embed_dim=16, dropout=0.0, **{**SIZES, **overrides})


def test_grid_embedding_is_2d_sin_cos_in_float64():
    rows, cols, dim = 3, 5, 24
    table = grid_position_embedding(rows, cols, dim)
    quarter = dim // 4
    for r in range(rows):
        for c in range(cols):
            expected = []
            for position in (r, c):
                angles = [position / 10000 ** (k / quarter) for k in range(quarter)]
                expected += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
            row = r * cols + c
            assert torch.allclose(table[row].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)


def test_keys_and_values_read_ln_vision_plus_position_recomputed_in_float64():
    model = tiny(image_grid=[2, 3]).double()
    with torch.no_grad():
        model.ln_vision.weight.uniform_(0.5, 1.5)
        model.ln_vision.bias.normal_()
        model.image_position.add_(torch.randn_like(model.image_position))
    for num_tokens, prefix in ((6, 0), (7, 1)):
        tokens = torch.randn(2, num_tokens, 24, dtype=torch.float64)
        states = model.ln_vision(tokens)
        states[:, prefix:] += model.image_position
        _, kv = model.project_image(tokens)
        for index in model.cross_attention_layers:
            attention = model.layers[index].cross_attn
            for projection, got in zip((attention.key, attention.value), kv[index]):
                expected = projection(states).view(2, num_tokens, SIZES["num_heads"], -1).transpose(1, 2)
                assert torch.allclose(got, expected, atol=1e-12)


def test_position_breaks_the_permutation_invariance_over_image_tokens():
    tokens = torch.randn(2, 6, 24)
    order = torch.tensor([5, 4, 3, 2, 1, 0])
    plain, placed = tiny().eval(), tiny(image_grid=[2, 3]).eval()
    with torch.no_grad():
        for model in (plain, placed):
            # Trained-scale weights: at BERT's N(0, 0.02) init every query attends almost uniformly.
            for index in model.cross_attention_layers:
                for projection in (model.layers[index].cross_attn.query, model.layers[index].cross_attn.key):
                    projection.weight.normal_(std=0.5)
        assert torch.allclose(plain(tokens).queries, plain(tokens[:, order]).queries, atol=1e-5)
        assert not torch.allclose(placed(tokens).queries, placed(tokens[:, order]).queries, atol=1e-3)


def test_position_embedding_trains_and_round_trips(tmp_path: Path):
    model = tiny(image_grid=[2, 3])
    model(torch.randn(2, 6, 24)).queries.square().mean().backward()
    assert model.image_position.grad is not None and model.image_position.grad.abs().sum() > 0
    with torch.no_grad():
        model.image_position.mul_(3.0)
    model.save_pretrained(tmp_path)
    loaded = QFormer.from_pretrained(tmp_path).eval()
    tokens = torch.randn(3, 6, 24)
    with torch.no_grad():
        assert torch.equal(loaded.image_position, model.image_position)
        assert torch.allclose(loaded(tokens).queries, model.eval()(tokens).queries, atol=1e-6)


@pytest.mark.parametrize("grid", [[7], "7x7", [0, 7]])
def test_bad_grids_are_refused_at_build(grid):
    with pytest.raises(ConfigError, match="image_grid"):
        tiny(image_grid=grid)


def test_encoder_token_count_must_match_the_grid():
    model = tiny(image_grid=[2, 3])
    with pytest.raises(ConfigError, match=r"\[2, 3\] \(6 patch tokens\) but the encoder gives 8 tokens"):
        model(torch.randn(1, 8, 24))


def test_no_blip2_layout_with_a_position_embedding():
    assert tiny().export_state("transformers-blip2") is not None
    assert tiny(image_grid=[2, 3]).export_state("transformers-blip2") is None


def test_position_embedding_keeps_training_under_bridge_lora():
    model = tiny(image_grid=[2, 3])
    lora.apply_bridge_lora(model, lora.LoraSettings(r=2))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "image_position" in trainable and "query_tokens" in trainable
    assert all("lora_" in name or name in ("image_position", "query_tokens") or name.startswith("ln_vision.") for name in trainable)
