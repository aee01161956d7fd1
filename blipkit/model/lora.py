"""LoRA adapters through peft, for language models and for bridges.

Language models: ``apply_llm_lora`` wraps the wrapper's transformers model (``llm.model``) in a peft
model, so only the adapters train; ``save_llm_adapter`` / ``load_llm_adapter`` write and read peft's own
``adapter_config.json`` + ``adapter_model.safetensors``, loadable by peft anywhere.

Bridges: ``apply_bridge_lora`` injects adapters into the bridge's attention projections (all Linear
layers when it has no attention) and freezes everything else except a few parameters LoRA cannot
cover (the Q-Former's learned queries and ``ln_vision`` by default). ``save_bridge`` writes the bridge's
usual directory (base weights under their original names, so ``from_pretrained`` still reads it) plus
``lora.json`` and ``lora.safetensors``; ``load_bridge_lora`` puts them back.

Only safetensors and JSON are read from disk.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blipkit.errors import BlipkitError, ConfigError, DataError
from blipkit.interfaces import Bridge
from blipkit.io import atomic_directory, atomic_write_json, load_safetensors, read_json, save_safetensors

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "BRIDGE_LORA_CONFIG",
    "BRIDGE_LORA_WEIGHTS",
    "LoraSettings",
    "apply_bridge_lora",
    "apply_llm_lora",
    "bridge_base_state",
    "bridge_lora_state",
    "default_bridge_targets",
    "has_lora",
    "load_bridge_lora",
    "load_llm_adapter",
    "merge_bridge_lora",
    "merge_llm_lora",
    "restore_bridge_lora",
    "save_bridge",
    "save_llm_adapter",
    "trainable_parameter_report",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BRIDGE_LORA_CONFIG = "lora.json"
BRIDGE_LORA_WEIGHTS = "lora.safetensors"

# Child names that mark a module as an attention block: one of these triples all present.
_QKV_NAMES: tuple[tuple[str, str, str], ...] = (
    ("query", "key", "value"),
    ("q_proj", "k_proj", "v_proj"),
    ("q", "k", "v"),
)

_ADAPTER = "default"
_LORA_MARK = "lora_"
_BASE_LAYER = ".base_layer"


@dataclass
class LoraSettings:
    """LoRA hyper-parameters: rank, scaling numerator (scale = alpha / r), dropout, targets, bias.

    ``target_modules`` None means the model's defaults (the language model's ``lora_targets()``, or
    ``default_bridge_targets``); names match a module's full name or its dotted suffix, as in peft.
    ``bias``: "none", "all" or "lora_only" (which biases train).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None
    bias: str = "none"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"lora.bias must be one of none, all, lora_only; got '{self.bias}'")
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)

    def peft_config(self, target_modules: list[str], task_type: str | None = None) -> Any:
        """The equivalent peft ``LoraConfig`` over ``target_modules``."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(target_modules),
            bias=self.bias,
            task_type=task_type,
        )


# ---- defaults ---------------------------------------------------------------------------------------


def _matches(name: str, targets: Sequence[str]) -> bool:
    """peft's rule for a list of target names: the full name, or a dotted suffix of it."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _shortest_names(chosen: list[str], candidates: list[str]) -> list[str]:
    """The shortest dotted suffixes of ``chosen`` that select exactly ``chosen`` among ``candidates``."""
    depth = 1
    while True:
        suffixes = sorted({".".join(name.split(".")[-depth:]) for name in chosen})
        if {n for n in candidates if _matches(n, suffixes)} == set(chosen):
            return suffixes
        depth += 1


def default_bridge_targets(bridge: nn.Module) -> list[str]:
    """The Linear layers LoRA adapts in a bridge, as peft target names.

    A module with query/key/value children (``query``/``key``/``value``, ``q_proj``/..., ``q``/...) is an
    attention block: all its direct Linear children (the projections and the output dense layer) are
    targets. A bridge without attention blocks gets every Linear layer.
    """
    linears = [name for name, module in bridge.named_modules() if isinstance(module, nn.Linear)]
    chosen: list[str] = []
    for name, module in bridge.named_modules():
        children = {child: sub for child, sub in module.named_children() if isinstance(sub, nn.Linear)}
        if any(all(part in children for part in triple) for triple in _QKV_NAMES):
            chosen.extend(f"{name}.{child}" if name else child for child in children)
    if not chosen:
        chosen = linears
    if not chosen:
        raise ConfigError(f"bridge {type(bridge).__name__} has no Linear layers for LoRA; set lora.target_modules")
    return _shortest_names(chosen, linears)


# ---- shared helpers ---------------------------------------------------------------------------------


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` holds injected LoRA layers."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in module.modules())


def _check_targets(module: nn.Module, targets: list[str], what: str) -> None:
    names = [name for name, _ in module.named_modules()]
    missing = [t for t in targets if not any(_matches(n, [t]) for n in names)]
    if missing:
        raise ConfigError(
            f"LoRA target module '{missing[0]}' matches no layer of the {what}; "
            "check lora.target_modules against its module names"
        )


def _load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load peft-named adapter tensors into ``model``; every adapter weight must be given and fit."""
    from peft import set_peft_model_state_dict

    try:
        result = set_peft_model_state_dict(model, state, adapter_name=_ADAPTER)
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[-1].strip()
        raise DataError(
            f"{source} does not fit this model ({detail}); load it into the model it was trained with"
        ) from None
    expected = {n for n, _ in model.named_parameters() if _LORA_MARK in n}
    missing = sorted(expected & set(result.missing_keys))
    if result.unexpected_keys or missing:
        key = (list(result.unexpected_keys) or missing)[0]
        raise DataError(f"{source} does not fit this model (key '{key}'); load it into the model it was trained with")


def trainable_parameter_report(module: nn.Module) -> dict[str, int | float]:
    """Counts of trainable and total parameters (shared tensors counted once) and the trainable percentage."""
    seen: set[int] = set()
    trainable = total = 0
    for param in module.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total if total else 0.0}


# ---- language models --------------------------------------------------------------------------------


def _wrap_in_peft(model: Any, config: Any) -> Any:
    from peft import get_peft_model

    with warnings.catch_warnings():
        # peft asks the model about gradient checkpointing through a name transformers has deprecated.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        return get_peft_model(model, config)


def _peft_model(llm: Any) -> Any:
    from peft import PeftModel

    if not isinstance(llm.model, PeftModel):
        raise BlipkitError(f"language model '{getattr(llm, 'name', '')}' has no LoRA adapter; apply one first")
    return llm.model


def apply_llm_lora(llm: Any, settings: LoraSettings) -> None:
    """Wrap ``llm.model`` in a peft model with LoRA adapters; only the adapters require grad afterwards."""
    from peft import PeftModel, TaskType

    if isinstance(llm.model, PeftModel):
        raise BlipkitError(f"language model '{getattr(llm, 'name', '')}' already has a LoRA adapter")
    targets = settings.target_modules or llm.lora_targets()
    if not targets:
        raise ConfigError(
            f"language model '{getattr(llm, 'name', '')}' names no default LoRA target modules; set "
            "llm.lora.target_modules to the names of its attention projection layers (e.g. [q_proj, v_proj])"
        )
    _check_targets(llm.model, targets, "language model")
    task = TaskType.SEQ_2_SEQ_LM if llm.is_encoder_decoder else TaskType.CAUSAL_LM
    llm.model = _wrap_in_peft(llm.model, settings.peft_config(targets, task_type=task))


def save_llm_adapter(llm: Any, directory: str | Path) -> Path:
    """Write peft's ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory`` atomically."""
    from peft import get_peft_model_state_dict

    model = _peft_model(llm)
    config = model.peft_config[_ADAPTER]
    directory = Path(directory)
    state = get_peft_model_state_dict(model, adapter_name=_ADAPTER, save_embedding_layers=False)
    with atomic_directory(directory) as tmp:
        save_safetensors(state, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        # As peft does: the saved config names the base model and says "inference".
        saved = copy.deepcopy(config)
        saved.base_model_name_or_path = config.base_model_name_or_path or (
            model.get_base_model().__dict__.get("name_or_path") or None
        )
        saved.inference_mode = True
        saved.save_pretrained(str(tmp))
    return directory


def _read_adapter_config(directory: Path) -> Any:
    from peft import LoraConfig

    data = read_json(directory / ADAPTER_CONFIG)
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        kind = data.get("peft_type") if isinstance(data, dict) else None
        raise DataError(f"{directory / ADAPTER_CONFIG} is not a LoRA adapter (peft_type {kind!r}); restore it or train again")
    known = set(LoraConfig.__dataclass_fields__)
    return LoraConfig(**{k: v for k, v in data.items() if k in known})


def load_llm_adapter(llm: Any, directory: str | Path, trainable: bool = False) -> None:
    """Load an adapter written by ``save_llm_adapter`` (or by peft) into ``llm``.

    Without an adapter yet, one is built from ``adapter_config.json`` (its adapters require grad only
    with ``trainable``); with one (resuming), its weights are overwritten.
    """
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / ADAPTER_WEIGHTS).exists():
        raise DataError(f"{directory} holds no {ADAPTER_WEIGHTS}; give the directory save_llm_adapter wrote")
    if not isinstance(llm.model, PeftModel):
        config = _read_adapter_config(directory)
        config.inference_mode = False
        llm.model = _wrap_in_peft(llm.model, config)
        for name, param in llm.model.named_parameters():
            if _LORA_MARK in name:
                param.requires_grad_(trainable)
    _load_adapter_state(llm.model, load_safetensors(directory / ADAPTER_WEIGHTS), str(directory / ADAPTER_WEIGHTS))


def merge_llm_lora(llm: Any) -> None:
    """Fold the adapters into the base weights and drop peft's wrapper (for inference)."""
    llm.model = _peft_model(llm).merge_and_unload()


# ---- bridges ----------------------------------------------------------------------------------------


def _always_trainable(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)


def apply_bridge_lora(bridge: nn.Module, settings: LoraSettings, always_trainable: Sequence[str] | None = None) -> None:
    """Inject LoRA into the bridge's Linear layers and freeze every other parameter but ``always_trainable``.

    ``always_trainable`` holds parameter-name patterns (glob; a module name covers its parameters) that
    keep training; by default the bridge's own ``lora_always_trainable`` (the Q-Former's learned query
    tokens and ``ln_vision``, which BLIP-2 trains fresh and which LoRA, on Linear layers only, cannot
    adapt). The resolved settings are recorded on the bridge as ``bridge.lora_settings`` for saving.
    """
    if always_trainable is None:
        always_trainable = getattr(bridge, "lora_always_trainable", ())
    from peft import inject_adapter_in_model

    if has_lora(bridge):
        raise BlipkitError(f"bridge {type(bridge).__name__} already has LoRA adapters")
    targets = settings.target_modules or default_bridge_targets(bridge)
    _check_targets(bridge, targets, "bridge")
    inject_adapter_in_model(settings.peft_config(targets), bridge, adapter_name=_ADAPTER)
    for name, param in bridge.named_parameters():
        if _always_trainable(name.replace(_BASE_LAYER, ""), always_trainable):
            param.requires_grad_(True)
    bridge.lora_settings = {
        **asdict(settings),
        "target_modules": list(targets),
        "always_trainable": list(always_trainable),
    }


def _bridge_settings(bridge: nn.Module) -> dict[str, Any]:
    settings = getattr(bridge, "lora_settings", None)
    if settings is None or not has_lora(bridge):
        raise BlipkitError(f"bridge {type(bridge).__name__} has no LoRA adapters; call apply_bridge_lora first")
    return dict(settings)


def bridge_lora_state(bridge: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The bridge's LoRA tensors (peft's naming, no adapter name) and the settings that rebuild them."""
    from peft import get_peft_model_state_dict

    settings = _bridge_settings(bridge)
    state = get_peft_model_state_dict(bridge, adapter_name=_ADAPTER, save_embedding_layers=False)
    return {k: v.detach().clone() for k, v in state.items()}, settings


def restore_bridge_lora(bridge: nn.Module, settings: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Inject LoRA per ``settings`` (unless present already) and load ``tensors`` from ``bridge_lora_state``."""
    options = dict(settings)
    always = options.pop("always_trainable", None)
    known = set(LoraSettings.__dataclass_fields__)
    if set(options) - known:
        raise DataError(f"unknown LoRA setting '{sorted(set(options) - known)[0]}'; re-save the bridge")
    if not has_lora(bridge):
        apply_bridge_lora(bridge, LoraSettings(**options), always_trainable=always)
    _load_adapter_state(bridge, tensors, "the saved bridge LoRA weights")


def _base_name(key: str) -> str:
    return key.replace(_BASE_LAYER, "")


def bridge_base_state(bridge: nn.Module) -> dict[str, torch.Tensor]:
    """The bridge's state dict without LoRA tensors, under the names it had before LoRA (unmerged)."""
    return {_base_name(k): v for k, v in bridge.state_dict().items() if _LORA_MARK not in k}


@contextmanager
def _base_state_names(bridge: nn.Module) -> Iterator[None]:
    """While active, ``bridge.state_dict()`` returns ``bridge_base_state``'s keys (no LoRA tensors)."""

    def hook(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key in list(state):
            if not key.startswith(prefix):
                continue
            value = state.pop(key)
            if _LORA_MARK not in key[len(prefix):]:
                state[_base_name(key)] = value

    handle = bridge.register_state_dict_post_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def save_bridge(bridge: Bridge, directory: str | Path) -> Path:
    """Save a bridge with ``save_pretrained``; with LoRA, base weights keep their names and the adapters
    go to ``lora.json`` + ``lora.safetensors`` beside them."""
    directory = Path(directory)
    if not has_lora(bridge):
        bridge.save_pretrained(directory)
        return directory
    tensors, settings = bridge_lora_state(bridge)
    with _base_state_names(bridge):
        bridge.save_pretrained(directory)
    save_safetensors(tensors, directory / BRIDGE_LORA_WEIGHTS)
    atomic_write_json(directory / BRIDGE_LORA_CONFIG, settings)
    return directory


def load_bridge_lora(bridge: nn.Module, directory: str | Path) -> bool:
    """Put a LoRA saved by ``save_bridge`` back into ``bridge``; False when ``directory`` has none.

    Works on a bridge fresh from ``from_pretrained`` (adapters are injected) and on one that already has
    them (resuming: base weights and adapters are both reloaded).
    """
    directory = Path(directory)
    if not (directory / BRIDGE_LORA_CONFIG).exists():
        return False
    settings = read_json(directory / BRIDGE_LORA_CONFIG)
    if not isinstance(settings, dict):
        raise DataError(f"{directory / BRIDGE_LORA_CONFIG} is not LoRA settings (not a JSON object); restore it or train again")
    tensors = load_safetensors(directory / BRIDGE_LORA_WEIGHTS)
    if has_lora(bridge):
        weights = directory / "model.safetensors"
        base = {_base_name(k): k for k in bridge.state_dict() if _LORA_MARK not in k}
        saved = load_safetensors(weights)
        if set(saved) != set(base):
            raise DataError(f"{weights} does not fit this bridge; load it into the bridge it was saved from")
        try:
            bridge.load_state_dict({base[k]: v for k, v in saved.items()}, strict=False)
        except RuntimeError:
            raise DataError(f"{weights} does not fit this bridge; load it into the bridge it was saved from") from None
    restore_bridge_lora(bridge, settings, tensors)
    return True


def merge_bridge_lora(bridge: nn.Module) -> None:
    """Fold the adapters into the bridge's Linear weights and remove the LoRA layers (for inference)."""
    from peft.tuners.lora import LoraLayer

    _bridge_settings(bridge)
    for name, module in list(bridge.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(bridge.get_submodule(parent_name) if parent_name else bridge, child, module.get_base_layer())
    del bridge.lora_settings
    if hasattr(bridge, "peft_config"):
        del bridge.peft_config
