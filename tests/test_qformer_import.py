"""Weight import: transformers Blip2 models and LAVIS state dicts give the same numbers as transformers."""

from __future__ import annotations

import pytest
import torch

from blipkit.io import save_safetensors
from blipkit.plugins.bridges.qformer.init import _char_vocab
from blipkit.plugins.bridges.qformer.weights import from_lavis, from_transformers_blip2

VOCAB = len(_char_vocab()) + 1  # + [DEC]


def _blip2_config(vision_eps: float = 1e-6, text_input: bool = True):
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    vision = Blip2VisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8, layer_norm_eps=vision_eps,
    )
    qformer = Blip2QFormerConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, encoder_hidden_size=24, use_qformer_text_input=text_input,
    )
    text = OPTConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
        word_embed_proj_dim=16, max_position_embeddings=64,
    )
    return Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=4, image_text_hidden_size=16,
    )


def _randomised(model):
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def retrieval():
    from transformers import Blip2ForImageTextRetrieval

    torch.manual_seed(3)
    return _randomised(Blip2ForImageTextRetrieval(_blip2_config(vision_eps=1e-5)))


def _vision_tokens(model, pixels: torch.Tensor) -> torch.Tensor:
    """The vision tower's last-block tokens, before post_layernorm (LAVIS's ln_vision input)."""
    captured = {}
    handle = model.vision_model.post_layernorm.register_forward_pre_hook(
        lambda module, args: captured.setdefault("x", args[0])
    )
    with torch.no_grad():
        model.vision_model(pixel_values=pixels)
    handle.remove()
    return captured["x"]


def _reference_queries(model, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        image = model.vision_model.post_layernorm(tokens)
        return model.qformer(
            query_embeds=model.query_tokens.expand(tokens.shape[0], -1, -1),
            encoder_hidden_states=image,
            encoder_attention_mask=mask,
        ).last_hidden_state


@pytest.mark.parametrize("masked", [False, True])
def test_query_path_equals_transformers_conditional_generation(masked: bool) -> None:
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(4)
    model = _randomised(Blip2ForConditionalGeneration(_blip2_config(text_input=False)))
    bridge = from_transformers_blip2(model, tokenizer="char").eval()
    assert bridge.config["vision_norm_eps"] == 1e-6 and bridge.num_queries == 4
    tokens = torch.randn(3, 17, 24)
    mask = None
    if masked:
        mask = torch.ones(3, 17, dtype=torch.long)
        mask[0, 9:] = 0
        mask[1, :4] = 0
    with torch.no_grad():
        ours = bridge(tokens, mask).queries
    reference = _reference_queries(model, tokens, mask)
    assert (ours - reference).abs().max() < 1e-5
    # This checkpoint has no text branch: the text FFNs start as copies of the query FFNs.
    layer = bridge.layers[1]
    assert torch.equal(layer.ffn.up.weight, layer.ffn_query.up.weight)


def test_itc_and_itm_equal_transformers_retrieval(retrieval) -> None:
    bridge = from_transformers_blip2(retrieval, tokenizer="char").eval()
    torch.manual_seed(5)
    pixels = torch.randn(3, 3, 32, 32)
    tokens = bridge.tokenize(["a red circle", "two blue squares on the left", "green"])
    image_tokens = _vision_tokens(retrieval, pixels)
    with torch.no_grad():
        itm_ref = retrieval(pixel_values=pixels, use_image_text_matching_head=True, **tokens).logits_per_image
        itc_ref = retrieval(pixel_values=pixels, use_image_text_matching_head=False, **tokens).logits_per_image
        itm = bridge.itm_logits(image_tokens, tokens)
        itc = bridge.similarity(bridge.image_embeds(image_tokens), bridge.text_embeds(tokens))
        score = bridge.itm_score(image_tokens, tokens)
    assert itm.shape == (3, 2) and itc.shape == (3, 3)
    assert (itm - itm_ref).abs().max() < 1e-5
    assert (itc - itc_ref).abs().max() < 1e-5
    assert torch.equal(score, itm[:, 1])


def test_import_from_saved_directory(tmp_path, retrieval) -> None:
    retrieval.save_pretrained(tmp_path / "blip2")
    bridge = from_transformers_blip2(tmp_path / "blip2", tokenizer="char").eval()
    tokens = torch.randn(2, 17, 24)
    with torch.no_grad():
        assert (bridge(tokens).queries - _reference_queries(retrieval, tokens, None)).abs().max() < 1e-5


def _lavis_state(model) -> dict[str, torch.Tensor]:
    """Write a transformers retrieval model's weights under LAVIS Blip2Qformer's parameter names."""
    state = model.state_dict()
    lavis = {
        "query_tokens": state["query_tokens"],
        "ln_vision.weight": state["vision_model.post_layernorm.weight"],
        "ln_vision.bias": state["vision_model.post_layernorm.bias"],
        "Qformer.bert.embeddings.word_embeddings.weight": state["embeddings.word_embeddings.weight"],
        "Qformer.bert.embeddings.position_embeddings.weight": state["embeddings.position_embeddings.weight"],
        "Qformer.bert.embeddings.LayerNorm.weight": state["qformer.layernorm.weight"],
        "Qformer.bert.embeddings.LayerNorm.bias": state["qformer.layernorm.bias"],
        "Qformer.cls.predictions.decoder.weight": state["embeddings.word_embeddings.weight"],
        "visual_encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3),
        "temp": torch.tensor(0.06),
    }
    for proj in ("vision", "text"):
        for kind in ("weight", "bias"):
            lavis[f"{proj}_proj.{kind}"] = state[f"{proj}_projection.{kind}"]
            lavis[f"itm_head.{kind}"] = state[f"itm_head.{kind}"]
    renames = {
        "attention.attention.": "attention.self.",
        "crossattention.attention.": "crossattention.self.",
    }
    for key, value in state.items():
        if key.startswith("qformer.encoder.layer."):
            new = key.replace("qformer.encoder.", "Qformer.bert.encoder.")
            for old, replacement in renames.items():
                new = new.replace(old, replacement)
            lavis[new] = value
    return lavis


def test_lavis_import_matches_transformers(tmp_path, retrieval) -> None:
    save_safetensors(_lavis_state(retrieval), tmp_path / "blip2_pretrained.safetensors")
    bridge = from_lavis(tmp_path / "blip2_pretrained.safetensors", tokenizer="char", num_heads=4).eval()
    assert bridge.cross_attention_layers == [0, 2] and bridge.config["embed_dim"] == 16
    assert bridge.temp.item() == pytest.approx(0.06)
    reference = from_transformers_blip2(retrieval, tokenizer="char").eval()
    tokens = torch.randn(2, 17, 24)
    text = bridge.tokenize(["a cat", "a dog on a mat"])
    with torch.no_grad():
        assert (bridge(tokens).queries - _reference_queries(retrieval, tokens, None)).abs().max() < 1e-5
        assert (bridge.itm_logits(tokens, text) - reference.itm_logits(tokens, text)).abs().max() < 1e-5
        assert (bridge.text_embeds(text) - reference.text_embeds(text)).abs().max() < 1e-5


def test_wrong_tokenizer_is_reported(retrieval) -> None:
    from blipkit.errors import ConfigError

    with pytest.raises(ConfigError, match="tokenizer"):
        from_transformers_blip2(retrieval, tokenizer="minilm")
