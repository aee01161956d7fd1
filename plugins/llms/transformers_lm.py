"""Hugging Face transformers language models: named hub models and the open ``hf:`` prefix.

``hf:org/model`` loads a hub id (from the local cache when no hub is reachable), ``hf:/path/dir`` or a
bare directory with a text model's ``config.json`` loads a local ``save_pretrained`` directory. The
config's ``is_encoder_decoder`` picks the decoder-only or the encoder-decoder wrapper. A BLIP-2 checkpoint
(Blip2ForConditionalGeneration, e.g. Salesforce/blip2-opt-2.7b, or InstructBlipForConditionalGeneration)
gives its language model alone, read
from the ``language_model.*`` tensors of its safetensors files, with the checkpoint's tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blipkit import hookimpl
from blipkit.errors import ConfigError, ModelUnavailableError, one_line
from blipkit.io import load_safetensors_prefixed

from ._hf import CausalLM, Seq2SeqLM, resolve_dtype, wrap

__all__ = ["HUB_MODELS", "hf_model", "is_cached", "load_hf", "looks_like_text_model_dir"]

# name -> (hub id, kind, description)
HUB_MODELS: dict[str, tuple[str, str, str]] = {
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B", "decoder-only", "Llama 3.2 1B base (gated on the hub)"),
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", "decoder-only", "Llama 3.1 8B base (gated on the hub)"),
    "opt-2.7b": ("facebook/opt-2.7b", "decoder-only", "OPT 2.7B, the LLM of BLIP-2 OPT"),
    "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B", "decoder-only", "Qwen2.5 0.5B base"),
    "flan-t5-base": ("google/flan-t5-base", "encoder-decoder", "FLAN-T5 base (250M)"),
    "flan-t5-xl": ("google/flan-t5-xl", "encoder-decoder", "FLAN-T5 XL (3B), the LLM of BLIP-2 FLAN-T5"),
}

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_LM_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForSeq2SeqLM")
_BLIP2_LM_PREFIX = "language_model."


def _offline() -> bool:
    from huggingface_hub import is_offline_mode

    flags = (os.environ.get(k, "").strip().upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return is_offline_mode() or any(flag in {"1", "ON", "YES", "TRUE"} for flag in flags)


def is_cached(repo_id: str, revision: str | None = None) -> bool:
    """Whether the hub model's config and weights are already in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)

    return cached("config.json") and any(cached(name) for name in _WEIGHT_FILES)


def _is_blip2_with_language_model(config: dict[str, Any]) -> bool:
    """Whether a config.json's contents describe a Blip2ForConditionalGeneration (or InstructBLIP) model."""
    architectures = config.get("architectures") or []
    kinds = {"blip-2": "Blip2ForConditionalGeneration", "instructblip": "InstructBlipForConditionalGeneration"}
    return kinds.get(config.get("model_type")) in architectures


def looks_like_text_model_dir(path: str) -> bool:
    """Whether ``path`` is a local directory holding the config.json of a causal or seq2seq text model, or
    of a BLIP-2 model (whose language model it then stands for)."""
    config_path = Path(path).expanduser() / "config.json"
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return False
    if isinstance(config, dict) and _is_blip2_with_language_model(config):
        return True
    if not isinstance(config, dict) or "vision_config" in config or "vocab_size" not in config:
        return False
    architectures = config.get("architectures") or []
    return bool(config.get("is_encoder_decoder")) or any(str(a).endswith(_LM_ARCHITECTURES) for a in architectures)


def _missing_message(label: str, repo_id: str) -> str:
    return (
        f"{label} is not in the local Hugging Face cache and no model hub is reachable: download it where one is "
        f"(hf download {repo_id}) or pass a local directory with --llm hf:/path"
    )


def _hub_error(label: str, repo_id: str, err: Exception) -> ModelUnavailableError:
    text = str(err)
    if "gated" in text.lower() or "401" in text or "403" in text:
        return ModelUnavailableError(
            f"{label} is gated on the Hugging Face Hub: accept its licence on the model page and log in "
            f"(hf auth login), or pass a local directory with --llm hf:/path"
        )
    if not is_cached(repo_id):
        return ModelUnavailableError(_missing_message(label, repo_id))
    return ModelUnavailableError(f"{label} could not be loaded: {one_line(text)}")


def _blip2_language_model(directory: Path, config: Any, dtype: str) -> Any:
    """The language model of a saved BLIP-2 model, built from its text config and ``language_model.*``
    tensors only (the vision tower and Q-Former are never read)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

    text_config = config.text_config
    mapping = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING if text_config.is_encoder_decoder else MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        model_class = mapping[type(text_config)]
    except KeyError:
        raise ConfigError(
            f"{directory}: BLIP-2 language model type '{text_config.model_type}' is not a causal or seq2seq LM"
        ) from None
    state = load_safetensors_prefixed(directory, (_BLIP2_LM_PREFIX,), strip=_BLIP2_LM_PREFIX)
    if not state:
        raise ConfigError(f"{directory} holds no language model weights (no {_BLIP2_LM_PREFIX}* tensors)")
    return model_class.from_pretrained(None, config=text_config, state_dict=state, dtype=resolve_dtype(dtype))


def _blip2_snapshot(label: str, repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except OSError as err:
        raise _hub_error(label, repo_id, err) from None


def load_hf(
    source: str,
    label: str | None = None,
    dtype: str = "float32",
    revision: str | None = None,
    max_target_tokens: int | None = None,
    seed: int | None = None,
    trust_remote_code: bool = False,
) -> CausalLM | Seq2SeqLM:
    """Load a hub id or a local directory as a frozen LanguageModel (``seed``: prefix-LM splits, T5 only).

    A model that needs its own Python code (``auto_map`` in its config) loads only with ``trust_remote_code``:
    that code runs on this machine, so it is never run unless asked for.
    """
    local = Path(source).expanduser()
    is_local = local.is_dir()
    label = label or source
    if is_local:
        if not (local / "config.json").is_file():
            raise ModelUnavailableError(f"{local} has no config.json; pass a directory written by save_pretrained")
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelUnavailableError(f"{source} is not a directory; pass an existing model directory or a hub id")
    elif _offline() and not is_cached(source, revision):
        raise ModelUnavailableError(_missing_message(label, source))

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    where = str(local) if is_local else source
    # Passed explicitly: left unset, transformers asks on a terminal whether to run a model's own code.
    options: dict[str, Any] = {"revision": revision, "trust_remote_code": bool(trust_remote_code)}
    try:
        config = AutoConfig.from_pretrained(where, **options)
        if getattr(config, "model_type", "") in ("blip-2", "instructblip"):
            directory = local if is_local else _blip2_snapshot(label, source, revision)
            tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=bool(trust_remote_code))
            model = _blip2_language_model(directory, config, dtype)
        else:
            tokenizer = AutoTokenizer.from_pretrained(where, **options)
            auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
            model = auto.from_pretrained(
                where, config=config, dtype=resolve_dtype(dtype), use_safetensors=True if is_local else None, **options
            )
    except OSError as err:
        if is_local:
            raise ModelUnavailableError(
                f"{local} could not be loaded ({one_line(err)}); it needs config.json, tokenizer files and "
                "model.safetensors as written by save_pretrained"
            ) from None
        raise _hub_error(label, source, err) from None
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ConfigError(f"{label} is not a causal or seq2seq language model; pick a text LLM") from None
        if "trust_remote_code" in str(err):
            raise ConfigError(
                f"{label} needs its own Python code to load (auto_map in its config), which blipkit does not run "
                "unless asked: read that code, and only if you trust it set llm.options.trust_remote_code=true"
            ) from None
        raise
    return wrap(model, tokenizer, name=label, max_target_tokens=max_target_tokens, seed=seed)


def _named_causal(name: str, repo_id: str) -> Callable[..., CausalLM | Seq2SeqLM]:
    def factory(
        dtype: str = "float32", revision: str | None = None, max_target_tokens: int | None = None
    ) -> CausalLM | Seq2SeqLM:
        return load_hf(repo_id, f"{name} ({repo_id})", dtype=dtype, revision=revision, max_target_tokens=max_target_tokens)

    factory.__doc__ = f"Load {repo_id} as a frozen decoder-only language model."
    return factory


def _named_seq2seq(name: str, repo_id: str) -> Callable[..., CausalLM | Seq2SeqLM]:
    def factory(
        dtype: str = "float32",
        revision: str | None = None,
        max_target_tokens: int | None = None,
        seed: int | None = None,
    ) -> CausalLM | Seq2SeqLM:
        return load_hf(
            repo_id, f"{name} ({repo_id})", dtype=dtype, revision=revision, max_target_tokens=max_target_tokens, seed=seed
        )

    factory.__doc__ = f"Load {repo_id} as a frozen encoder-decoder language model (``seed``: prefix-LM splits)."
    return factory


def hf_model(
    source: str,
    dtype: str = "float32",
    revision: str | None = None,
    max_target_tokens: int | None = None,
    seed: int | None = None,
    trust_remote_code: bool = False,
) -> CausalLM | Seq2SeqLM:
    """``hf:`` factory: a hub id or local directory; ``seed`` fixes prefix-LM splits (encoder-decoder only);
    ``trust_remote_code`` lets a model run its own Python code (off unless set)."""
    return load_hf(
        source, dtype=dtype, revision=revision, max_target_tokens=max_target_tokens, seed=seed,
        trust_remote_code=trust_remote_code,
    )


@hookimpl
def register_language_models(register: Any) -> None:
    """Register the named hub models and the ``hf:`` prefix."""
    for name, (repo_id, kind, description) in HUB_MODELS.items():
        build = _named_seq2seq if kind == "encoder-decoder" else _named_causal
        register(
            name,
            build(name, repo_id),
            description=f"{description} [{repo_id}]",
            kind=kind,
            available=lambda repo_id=repo_id: is_cached(repo_id),
        )
    register(
        "hf:",
        hf_model,
        description="any transformers causal or seq2seq LM, or a BLIP-2 checkpoint's: hf:org/model or hf:/path/to/dir",
        kind="auto",
        matches=looks_like_text_model_dir,
    )
