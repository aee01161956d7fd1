"""Recipe schema, YAML loading, ``key=value`` / ``~key`` overrides and validation.

A recipe is data: which encoder, bridge, projection and LLM, which data, and the settings of each stage.
``~key`` removes a key so that it takes its schema default (stages and the validation split default to
off, so ``~stage1`` runs stage 2 alone).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from blipkit.errors import BlipkitError, ConfigError, one_line

__all__ = [
    "ComponentConfig",
    "DataConfig",
    "DatasetConfig",
    "DistributedConfig",
    "GenerationConfig",
    "Recipe",
    "StageConfig",
    "apply_overrides",
    "load_recipe",
    "recipe_from_dict",
    "recipe_to_dict",
    "validate_recipe",
]


@dataclass
class ComponentConfig:
    """A registered part picked by name, with its factory options.

    ``pretrained`` (bridge and projection only): a blipkit run directory, a saved bridge directory or a
    transformers BLIP-2 directory whose weights to start from, e.g. stage 1's run for stage 2 alone.
    ``tuning`` (bridge): ``full`` trains every weight, ``lora`` trains LoRA adapters (plus the learned
    queries and ln_vision). ``lora``: LoRA settings (r, alpha, dropout, target_modules, bias; for the bridge
    also always_trainable); on ``llm`` its presence puts trainable LoRA adapters into the frozen LLM.
    """

    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    tuning: str = "full"
    lora: dict[str, Any] | None = None


@dataclass
class DatasetConfig:
    """A dataset picked by format name (or path), split and options."""

    name: str = "shapes"
    split: str = "train"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where samples come from and how they are batched and prompted.

    ``batch_size`` is the global batch of one forward pass, summed over every process of the run; each
    process takes its share of it, so the samples, their order and the schedule do not depend on the
    number of processes (an optimizer step sees ``batch_size x grad_accum`` samples).
    ``feature_cache``: encode every image once with the frozen encoder and train from the stored tokens.
    """

    train: DatasetConfig = field(default_factory=DatasetConfig)
    validation: DatasetConfig | None = None
    batch_size: int = 16
    num_workers: int = 0
    feature_cache: bool = True
    max_text_length: int = 32
    caption_prompt: str = ""
    vqa_prompt: str = "Question: {} Answer:"
    vqa_prompt_encoder_decoder: str = "Question: {} Short answer:"


@dataclass
class StageConfig:
    """One training stage: steps counted in optimizer steps, AdamW with warmup and cosine decay.

    ``task_weights`` (e.g. ``{caption: 0.5, vqa: 0.5}``) sets each task's share of the samples seen by
    repeating the samples of rarer tasks; None keeps the dataset's own proportions. ``lr_scale`` (e.g.
    ``{projection: 30}``) multiplies ``lr`` and ``min_lr`` for the parameters of a component (bridge,
    projection, llm); the others train at ``lr``. ``projection_init`` (stage 2 only): ``lexical`` fits the
    projection's read-out by least squares, before the first step, so that the visual prefix spells each
    training image's caption in the LLM's token embeddings (docs/architecture.md); None keeps its
    initialisation.
    """

    steps: int = 1000
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    batch_size: int | None = None
    tasks: list[str] = field(default_factory=lambda: ["caption"])
    task_weights: dict[str, float] | None = None
    lr_scale: dict[str, float] | None = None
    projection_init: str | None = None


@dataclass
class DistributedConfig:
    """How several processes share a run (one process ignores it).

    ``strategy``: ``ddp`` replicates the model on every process; ``fsdp`` shards it (FSDP2 through
    accelerate, GPUs only). ``timeout_s``: how long a process waits for the others at a collective (the
    main process writing a checkpoint or scoring the validation split) before the run ends with an error.
    """

    strategy: str = "ddp"
    timeout_s: int = 1800


@dataclass
class GenerationConfig:
    """Caption generation defaults (BLIP-2's)."""

    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 5
    repetition_penalty: float = 1.5
    length_penalty: float = 1.0


@dataclass
class Recipe:
    """A whole training run."""

    name: str = "recipe"
    description: str = ""
    seed: int = 0
    output: str = "runs/{name}"
    encoder: ComponentConfig = field(default_factory=lambda: ComponentConfig("tiny-vit"))
    bridge: ComponentConfig = field(default_factory=lambda: ComponentConfig("qformer"))
    projection: ComponentConfig = field(default_factory=lambda: ComponentConfig("linear"))
    llm: ComponentConfig = field(default_factory=lambda: ComponentConfig("tiny-llama"))
    data: DataConfig = field(default_factory=DataConfig)
    stage1: StageConfig | None = None
    stage2: StageConfig | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    precision: str = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0
    keep_checkpoints: int = 1
    log_every: int = 10


_NESTED: dict[str, type] = {
    "encoder": ComponentConfig,
    "bridge": ComponentConfig,
    "projection": ComponentConfig,
    "llm": ComponentConfig,
    "data": DataConfig,
    "stage1": StageConfig,
    "stage2": StageConfig,
    "generation": GenerationConfig,
    "distributed": DistributedConfig,
    "train": DatasetConfig,
    "validation": DatasetConfig,
}
_FREE_FORM = {"options", "lora", "task_weights", "lr_scale"}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")
LR_SCALE_PARTS = ("bridge", "projection", "llm")
PROJECTION_INITS = ("lexical",)


def _build(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from ``data``, naming the first unknown key or mistyped value."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'recipe'}: expected a mapping, got {type(data).__name__} {data!r}")
    defaults = cls()
    kwargs: dict[str, Any] = {}
    known = {f.name: f for f in cls.__dataclass_fields__.values()}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in known:
            raise ConfigError(f"{where}: unknown key; {path or 'a recipe'} takes: {', '.join(known)}")
        if key in _FREE_FORM:
            if value is None and key != "options":
                kwargs[key] = None
            elif not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping of options, got {value!r}")
            else:
                kwargs[key] = dict(value)
        elif key in _NESTED:
            if isinstance(value, str) and "name" in _NESTED[key].__dataclass_fields__:
                value = {"name": value}
            if value is None and getattr(defaults, key) is not None:
                raise ConfigError(f"{where}: cannot be empty; set its keys or remove it with ~{where}")
            kwargs[key] = _build(_NESTED[key], value, where)
        else:
            kwargs[key] = _coerce(getattr(defaults, key), value, where)
    return cls(**kwargs)


def _coerce(default: Any, value: Any, where: str) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 3e-3 (no dot) as a string
            except ValueError:
                raise ConfigError(f"{where}: expected float, got {value!r}") from None
    elif isinstance(default, str):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(default)(value)
    raise ConfigError(f"{where}: expected {type(default).__name__}, got {value!r}")


def _check_positive_mapping(where: str, mapping: dict[str, Any] | None, allowed: Sequence[str], what: str) -> None:
    """Raise ConfigError unless every key of ``mapping`` is in ``allowed`` and every value a positive number."""
    values = mapping or {}
    if set(values) - set(allowed) or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in values.values()
    ):
        raise ConfigError(f"{where}: expected positive {what} among {', '.join(allowed)}, got {values}")


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Validate the shape of ``data`` (keys and value types) and build a Recipe."""
    recipe = _build(Recipe, data, "")
    if recipe.precision not in PRECISIONS:
        raise ConfigError(f"precision: expected one of {', '.join(PRECISIONS)}, got {recipe.precision!r}")
    if recipe.distributed.strategy not in STRATEGIES:
        raise ConfigError(
            f"distributed.strategy: expected one of {', '.join(STRATEGIES)}, got {recipe.distributed.strategy!r}"
        )
    if recipe.distributed.timeout_s < 1:
        raise ConfigError(f"distributed.timeout_s: must be at least 1 second, got {recipe.distributed.timeout_s}")
    if recipe.data.batch_size < 1:
        raise ConfigError(f"data.batch_size: must be at least 1, got {recipe.data.batch_size}")
    for stage_name in ("stage1", "stage2"):
        stage = getattr(recipe, stage_name)
        if stage is None:
            continue
        for key in ("steps", "grad_accum"):
            if getattr(stage, key) < 1:
                raise ConfigError(f"{stage_name}.{key}: must be at least 1, got {getattr(stage, key)}")
        if stage.lr <= 0 or stage.min_lr < 0 or stage.min_lr > stage.lr:
            raise ConfigError(f"{stage_name}: need 0 <= min_lr <= lr and lr > 0 (lr={stage.lr}, min_lr={stage.min_lr})")
        unknown = set(stage.tasks) - {"caption", "vqa"}
        if unknown or not stage.tasks:
            raise ConfigError(f"{stage_name}.tasks: expected a non-empty list of caption and/or vqa, got {stage.tasks}")
        _check_positive_mapping(f"{stage_name}.task_weights", stage.task_weights, stage.tasks, "numbers for tasks")
        _check_positive_mapping(f"{stage_name}.lr_scale", stage.lr_scale, LR_SCALE_PARTS, "multipliers for parts")
        if stage.projection_init is not None and (stage_name != "stage2" or stage.projection_init not in PROJECTION_INITS):
            raise ConfigError(
                f"{stage_name}.projection_init: expected {' or '.join(PROJECTION_INITS)} in stage2 only, "
                f"got {stage.projection_init!r}; remove the key to keep the projection's own initialisation"
            )
    if recipe.stage1 is None and recipe.stage2 is None:
        raise ConfigError("the recipe has no stage: set stage1 and/or stage2")
    if recipe.stage2 is not None and recipe.stage2.projection_init and recipe.projection.pretrained:
        raise ConfigError(
            "stage2.projection_init would overwrite the weights of projection.pretrained; "
            "remove one of the two (~stage2.projection_init keeps the pretrained projection)"
        )
    for part in ("encoder", "bridge", "projection", "llm"):
        component = getattr(recipe, part)
        allowed = ("full", "lora") if part == "bridge" else ("full",)
        if component.tuning not in allowed:
            raise ConfigError(f"{part}.tuning: expected one of {', '.join(allowed)}, got {component.tuning!r}")
        if component.lora is not None and part not in ("bridge", "llm"):
            raise ConfigError(f"{part}.lora: LoRA applies to the bridge (bridge.tuning=lora) and the llm only")
        if component.lora is not None:
            from blipkit.model.lora import LoraSettings

            settings = {k: v for k, v in component.lora.items() if k != "always_trainable"}
            try:
                LoraSettings(**settings)
            except TypeError as err:
                raise ConfigError(f"{part}.lora: {err}; LoRA takes r, alpha, dropout, target_modules, bias") from None
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """A plain dict (JSON/YAML-friendly) of ``recipe``."""

    def convert(value: Any) -> Any:
        if hasattr(value, "__dataclass_fields__"):
            return {k: convert(getattr(value, k)) for k in value.__dataclass_fields__}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(recipe)


def _parse_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` (YAML-typed value) and ``~a.b`` (remove) overrides to a recipe dict."""
    data = copy.deepcopy(data)
    for override in overrides:
        if override.startswith("~"):
            keys = override[1:].split(".")
            node = data
            for key in keys[:-1]:
                node = node.get(key) if isinstance(node, dict) else None
                if node is None:
                    break
            if isinstance(node, dict):
                node.pop(keys[-1], None)
            continue
        key_path, sep, raw = override.partition("=")
        if not sep or not key_path:
            raise ConfigError(f"override '{override}': expected key=value or ~key (e.g. stage2.steps=100)")
        keys = key_path.split(".")
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if isinstance(child, str):
                child = {"name": child}  # the shorthand encoder=NAME, extended by encoder.options=...
            elif not isinstance(child, dict):
                child = {}
            node[key] = child
            node = child
        node[keys[-1]] = _parse_value(raw)
    return data


def read_recipe_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML file into a dict, with one-line errors."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"recipe file {path} does not exist; list shipped recipes with: blipkit recipes ls") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {one_line(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
    return data


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load a shipped recipe by name, or a YAML file by path, and apply overrides."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        data = read_recipe_yaml(path)
    else:
        from blipkit.plugin_manager import registries

        entry = registries().recipes.resolve(name_or_path).entry
        data = read_recipe_yaml(entry.factory())
    return recipe_from_dict(apply_overrides(data, overrides or []))


_AUTO_OPTIONS = {"bridge": {"input_dim"}, "projection": {"input_dim", "output_dim"}}


def validate_recipe(recipe: Recipe) -> None:
    """Check every name against the registries and every option against its factory, loading no weights."""
    from blipkit.plugin_manager import registries

    regs = registries()
    parts = [("encoder", regs.encoders), ("bridge", regs.bridges)]
    if recipe.stage2 is not None:
        parts += [("projection", regs.bridges), ("llm", regs.llms)]
    for key, registry in parts:
        component: ComponentConfig = getattr(recipe, key)
        try:
            registry.resolve(component.name)
        except BlipkitError as err:
            raise ConfigError(f"{key}.name: {err}") from None
        auto = _AUTO_OPTIONS.get(key, set()) & set(component.options)
        if auto:
            raise ConfigError(f"{key}.options.{sorted(auto)[0]}: set by blipkit from the other parts; remove it")
        registry.check_kwargs(component.name, {**component.options, **{k: 0 for k in _AUTO_OPTIONS.get(key, ())}}, where=f"{key}.options")
        if component.pretrained and not Path(component.pretrained).exists():
            raise ConfigError(f"{key}.pretrained: {component.pretrained} does not exist")
    if recipe.stage2 is not None and recipe.stage2.projection_init:
        from blipkit.interfaces import Bridge

        factory = regs.bridges.resolve(recipe.projection.name).entry.factory
        if isinstance(factory, type) and issubclass(factory, Bridge) and factory.readout is Bridge.readout:
            raise ConfigError(
                f"stage2.projection_init: projection '{recipe.projection.name}' has no linear read-out to fit; "
                "use projection linear or mlp, or remove the key"
            )
    for split_key in ("train", "validation"):
        dataset: DatasetConfig | None = getattr(recipe.data, split_key)
        if dataset is None:
            continue
        try:
            regs.datasets.resolve(dataset.name)
        except BlipkitError as err:
            hint = f" (no such file or folder: {dataset.name})" if ("/" in dataset.name or "." in dataset.name) and not Path(dataset.name).exists() else ""
            raise ConfigError(f"data.{split_key}.name: {err}{hint}") from None
        regs.datasets.check_kwargs(dataset.name, {"split": dataset.split, **dataset.options}, where=f"data.{split_key}.options")
