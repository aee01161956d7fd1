"""Import trained Q-Formers: from transformers Blip2 models (objects or saved directories) and from
LAVIS state dicts converted to safetensors. Nothing is ever unpickled."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blipkit.errors import ConfigError, ModelUnavailableError
from blipkit.io import load_safetensors, load_safetensors_prefixed, read_json

from .init import MINILM
from .keymap import State, map_lavis, map_transformers
from .model import QFormer

logger = logging.getLogger(__name__)

_HF_WANTED = ("query_tokens", "qformer.", "embeddings.", "vision_model.post_layernorm.", "vision_projection.",
              "text_projection.", "itm_head.")


def load_mapped(bridge: QFormer, mapped: State, source: str) -> list[str]:
    """Copy mapped tensors into ``bridge``; parts the source lacks keep their init, except the text
    FFNs, which start as copies of the query FFNs (stage-2 checkpoints drop the text branch).
    Returns the parameter names the source did not provide."""
    words = mapped.get("embeddings.word.weight")
    if words is not None and words.shape[0] != len(bridge.tokenizer):
        raise ConfigError(
            f"{source} has {words.shape[0]} word embeddings but the tokenizer "
            f"'{bridge.config['tokenizer']}' has {len(bridge.tokenizer)} tokens; pass the matching tokenizer="
        )
    result = bridge.load_state_dict(mapped, strict=False)
    if result.unexpected_keys:
        raise ConfigError(f"{source} does not fit the Q-Former layout (unexpected {result.unexpected_keys[:3]})")
    missing = list(result.missing_keys)
    with torch.no_grad():
        for i, layer in enumerate(bridge.layers):
            if f"layers.{i}.ffn.up.weight" in missing and f"layers.{i}.ffn_query.up.weight" not in missing:
                layer.ffn.load_state_dict(layer.ffn_query.state_dict())
    if missing:
        logger.info("%s lacks %d Q-Former tensors; they keep their init: %s", source, len(missing), missing)
    return missing


def _hf_config(config: Any) -> dict[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _bert_tokenizer_dir(directory: Path) -> str | None:
    config = directory / "tokenizer_config.json"
    if config.exists() and "bert" in str(read_json(config).get("tokenizer_class", "")).lower():
        return str(directory.resolve())
    return None


def from_transformers_blip2(
    model_or_dir: nn.Module | str | Path, tokenizer: str | None = None, dropout: float | None = None
) -> QFormer:
    """A Q-Former with the numbers of a transformers Blip2 model (Blip2Model,
    Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, ...) or InstructBlipForConditionalGeneration,
    or of its saved directory.

    ``ln_vision`` takes the vision tower's ``post_layernorm``: in transformers' Blip2 checkpoints that
    LayerNorm is LAVIS's ln_vision. ``tokenizer`` defaults to the directory's own BERT tokenizer when it
    has one, else "minilm" (bert-base-uncased's vocabulary, which the Salesforce checkpoints use).
    """
    if isinstance(model_or_dir, nn.Module):
        config = _hf_config(model_or_dir.config)
        state = {k: v for k, v in model_or_dir.state_dict().items() if k.startswith(_HF_WANTED)}
        source = type(model_or_dir).__name__
    else:
        directory = Path(model_or_dir).expanduser()
        if not (directory / "config.json").exists():
            raise ModelUnavailableError(f"{directory} is not a saved transformers model (no config.json)")
        config = read_json(directory / "config.json")
        state = load_safetensors_prefixed(directory, _HF_WANTED)
        source = str(directory)
        # InstructBLIP's processor keeps the Q-Former's own tokenizer beside the LLM's.
        tokenizer = tokenizer or _bert_tokenizer_dir(directory / "qformer_tokenizer") or _bert_tokenizer_dir(directory)
    if "qformer_config" not in config:
        raise ConfigError(f"{source} is not a BLIP-2 model (its config has no qformer_config)")
    qcfg, vcfg = _hf_config(config["qformer_config"]), _hf_config(config.get("vision_config") or {})
    mapped, _ = map_transformers(state)
    bridge = QFormer(
        input_dim=qcfg.get("encoder_hidden_size", vcfg.get("hidden_size", 1408)),
        num_queries=config.get("num_query_tokens", 32),
        num_layers=qcfg["num_hidden_layers"],
        hidden_size=qcfg["hidden_size"],
        num_heads=qcfg["num_attention_heads"],
        intermediate_size=qcfg["intermediate_size"],
        cross_attention_freq=qcfg.get("cross_attention_frequency", 2),
        dropout=qcfg.get("hidden_dropout_prob", 0.1) if dropout is None else dropout,
        tokenizer=tokenizer or MINILM,
        embed_dim=config.get("image_text_hidden_size", 256),
        max_position_embeddings=qcfg.get("max_position_embeddings", 512),
        layer_norm_eps=qcfg.get("layer_norm_eps", 1e-12),
        vision_norm_eps=vcfg.get("layer_norm_eps", 1e-6),
    )
    load_mapped(bridge, mapped, source)
    return bridge


_LAYER_INDEX = re.compile(r"^layers\.(\d+)\.")


def from_lavis(
    path: str | Path, tokenizer: str | None = None, num_heads: int = 12, dropout: float = 0.1
) -> QFormer:
    """A Q-Former from a LAVIS BLIP-2 state dict (``checkpoint["model"]``) saved as safetensors.

    Sizes come from the tensors; the head count is not stored in them (``num_heads``, BERT-base: 12).
    docs/qformer.md gives the key mapping and a conversion snippet.
    """
    path = Path(path).expanduser()
    mapped, _ = map_lavis(load_safetensors(path))
    if "query_tokens" not in mapped:
        raise ConfigError(
            f"{path} holds no LAVIS Q-Former (no query_tokens); export checkpoint['model'] of a BLIP-2 model"
        )
    layers = sorted({int(m.group(1)) for k in mapped if (m := _LAYER_INDEX.match(k))})
    cross = [i for i in layers if f"layers.{i}.cross_attn.key.weight" in mapped]
    if not layers or not cross or cross[0] != 0:
        raise ConfigError(f"{path}: cannot find the Q-Former layers (expected cross-attention in layer 0)")
    hidden = mapped["query_tokens"].shape[-1]
    positions = mapped.get("embeddings.position.weight")
    bridge = QFormer(
        input_dim=mapped["layers.0.cross_attn.key.weight"].shape[1],
        num_queries=mapped["query_tokens"].shape[1],
        num_layers=layers[-1] + 1,
        hidden_size=hidden,
        num_heads=num_heads,
        intermediate_size=mapped["layers.0.ffn_query.up.weight"].shape[0],
        cross_attention_freq=cross[1] if len(cross) > 1 else layers[-1] + 1,
        dropout=dropout,
        tokenizer=tokenizer or MINILM,
        embed_dim=mapped["vision_proj.weight"].shape[0] if "vision_proj.weight" in mapped else 256,
        max_position_embeddings=positions.shape[0] if positions is not None else 512,
    )
    load_mapped(bridge, mapped, str(path))
    return bridge
