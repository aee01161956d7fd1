"""The Q-Former bridge: BERT init, layout, attention maps, precision, persistence, registration."""

from __future__ import annotations

import pytest
import torch

from blipkit.errors import BlipkitError, ModelUnavailableError
from blipkit.plugin_manager import registries
from blipkit.plugins.bridges.qformer.init import _char_vocab
from blipkit.plugins.bridges.qformer.model import QFormer

SIZES = dict(num_queries=4, num_layers=4, hidden_size=32, num_heads=4, intermediate_size=64, max_position_embeddings=64)


def tiny(**overrides) -> QFormer:
    return QFormer(input_dim=24, tokenizer="char", **{**SIZES, **overrides}).eval()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random BertForMaskedLM saved as safetensors with the char vocabulary."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(1)
    vocab = _char_vocab()
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=40,
    )
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    directory = tmp_path_factory.mktemp("bert")
    model.save_pretrained(directory)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return directory, model


def test_text_pass_equals_bert_and_lm_head_equals_mlm_head(bert_dir) -> None:
    directory, bert = bert_dir
    qformer = QFormer(input_dim=24, num_queries=4, init=str(directory)).eval()
    sizes = (qformer.config["num_layers"], qformer.config["hidden_size"], qformer.config["intermediate_size"])
    assert sizes == (3, 32, 48)
    assert qformer.config["init"] is None
    tokens = qformer.tokenize(["a red circle, left", "blue square 42", "x"])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    with torch.no_grad():
        ours = qformer.text_pass(ids, mask)
        reference = bert.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = qformer.lm_head(ours, qformer.embeddings.word.weight)
        ref_logits = bert(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()  # padding positions' outputs are unspecified: no real token ever reads them
    assert not real.all()
    assert (ours[real] - reference[real]).abs().max() < 1e-5
    assert logits.shape[-1] == bert.config.vocab_size + 1  # [DEC] appended
    assert (logits[..., :-1][real] - ref_logits[real]).abs().max() < 1e-4
    assert qformer.tokenizer.bos_token == "[DEC]"


def test_query_ffn_starts_as_text_ffn_and_cross_attention_layout(bert_dir) -> None:
    directory, _ = bert_dir
    qformer = QFormer(input_dim=24, num_queries=4, init=str(directory))
    for layer in qformer.layers:
        for (name, a), (_, b) in zip(layer.ffn.state_dict().items(), layer.ffn_query.state_dict().items()):
            assert torch.equal(a, b), name
    assert qformer.cross_attention_layers == [0, 2]
    assert tiny(cross_attention_freq=3).cross_attention_layers == [0, 3]
    assert qformer.layers[0].cross_attn.key.in_features == 24


def test_minilm_init_matches_bert_model() -> None:
    from transformers import BertModel

    from blipkit.plugins.bridges.qformer.init import minilm_dir

    qformer = QFormer(input_dim=16, num_queries=2, init="minilm").eval()
    assert (qformer.config["num_layers"], qformer.config["hidden_size"], qformer.config["num_heads"]) == (6, 384, 12)
    assert len(qformer.tokenizer) == 30523
    bert = BertModel.from_pretrained(str(minilm_dir())).eval()
    tokens = qformer.tokenize(["a photo of a cat on a mat", "two dogs"])
    with torch.no_grad():
        ours = qformer.text_pass(tokens["input_ids"], tokens["attention_mask"])
        reference = bert(**tokens).last_hidden_state
    real = tokens["attention_mask"].bool()
    assert (ours[real] - reference[real]).abs().max() < 1e-4


def test_unreachable_hub_bert_is_a_one_line_error() -> None:
    with pytest.raises(ModelUnavailableError) as info:
        QFormer(input_dim=8, init="bert-base-uncased")
    message = str(info.value)
    assert "\n" not in message and "minilm" in message and "bert-base-uncased" in message


def test_cross_attention_maps_sum_to_one_and_respect_mask() -> None:
    qformer = tiny()
    x = torch.randn(3, 10, 24)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, :3] = 0
    with torch.no_grad():
        out = qformer(x, mask, output_attentions=True)
        plain = qformer(x, mask)
    assert len(out.attentions) == len(qformer.cross_attention_layers) == 2
    for weights in out.attentions:
        assert weights.shape == (3, 4, 4, 10)
        assert torch.allclose(weights.sum(-1), torch.ones(3, 4, 4), atol=1e-6)
        assert weights[0, :, :, 6:].abs().max() == 0 and weights[2, :, :, :3].abs().max() == 0
    assert (out.queries - plain.queries).abs().max() < 1e-5
    assert plain.attentions is None


def test_mask_hides_tokens() -> None:
    qformer = tiny()
    x = torch.randn(2, 9, 24)
    mask = torch.ones(2, 9)
    mask[:, 5:] = 0
    y = x.clone()
    y[:, 5:] = torch.randn(2, 4, 24)
    with torch.no_grad():
        assert (qformer(x, mask).queries - qformer(y, mask).queries).abs().max() < 1e-6
        assert (qformer(x).queries - qformer(y).queries).abs().max() > 1e-3


def test_autocast_bf16_keeps_fp32() -> None:
    qformer = tiny()
    x = torch.randn(2, 6, 24)
    with torch.no_grad():
        reference = qformer(x).queries
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = qformer(x.bfloat16()).queries
            embeds = qformer.image_embeds(x.bfloat16())
    assert out.dtype == torch.float32 and embeds.dtype == torch.float32
    assert (out - qformer(x.bfloat16().float()).queries).abs().max() < 1e-5
    assert (out - reference).abs().max() < 0.1


def test_save_and_load_round_trip(tmp_path, bert_dir) -> None:
    directory, _ = bert_dir
    qformer = QFormer(input_dim=24, num_queries=4, init=str(directory)).eval()
    with torch.no_grad():
        qformer.temp.fill_(0.05)
    qformer.save_pretrained(tmp_path / "bridge")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "bridge").iterdir()}
    loaded = QFormer.from_pretrained(tmp_path / "bridge").eval()
    assert loaded.config == qformer.config
    x = torch.randn(2, 5, 24)
    text = ["a green triangle", "zz top"]
    assert torch.equal(loaded.tokenize(text)["input_ids"], qformer.tokenize(text)["input_ids"])
    assert loaded.tokenizer.bos_token == "[DEC]" and len(loaded.tokenizer) == len(qformer.tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(x).queries, qformer(x).queries)
        assert torch.equal(loaded.itm_logits(x, text), qformer.itm_logits(x, text))
        assert torch.equal(loaded.text_embeds(text), qformer.text_embeds(text))


def test_registered_factory_and_output_dim_check() -> None:
    entry = registries().bridges.resolve("qformer").entry
    assert entry.plugin == "blipkit.plugins.bridges.qformer"
    bridge = registries().bridges.create("qformer", input_dim=24, init=None, tokenizer="char", **SIZES)
    assert isinstance(bridge, QFormer) and bridge.supports_retrieval and bridge.output_dim == 32 and bridge.num_queries == 4
    assert bridge(torch.randn(1, 3, 24)).queries.shape == (1, 4, 32)
    with pytest.raises(BlipkitError):
        registries().bridges.create("qformer", input_dim=24, output_dim=99, init=None, tokenizer="char", **SIZES)
