"""Recipe schema, YAML loading, ``key=value`` / ``~key`` overrides and the checks of each value.

A recipe is data: which encoder, bridge, projection and LLM, which data, and the settings of each stage.
``~key`` removes a key so that it takes its schema default (stages and the validation split default to
off, so ``~stage1`` runs stage 2 alone).
"""

from __future__ import annotations

import copy
import math
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
    "recipe_with_parts",
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
    ``feature_cache``: encode every image once with the frozen encoder and train from the stored tokens;
    None (the default) means on for datasets held in memory and off for streaming ones, which are read
    once per epoch anyway. ``shuffle_buffer``: how many records a streaming dataset's reader shuffles
    among (per process and DataLoader worker). ``augment``: training-time image augmentation, any of
    ``crop`` (a random resized crop) and ``flip`` (left-right; not for captions that say left or right),
    applied when images are read (not with the feature cache, whose features are fixed).
    """

    train: DatasetConfig = field(default_factory=DatasetConfig)
    validation: DatasetConfig | None = None
    batch_size: int = 16
    num_workers: int = 0
    feature_cache: bool | None = None
    shuffle_buffer: int = 1000
    augment: list[str] = field(default_factory=list)
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
    projection, llm); the others train at ``lr``. ``projection_init`` (stages whose objective trains the
    projection): ``lexical`` fits the projection's read-out by least squares, before the first step, so
    that the visual prefix spells each training image's caption in the LLM's token embeddings
    (docs/architecture.md); None keeps its initialisation. ``objective`` names a registered training
    objective (``blipkit objectives``) and ``options`` go to its factory; ``name`` labels the stage in
    metrics, checkpoints and ``--resume`` (default ``stage<N>``). ``epochs`` instead of ``steps``: the
    steps are worked out from the samples of the stage's tasks when the run starts (not for streaming
    data, whose length is unknown), and recorded in the run's recipe.
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
    objective: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    epochs: float | None = None


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
    stages: list[StageConfig] = field(default_factory=list)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    precision: str = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0
    keep_checkpoints: int = 1
    log_every: int = 10
    max_skipped_steps: int = 10
    eval_every: int = 0
    eval_samples: int = 64
    log_with: list[str] = field(default_factory=list)

    def stage(self, name: str) -> StageConfig | None:
        """The stage called ``name``, or None."""
        return next((stage for stage in self.stages if stage.name == name), None)

    @property
    def stage1(self) -> StageConfig | None:
        """The stage the ``stage1:`` shorthand makes (BLIP-2's stage 1), or None."""
        return self.stage("stage1")

    @property
    def stage2(self) -> StageConfig | None:
        """The stage the ``stage2:`` shorthand makes (BLIP-2's stage 2), or None."""
        return self.stage("stage2")


_NESTED: dict[str, type] = {
    "encoder": ComponentConfig,
    "bridge": ComponentConfig,
    "projection": ComponentConfig,
    "llm": ComponentConfig,
    "data": DataConfig,
    "generation": GenerationConfig,
    "distributed": DistributedConfig,
    "train": DatasetConfig,
    "validation": DatasetConfig,
}
_FREE_FORM = {"options", "lora", "task_weights", "lr_scale"}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")
TRACKERS = ("tensorboard", "wandb", "mlflow")
LR_SCALE_PARTS = ("bridge", "projection", "llm")
PROJECTION_INITS = ("lexical",)
SHORTHAND_STAGES = {"stage1": "blip2-stage1", "stage2": "lm"}
"""``stage1:`` and ``stage2:`` in a recipe are stages named so, training these objectives by default."""


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


def _build_stages(listed: Any, shorthand: list[tuple[str, Any]]) -> list[StageConfig]:
    """The recipe's stages: the ``stages`` list, or the ``stage1``/``stage2`` shorthand (not both)."""
    if listed is not None and shorthand:
        raise ConfigError(f"{shorthand[0][0]}: a recipe lists its stages (stages: [...]) or uses stage1/stage2, not both")
    stages: list[StageConfig] = []
    for name, value in shorthand:
        if value is None:
            raise ConfigError(f"{name}: cannot be empty; set its keys or remove it with ~{name}")
        stage = _build(StageConfig, value, name)
        stage.name, stage.objective = name, stage.objective or SHORTHAND_STAGES[name]
        _one_length(value, name)
        stages.append(stage)
    if listed is not None and not isinstance(listed, list):
        raise ConfigError(f"stages: expected a list of stages, got {listed!r}")
    for index, value in enumerate(listed or []):
        stage = _build(StageConfig, value, f"stages.{index}")
        stage.name = stage.name or f"stage{index + 1}"
        _one_length(value, stage.name)
        if not stage.objective:
            raise ConfigError(f"stages.{index}.objective: name the objective this stage trains (list them with: blipkit objectives)")
        stages.append(stage)
    names = [stage.name for stage in stages]
    if len(set(names)) < len(names):
        raise ConfigError(f"stages: two stages are called {next(n for n in names if names.count(n) > 1)!r}; give each its own name")
    return stages


def _one_length(value: dict[str, Any], where: str) -> None:
    """A stage's length is ``steps`` or ``epochs``, not both."""
    if value.get("epochs") is not None and "steps" in value:
        raise ConfigError(f"{where}: set steps or epochs, not both (~{where}.steps keeps epochs)")


def _check_stage(stage: StageConfig) -> None:
    """Raise ConfigError for a stage's out-of-range settings, naming the key."""
    where = stage.name
    for key in ("steps", "grad_accum"):
        if getattr(stage, key) < 1:
            raise ConfigError(f"{where}.{key}: must be at least 1, got {getattr(stage, key)}")
    if stage.epochs is not None and not stage.epochs > 0:
        raise ConfigError(f"{where}.epochs: must be more than 0, got {stage.epochs}")
    if not (math.isfinite(stage.lr) and math.isfinite(stage.min_lr)) or stage.lr <= 0 or stage.min_lr < 0 or stage.min_lr > stage.lr:
        raise ConfigError(f"{where}: need 0 <= min_lr <= lr and lr > 0, both finite (lr={stage.lr}, min_lr={stage.min_lr})")
    if stage.warmup_steps < 0:
        raise ConfigError(f"{where}.warmup_steps: must be at least 0, got {stage.warmup_steps}")
    if stage.batch_size is not None and stage.batch_size < 1:
        raise ConfigError(f"{where}.batch_size: must be at least 1, got {stage.batch_size}")
    if not stage.tasks or not all(isinstance(task, str) and task for task in stage.tasks):
        raise ConfigError(f"{where}.tasks: expected a non-empty list of task names (caption, vqa, ...), got {stage.tasks}")
    accepted = _objective_tasks(stage.objective)
    if accepted is not None and set(stage.tasks) - accepted:
        raise ConfigError(
            f"{where}.tasks: objective '{stage.objective}' trains on {', '.join(sorted(accepted))}, "
            f"not {', '.join(sorted(set(stage.tasks) - accepted))}"
        )
    _check_positive_mapping(f"{where}.task_weights", stage.task_weights, stage.tasks, "numbers for tasks")
    _check_positive_mapping(f"{where}.lr_scale", stage.lr_scale, LR_SCALE_PARTS, "multipliers for parts")
    if stage.projection_init is not None and stage.projection_init not in PROJECTION_INITS:
        raise ConfigError(
            f"{where}.projection_init: expected {' or '.join(PROJECTION_INITS)}, got {stage.projection_init!r}; "
            "remove the key to keep the projection's own initialisation"
        )


def _objective_tasks(name: str) -> frozenset[str] | None:
    """The tasks a registered objective declares (None: any task, or an objective not registered here,
    which ``validate_recipe`` reports)."""
    from blipkit.plugin_manager import registries

    try:
        factory = registries().objectives.resolve(name).entry.factory
    except BlipkitError:
        return None
    return getattr(factory, "tasks", None)


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Validate the shape of ``data`` (keys and value types) and build a Recipe; ``stage1:``/``stage2:``
    become stages of that name."""
    rest = dict(data)
    shorthand = [(name, rest.pop(name)) for name in SHORTHAND_STAGES if name in rest]
    listed = rest.pop("stages", None)
    recipe = _build(Recipe, rest, "")
    recipe.stages = _build_stages(listed, shorthand)
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
    unknown = [name for name in recipe.data.augment if name not in ("crop", "flip")]
    if unknown:
        raise ConfigError(f"data.augment: unknown augmentation '{unknown[0]}'; choose among crop, flip")
    if recipe.data.augment and recipe.data.feature_cache:
        raise ConfigError("data.augment: cached features are computed once, unaugmented; set data.feature_cache=false")
    if recipe.data.shuffle_buffer < 1:
        raise ConfigError(f"data.shuffle_buffer: must be at least 1, got {recipe.data.shuffle_buffer}")
    for key in ("eval_every", "eval_samples"):
        if getattr(recipe, key) < (0 if key == "eval_every" else 1):
            raise ConfigError(f"{key}: must be {'0 or more' if key == 'eval_every' else 'at least 1'}, got {getattr(recipe, key)}")
    if recipe.eval_every and recipe.data.validation is None:
        raise ConfigError("eval_every: there is no data.validation split to score; add one or remove the key")
    unknown = [name for name in recipe.log_with if name not in TRACKERS]
    if unknown:
        raise ConfigError(f"log_with: unknown tracker '{unknown[0]}'; choose among {', '.join(TRACKERS)}")
    if recipe.max_skipped_steps < 1:
        raise ConfigError(f"max_skipped_steps: must be at least 1, got {recipe.max_skipped_steps}")
    for stage in recipe.stages:
        _check_stage(stage)
    if not recipe.stages:
        raise ConfigError("the recipe has no stage: set stage1 and/or stage2, or stages: [...]")
    fitted = next((stage for stage in recipe.stages if stage.projection_init), None)
    if fitted is not None and recipe.projection.pretrained:
        raise ConfigError(
            f"{fitted.name}.projection_init would overwrite the weights of projection.pretrained; "
            f"remove one of the two (~{fitted.name}.projection_init keeps the pretrained projection)"
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


def _list_index(node: list[Any], key: str) -> int:
    """The position in a list (``stages``) of the element that ``key`` names: its index, or the ``name`` it has."""
    if key.isdigit() and int(key) < len(node):
        return int(key)
    named = [i for i, item in enumerate(node) if isinstance(item, dict) and item.get("name") == key]
    if not named:
        raise ConfigError(f"override: no element '{key}' in a list of {len(node)}; use its index (0, 1, ...) or its name")
    return named[0]


def _list_item(node: list[Any], key: str) -> Any:
    """The element of a list (``stages``) that ``key`` names."""
    return node[_list_index(node, key)]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` (YAML-typed value) and ``~a.b`` (remove) overrides to a recipe dict; in a list
    such as ``stages``, an element is named by its index or its ``name`` (``stages.0.steps=10``,
    ``~stages.stage1``)."""
    data = copy.deepcopy(data)
    for override in overrides:
        if override.startswith("~"):
            keys = override[1:].split(".")
            node: Any = data
            for key in keys[:-1]:
                node = _list_item(node, key) if isinstance(node, list) else node.get(key) if isinstance(node, dict) else None
                if node is None:
                    break
            if isinstance(node, dict):
                node.pop(keys[-1], None)
            elif isinstance(node, list):
                del node[_list_index(node, keys[-1])]
            continue
        key_path, sep, raw = override.partition("=")
        if not sep or not key_path:
            raise ConfigError(f"override '{override}': expected key=value or ~key (e.g. stage2.steps=100)")
        keys = key_path.split(".")
        node = data
        for key in keys[:-1]:
            if isinstance(node, list):
                node = _list_item(node, key)
                continue
            child = node.get(key)
            if isinstance(child, str):
                child = {"name": child}  # the shorthand encoder=NAME, extended by encoder.options=...
            elif not isinstance(child, (dict, list)):
                child = {}
            node[key] = child
            node = child
        if isinstance(node, list):
            raise ConfigError(f"override '{override}': name a key inside the list element (e.g. stages.0.steps=10)")
        node[keys[-1]] = _parse_value(raw)
    return data


def read_recipe_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML file into a dict, with one-line errors."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"recipe file {path} does not exist; list shipped recipes with: blipkit recipes ls") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save the recipe as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {one_line(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
    return data


def _recipe_data(name_or_path: str) -> dict[str, Any]:
    """A shipped recipe (by name) or a YAML file (by path) as a dict."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        return read_recipe_yaml(path)
    from blipkit.plugin_manager import registries

    return read_recipe_yaml(registries().recipes.resolve(name_or_path).entry.factory())


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load a shipped recipe by name, or a YAML file by path, and apply overrides."""
    return recipe_from_dict(apply_overrides(_recipe_data(name_or_path), overrides or []))


PART_KEYS = {"encoder": ("encoder",), "llm": ("llm",), "bridge": ("bridge",), "data": ("data", "train")}
"""Where ``blipkit train --encoder/--llm/--bridge/--data`` put their names in a recipe."""


def recipe_with_parts(name: str | None, parts: dict[str, str | None], overrides: list[str] | None = None) -> Recipe:
    """The recipe ``blipkit train`` runs: ``name``, or with none the offline demo (``default``) when the
    ``parts`` it is given are the demo's own and BLIP-2's recipe (``blip2``) otherwise; each given part
    (``encoder``, ``llm``, ``bridge``, ``data``: names) replaces that whole section, options included
    (the demo's options belong to the demo's parts); then ``overrides`` apply."""
    given = {part: value for part, value in parts.items() if value}
    if name is None:
        demo = _recipe_data("default")
        own = all(_section(demo, PART_KEYS[part]).get("name") == value for part, value in given.items())
        name = "default" if own else "blip2"
    data = _recipe_data(name)
    for part, value in given.items():
        *parents, last = PART_KEYS[part]
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = {"name": value, **({"split": "train"} if part == "data" else {})}
    return recipe_from_dict(apply_overrides(data, overrides or []))


def _section(data: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    for key in keys:
        data = data.get(key) or {}
        if isinstance(data, str):
            return {"name": data}
    return data
