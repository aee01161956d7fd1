"""LoRA through peft: targets, freezing, training, save/load, merge, for tiny LLMs and a tiny Q-Former."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from blipkit.errors import BlipkitError, ConfigError, DataError
from blipkit.io import load_safetensors
from blipkit.plugin_manager import registries
from blipkit.model import lora
from blipkit.plugins.llms._hf import default_lora_targets
from blipkit.model.lora import LoraSettings

SETTINGS = LoraSettings(r=4, alpha=8, dropout=0.0)
PROMPTS = ["what colour is the shape?", "caption"]
TARGETS = ["red circle", "a blue square on the left"]


# ---- builders -------------------------------------------------------------------------------------


def _tiny_opt(seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    from blipkit.plugins.llms._hf import CausalLM
    from blipkit.plugins.llms.tiny import build_tokenizer

    tokenizer = build_tokenizer(add_bos=True)
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        init_std=0.5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OPTForCausalLM(config)
    return CausalLM(model, tokenizer, name="tiny-opt")


def _llm(kind: str):
    if kind == "tiny-opt":
        return _tiny_opt()
    return registries().llms.create(kind, seed=0)


def _qformer():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bridge = registries().bridges.create(
            "qformer", input_dim=16, init="random", num_queries=2, num_layers=2, hidden_size=32, num_heads=4,
            intermediate_size=64,
        )
    return bridge.eval()


def _prefix(llm, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(len(PROMPTS), 3, llm.hidden_size, generator=generator)


def _logits(llm, prefix: torch.Tensor) -> torch.Tensor:
    """The wrapped model's logits on [prefix][prompt][target] (decoder inputs for encoder-decoders)."""
    batch = llm.tokenize(PROMPTS, TARGETS)
    embeds = torch.cat([prefix, llm.embed(batch.input_ids)], dim=1)
    mask = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long), batch.attention_mask], dim=1)
    with torch.no_grad():
        if llm.is_encoder_decoder:
            labels = batch.labels.clamp(min=0)
            return llm.model(inputs_embeds=embeds, attention_mask=mask, labels=labels).logits
        return llm.model(inputs_embeds=embeds, attention_mask=mask).logits


def _tokens(seed: int = 2) -> torch.Tensor:
    return torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(seed))


def _queries(bridge, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return bridge(tokens).queries


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in module.named_parameters()}


def _train_llm(llm, steps: int = 3) -> torch.Tensor:
    """A few AdamW steps on LoRA weights and a trainable prefix; returns the trained prefix."""
    prefix = _prefix(llm).requires_grad_(True)
    params = [p for p in llm.parameters() if p.requires_grad] + [prefix]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = llm.tokenize(PROMPTS, TARGETS)
    llm.train()
    for _ in range(steps):
        optimizer.zero_grad()
        llm.loss(prefix, batch).backward()
        optimizer.step()
    llm.eval()
    return prefix.detach()


def _train_bridge(bridge, steps: int = 3) -> None:
    params = [p for p in bridge.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    tokens = _tokens()
    target = torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(3))
    for _ in range(steps):
        optimizer.zero_grad()
        (bridge(tokens).queries - target).pow(2).mean().backward()
        optimizer.step()


# ---- default targets ------------------------------------------------------------------------------


def test_default_llm_targets_per_architecture() -> None:
    from transformers import LlamaConfig, OPTConfig, Qwen2Config, T5Config

    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert default_lora_targets(LlamaConfig()) == attention
    assert default_lora_targets(Qwen2Config()) == attention
    assert default_lora_targets(OPTConfig()) == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert default_lora_targets(T5Config()) == ["q", "k", "v", "o"]
    assert default_lora_targets(registries().llms.create("tiny-t5")) == ["q", "k", "v", "o"]
    assert default_lora_targets(registries().llms.create("tiny-llama").model) == attention


def test_default_llm_targets_unknown_model_type() -> None:
    from transformers import GPT2Config

    with pytest.raises(ConfigError) as info:
        default_lora_targets(GPT2Config())
    message = str(info.value)
    assert "\n" not in message and "'gpt2'" in message and "llm.lora.target_modules" in message


def test_default_bridge_targets_qformer_attention() -> None:
    bridge = _qformer()
    targets = lora.default_bridge_targets(bridge)
    linear_names = [n for n, m in bridge.named_modules() if isinstance(m, nn.Linear)]
    attention = {n for n in linear_names if ".self_attn." in n or ".cross_attn." in n}
    selected = {n for n in linear_names if any(n == t or n.endswith("." + t) for t in targets)}
    assert selected == attention
    assert {n.rsplit(".", 1)[-1] for n in selected} == {"query", "key", "value", "dense"}
    assert len(attention) == 2 * 4 + 1 * 4  # self-attention in both layers, cross-attention in layer 0


def test_default_bridge_targets_all_linear_without_attention() -> None:
    bridge = registries().bridges.create("mlp", input_dim=16, output_dim=24)
    targets = lora.default_bridge_targets(bridge)
    linear_names = {n for n, m in bridge.named_modules() if isinstance(m, nn.Linear)}
    selected = {n for n in linear_names if any(n == t or n.endswith("." + t) for t in targets)}
    assert linear_names and selected == linear_names


# ---- language models ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-t5", "tiny-opt"])
def test_llm_lora_trains_only_adapters(kind: str) -> None:
    llm = _llm(kind).eval()
    prefix = _prefix(llm)
    before = _logits(llm, prefix)
    lora.apply_llm_lora(llm, SETTINGS)

    trainable = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    report = lora.trainable_parameter_report(llm)
    assert report["trainable"] == sum(p.numel() for p in llm.parameters() if p.requires_grad)
    assert 0 < report["trainable"] < report["total"]
    # B starts at zero: a fresh adapter leaves the model's outputs as they were.
    torch.testing.assert_close(_logits(llm, prefix), before, rtol=0, atol=0)

    frozen = {n: p for n, p in _snapshot(llm).items() if n not in trainable}
    _train_llm(llm)
    after = _snapshot(llm)
    for name, value in frozen.items():
        assert torch.equal(after[name], value), name
    assert any(not torch.equal(after[n], torch.zeros_like(after[n])) for n in trainable if ".lora_B." in n)
    assert not torch.allclose(_logits(llm, prefix), before, atol=1e-4)


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-t5"])
def test_llm_loss_backpropagates_into_lora_and_prefix(kind: str) -> None:
    llm = _llm(kind)
    lora.apply_llm_lora(llm, SETTINGS)
    llm.train()
    # A non-zero B so that gradients also reach A (with B = 0 only B gets one).
    with torch.no_grad():
        for name, param in llm.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.1)
    prefix = _prefix(llm).requires_grad_(True)
    llm.loss(prefix, llm.tokenize(PROMPTS, TARGETS)).backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0
    grads = {n: p.grad for n, p in llm.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in llm.parameters() if not p.requires_grad)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-t5", "tiny-opt"])
def test_llm_adapter_round_trip(kind: str, tmp_path: Path) -> None:
    llm = _llm(kind)
    lora.apply_llm_lora(llm, SETTINGS)
    prefix = _train_llm(llm)
    directory = lora.save_llm_adapter(llm, tmp_path / "llm_adapter")
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == SETTINGS.r and config["lora_alpha"] == SETTINGS.alpha
    assert config["task_type"] == ("SEQ_2_SEQ_LM" if llm.is_encoder_decoder else "CAUSAL_LM")
    saved = load_safetensors(directory / "adapter_model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)

    fresh = _llm(kind).eval()
    lora.load_llm_adapter(fresh, directory)
    assert not any(p.requires_grad for p in fresh.parameters())
    torch.testing.assert_close(_logits(fresh, prefix), _logits(llm, prefix), rtol=0, atol=0)
    assert fresh.generate(prefix, PROMPTS, max_new_tokens=4) == llm.generate(prefix, PROMPTS, max_new_tokens=4)

    # Resuming: loading into a model that already has (other) adapters overwrites them.
    resumed = _llm(kind).eval()
    lora.apply_llm_lora(resumed, SETTINGS)
    lora.load_llm_adapter(resumed, directory)
    torch.testing.assert_close(_logits(resumed, prefix), _logits(llm, prefix), rtol=0, atol=0)

    # peft itself reads the directory.
    from peft import PeftModel

    base = _llm(kind).eval()
    base.model = PeftModel.from_pretrained(base.model, str(directory))
    torch.testing.assert_close(_logits(base, prefix), _logits(llm, prefix), rtol=0, atol=0)


def test_llm_adapter_save_replaces_directory(tmp_path: Path) -> None:
    llm = _llm("tiny-llama")
    lora.apply_llm_lora(llm, SETTINGS)
    directory = tmp_path / "adapter"
    lora.save_llm_adapter(llm, directory)
    _train_llm(llm, steps=1)
    lora.save_llm_adapter(llm, directory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    saved = load_safetensors(directory / "adapter_model.safetensors")
    current = dict(llm.model.named_parameters())
    assert all(torch.equal(v, current[k.replace(".weight", ".default.weight")]) for k, v in saved.items())
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-t5", "tiny-opt"])
def test_llm_merge_matches_unmerged(kind: str) -> None:
    from peft import PeftModel

    llm = _llm(kind)
    lora.apply_llm_lora(llm, SETTINGS)
    # In float64, so that the comparison sees the merge and not float32 rounding through the layers.
    prefix = _train_llm(llm).double()
    llm.double()
    unmerged = _logits(llm, prefix)
    texts = llm.generate(prefix, PROMPTS, max_new_tokens=4)
    lora.merge_llm_lora(llm)
    assert not isinstance(llm.model, PeftModel) and not lora.has_lora(llm)
    torch.testing.assert_close(_logits(llm, prefix), unmerged, rtol=0, atol=1e-5)
    assert llm.generate(prefix, PROMPTS, max_new_tokens=4) == texts


def test_llm_lora_errors(tmp_path: Path) -> None:
    llm = _llm("tiny-llama")
    with pytest.raises(BlipkitError, match="no LoRA adapter"):
        lora.save_llm_adapter(llm, tmp_path / "a")
    with pytest.raises(ConfigError, match="'nonexistent'"):
        lora.apply_llm_lora(llm, LoraSettings(target_modules=["nonexistent"]))
    with pytest.raises(DataError, match="adapter_model.safetensors"):
        lora.load_llm_adapter(llm, tmp_path / "missing")
    lora.apply_llm_lora(llm, SETTINGS)
    with pytest.raises(BlipkitError, match="already"):
        lora.apply_llm_lora(llm, SETTINGS)
    lora.save_llm_adapter(llm, tmp_path / "r4")
    other = _llm("tiny-llama")
    lora.apply_llm_lora(other, LoraSettings(r=2))
    with pytest.raises(DataError, match="does not fit"):
        lora.load_llm_adapter(other, tmp_path / "r4")
    with pytest.raises(ConfigError, match="lora.r"):
        LoraSettings(r=0)


# ---- bridges --------------------------------------------------------------------------------------


def test_bridge_lora_trains_only_adapters_and_always_trainable() -> None:
    bridge = _qformer()
    tokens = _tokens()
    before = _queries(bridge, tokens)
    lora.apply_bridge_lora(bridge, SETTINGS)
    assert bridge.lora_settings["target_modules"] == lora.default_bridge_targets(_qformer())
    assert bridge.lora_settings["always_trainable"] == ["query_tokens", "ln_vision", "image_position"]
    assert bridge.lora_settings["always_trainable"] == list(type(bridge).lora_always_trainable)

    trainable = {n for n, p in bridge.named_parameters() if p.requires_grad}
    always = {"query_tokens", "ln_vision.weight", "ln_vision.bias"}
    assert always <= trainable
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable - always)
    torch.testing.assert_close(_queries(bridge, tokens), before, rtol=0, atol=0)

    snapshot = _snapshot(bridge)
    _train_bridge(bridge)
    after = _snapshot(bridge)
    for name, value in snapshot.items():
        assert torch.equal(after[name], value) == (name not in trainable), name
    assert not torch.allclose(_queries(bridge, tokens), before, atol=1e-4)


def test_bridge_lora_always_trainable_is_a_parameter() -> None:
    bridge = _qformer()
    lora.apply_bridge_lora(bridge, SETTINGS, always_trainable=())
    trainable = [n for n, p in bridge.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    projector = registries().bridges.create("mlp", input_dim=16, output_dim=24)
    linears = [n for n, m in projector.named_modules() if isinstance(m, nn.Linear)]
    lora.apply_bridge_lora(projector, SETTINGS)
    trainable = {n for n, p in projector.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.default.weight" for n in linears for ab in "AB"}


def test_bridge_lora_save_and_load(tmp_path: Path) -> None:
    bridge = _qformer()
    lora.apply_bridge_lora(bridge, SETTINGS)
    _train_bridge(bridge)
    tokens = _tokens(seed=5)
    expected = _queries(bridge, tokens)

    directory = lora.save_bridge(bridge, tmp_path / "bridge")
    files = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "lora.json", "lora.safetensors"} <= files
    base = load_safetensors(directory / "model.safetensors")
    assert base.keys() == _qformer().state_dict().keys()
    assert any(".base_layer." in k for k in bridge.state_dict())  # the renaming lasted only for the save

    # A plain from_pretrained gives the base bridge; load_bridge_lora adds the trained adapters.
    loaded = type(bridge).from_pretrained(directory).eval()
    assert lora.load_bridge_lora(loaded, directory)
    torch.testing.assert_close(_queries(loaded, tokens), expected, rtol=0, atol=0)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in bridge.named_parameters() if p.requires_grad
    }

    # Resuming into a bridge that already has adapters and other base weights.
    resumed = _qformer()
    with torch.no_grad():
        resumed.query_tokens.add_(1.0)
    lora.apply_bridge_lora(resumed, SETTINGS)
    assert lora.load_bridge_lora(resumed, directory)
    torch.testing.assert_close(_queries(resumed, tokens), expected, rtol=0, atol=0)

    plain = tmp_path / "plain"
    lora.save_bridge(_qformer(), plain)
    assert not (plain / "lora.json").exists() and not lora.load_bridge_lora(_qformer(), plain)


def test_bridge_lora_state_round_trip() -> None:
    bridge = _qformer()
    lora.apply_bridge_lora(bridge, SETTINGS)
    _train_bridge(bridge)
    tensors, settings = lora.bridge_lora_state(bridge)
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert json.loads(json.dumps(settings)) == settings

    fresh = _qformer()
    fresh.load_state_dict(lora.bridge_base_state(bridge))
    lora.restore_bridge_lora(fresh, settings, tensors)
    tokens = _tokens(seed=6)
    torch.testing.assert_close(_queries(fresh, tokens), _queries(bridge, tokens), rtol=0, atol=0)

    with pytest.raises(DataError, match="does not fit"):
        lora.restore_bridge_lora(_qformer(), settings, {"layers.9.self_attn.query.lora_A.weight": torch.zeros(4, 32)})


def test_bridge_merge_matches_unmerged(tmp_path: Path) -> None:
    bridge = _qformer()
    lora.apply_bridge_lora(bridge, SETTINGS)
    _train_bridge(bridge)
    tokens = _tokens(seed=7)
    unmerged = _queries(bridge, tokens)
    lora.merge_bridge_lora(bridge)
    assert not lora.has_lora(bridge) and not hasattr(bridge, "lora_settings")
    torch.testing.assert_close(_queries(bridge, tokens), unmerged, rtol=0, atol=1e-5)
    # The merged bridge is a plain bridge again: it saves and loads with its own methods.
    bridge.save_pretrained(tmp_path / "merged")
    loaded = type(bridge).from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_queries(loaded, tokens), unmerged, rtol=0, atol=1e-5)


def test_bridge_lora_errors() -> None:
    bridge = _qformer()
    with pytest.raises(BlipkitError, match="apply_bridge_lora"):
        lora.bridge_lora_state(bridge)
    with pytest.raises(ConfigError, match="'missing_proj'"):
        lora.apply_bridge_lora(bridge, LoraSettings(target_modules=["missing_proj"]))
    lora.apply_bridge_lora(bridge, SETTINGS)
    with pytest.raises(BlipkitError, match="already"):
        lora.apply_bridge_lora(bridge, SETTINGS)
