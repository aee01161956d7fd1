"""The recipe runner: stage 1 (Q-Former objectives, no LLM) then stage 2 (LM loss through the frozen LLM).

Written on accelerate's Accelerator (prepare, accumulate, backward, clip), so one CPU process and many
GPU processes run the same loop. Checkpoints are whole directories written under a temporary name and
renamed, then ``blipkit.json`` is atomically pointed at them: a crash never leaves a half-written
checkpoint as the current one.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from blipkit.config import Recipe, StageConfig
from blipkit.data.collate import Collator
from blipkit.data.feature_cache import CachedFeatureDataset, FeatureCache
from blipkit.errors import BlipkitError, ConfigError, DataError
from blipkit.io import atomic_write_text, cache_dir, read_json
from blipkit.pipeline import (
    META_FILE,
    VisionLanguageModel,
    add_language_model,
    build_model,
    load_weights,
    save_weights,
    write_meta,
)
from blipkit.train.feedback import CountProgress, StageProgress, plot_curves
from blipkit.train.lexical import LexicalFit, lexical_init
from blipkit.train.lora import has_lora
from blipkit.train.memory import reuse_freed_memory
from blipkit.train.optim import build_optimizer, build_scheduler, lr_at
from blipkit.train.state import load_trainer_state, restore_rng, save_trainer_state

__all__ = ["TrainResult", "open_dataset", "run_dir_for", "train"]

logger = logging.getLogger(__name__)
STAGES = ("stage1", "stage2")


@dataclass
class TrainResult:
    """Where the run went and how it ended."""

    run_dir: Path
    final: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    completed: bool = True
    feature_cache: Path | None = None
    validation: dict[str, dict[str, Any]] = field(default_factory=dict)
    projection_fit: LexicalFit | None = None


class BatchIndexSampler(Sampler[list[int]]):
    """Endless batches of dataset indices in a seeded order per epoch, starting at batch ``start``.

    The order depends only on (seed, epoch), so a resumed run sees exactly the batches the
    uninterrupted one would. Each process takes its own slice of every global batch.
    """

    def __init__(self, indices: list[int], batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
        if len(indices) < batch_size * world:
            raise DataError(
                f"only {len(indices)} usable samples for a global batch of {batch_size * world}; "
                "lower data.batch_size or add data"
            )
        self.indices = indices
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world = world
        self.per_epoch = len(indices) // (batch_size * world)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start, self.per_epoch)
        for current in itertools.count(epoch):
            order = torch.randperm(len(self.indices), generator=torch.Generator().manual_seed(self.seed * 100003 + current))
            global_size = self.batch_size * self.world
            for batch in range(offset if current == epoch else 0, self.per_epoch):
                chunk = order[batch * global_size : (batch + 1) * global_size]
                mine = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
                yield [self.indices[i] for i in mine.tolist()]


def run_dir_for(recipe: Recipe, output: str | Path | None) -> Path:
    """The run directory: ``output`` if given, else the recipe's ``output`` pattern."""
    return Path(output) if output else Path(recipe.output.format(name=recipe.name))


def open_dataset(name: str, split: str, options: dict[str, Any]) -> Any:
    """Build a dataset through the dataset registry (a format name, ``prefix:source`` or a path)."""
    from blipkit.plugin_manager import registries

    return registries().datasets.create(name, split=split, **options)


def _precision(recipe: Recipe) -> str:
    if recipe.precision == "fp32" or not torch.cuda.is_available():
        return "no"
    if recipe.precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return recipe.precision


def stage_indices(dataset: Any, tasks: list[str], weights: dict[str, float] | None = None) -> list[int]:
    """Dataset indices a stage samples from; with ``weights``, rarer tasks' indices repeat to give each task
    (approximately) its weight's share."""
    by_task = {task: [i for i, record in enumerate(dataset.records) if record.task == task] for task in tasks}
    present = {task: found for task, found in by_task.items() if found}
    if not present:
        raise DataError(f"dataset '{dataset.name}' has no samples for tasks {tasks}; it has {sorted(dataset.tasks)}")
    if not weights:
        return sorted(i for found in present.values() for i in found)
    total = sum(weights.get(task, 0.0) for task in present)
    if total <= 0:
        raise DataError(f"task_weights {weights} give no weight to the tasks present: {sorted(present)}")
    # Size of the mixture: the smallest that keeps every sample of every weighted task at least once.
    size = max(len(found) / (weights.get(task, 0.0) / total) for task, found in present.items() if weights.get(task, 0.0) > 0)
    indices: list[int] = []
    for task, found in present.items():
        share = round(size * weights.get(task, 0.0) / total)
        indices += [found[k % len(found)] for k in range(share)]
    return indices


class _Checkpointer:
    """Writes step directories under run/checkpoints and points blipkit.json at the newest."""

    def __init__(self, run_dir: Path, recipe: Recipe, keep: int) -> None:
        self.run_dir = run_dir
        self.recipe = recipe
        self.keep = max(1, keep)

    def save(self, model: VisionLanguageModel, optimizer: Any, scheduler: Any, progress: dict[str, Any]) -> str:
        name = f"{progress['stage']}-step-{progress['step']:07d}"
        final = self.run_dir / "checkpoints" / name
        staging = self.run_dir / "checkpoints" / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        save_weights(model, staging)
        save_trainer_state(staging / "trainer_state", optimizer, scheduler, progress)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        relative = f"checkpoints/{name}"
        write_meta(self.run_dir, self.recipe, checkpoint=relative, progress=progress)
        self._prune(keep_name=name)
        return relative

    def _prune(self, keep_name: str) -> None:
        folder = self.run_dir / "checkpoints"
        done = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
        for old in done[: -self.keep]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)


def _resume_point(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    meta_file = run_dir / META_FILE
    if not meta_file.exists():
        raise BlipkitError(f"cannot resume: {run_dir} holds no run ({META_FILE} missing); start one with: blipkit train")
    meta = read_json(meta_file)
    progress = meta.get("progress")
    if progress is None:
        return None
    return progress, run_dir / meta["checkpoint"]


def _trim_metrics(path: Path, progress: dict[str, Any]) -> None:
    """Drop metric lines logged after the checkpoint a run resumes from."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row["stage"] in progress["completed"] or (row["stage"] == progress["stage"] and row["step"] <= progress["step"]):
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def train(
    recipe: Recipe,
    output: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    quiet: bool = False,
) -> TrainResult:
    """Run the recipe's stages and write the run directory; ``stop_after`` optimizer steps ends early."""
    with reuse_freed_memory(enabled=not torch.cuda.is_available()):
        return _train(recipe, output, resume, overwrite, stop_after, quiet)


def _train(
    recipe: Recipe, output: str | Path | None, resume: bool, overwrite: bool, stop_after: int | None, quiet: bool
) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    run_dir = run_dir_for(recipe, output)
    resume_from = None
    if resume:
        resume_from = _resume_point(run_dir)
    elif (run_dir / META_FILE).exists():
        if not overwrite:
            raise BlipkitError(
                f"{run_dir} already holds a run: continue it with --resume, replace it with --overwrite, "
                "or choose another --output"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is None:
        write_meta(run_dir, recipe, checkpoint=".")

    accelerator = Accelerator(
        mixed_precision=_precision(recipe),
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(recipe.seed)
    quiet = quiet or not accelerator.is_main_process
    dataset = open_dataset(recipe.data.train.name, recipe.data.train.split, recipe.data.train.options)
    checkpointer = _Checkpointer(run_dir, recipe, recipe.keep_checkpoints)
    completed: list[str] = []
    result = TrainResult(run_dir)
    budget = stop_after

    if resume_from is not None:
        progress, checkpoint = resume_from
        completed = list(progress["completed"])
        _trim_metrics(run_dir / "metrics.jsonl", progress)

    model = build_model(recipe, with_llm=False)
    model.to(accelerator.device)
    training_data: Any = dataset
    if recipe.data.feature_cache:
        training_data = cached_features(model, dataset, quiet=quiet)
        result.feature_cache = training_data.cache.path
    for stage_name in STAGES:
        stage = getattr(recipe, stage_name)
        if stage is None or stage_name in completed:
            continue
        if stage_name == "stage1" and not model.bridge.supports_stage1:
            logger.info("bridge '%s' has no stage-1 objective: skipping stage 1", recipe.bridge.name)
            continue
        if stage_name == "stage2":
            add_language_model(model, recipe)
        start_step = 0
        state = None
        if resume_from is not None:
            progress, checkpoint = resume_from
            load_weights(model, checkpoint)
            if progress["stage"] == stage_name:
                state = load_trainer_state(checkpoint / "trainer_state")
                start_step = progress["step"]
        if stage_name == "stage2" and stage.projection_init == "lexical" and state is None:
            result.projection_fit = lexical_init(model, training_data, recipe, quiet=quiet)
        steps_done, final = _run_stage(
            accelerator, model, training_data, recipe, stage_name, stage, start_step, state, checkpointer, completed, budget, quiet
        )
        result.final[stage_name] = final
        if budget is not None:
            budget -= steps_done - start_step
        if steps_done < stage.steps:
            result.completed = False
            break
        completed.append(stage_name)
        resume_from = None
        if recipe.data.validation is not None and accelerator.is_main_process:
            result.validation[stage_name] = validate(model, recipe, stage_name, run_dir, quiet)

    if result.completed:
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        _remember_last_run(run_dir)
    result.skipped = dict(training_data.skipped)
    return result


def validate(model: VisionLanguageModel, recipe: Recipe, stage_name: str, run_dir: Path, quiet: bool) -> dict[str, Any]:
    """Score the model on the validation split after a stage: retrieval after stage 1, captions and VQA
    after stage 2 (greedy decoding); predictions go to run/eval-validation/<stage>/, scores to metrics.jsonl."""
    from blipkit.eval.evaluate import evaluate, write_results

    split = recipe.data.validation
    dataset = open_dataset(split.name, split.split, split.options)
    if recipe.data.feature_cache:
        dataset = cached_features(model, dataset, quiet=quiet)
    tasks = ["retrieval"] if stage_name == "stage1" else [t for t in ("caption", "vqa") if t in dataset.tasks]
    scores: dict[str, Any] = {}
    model.eval()
    for task in tasks:
        outcome = evaluate(model, dataset, task, generation={"num_beams": 1})
        write_results(outcome, run_dir / "eval-validation" / stage_name)
        scores.update({f"{task}/{k}": v for k, v in outcome.scores.items() if isinstance(v, (int, float))})
    row = {"stage": stage_name, "step": getattr(recipe, stage_name).steps, "split": split.split, **scores}
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    return scores


def cached_features(model: VisionLanguageModel, dataset: Any, quiet: bool = False, batch_size: int = 32) -> CachedFeatureDataset:
    """Encode every image of ``dataset`` not yet in the feature cache, and view the dataset through it."""
    encoder = model.encoder
    cache = FeatureCache(encoder.cache_key)

    def encode(images: list[Any]) -> torch.Tensor:
        return model.image_tokens(torch.stack([encoder.preprocess(image) for image in images]))

    with CountProgress("encoding images", len(dataset.records), quiet=quiet) as bar:
        keys = cache.fill(dataset.records, encode, batch_size=batch_size, progress=bar.advance)
    return CachedFeatureDataset(dataset, cache, keys)


def _remember_last_run(run_dir: Path) -> None:
    try:
        atomic_write_text(cache_dir() / "last-run", str(run_dir.resolve()))
    except OSError as err:
        logger.warning("could not record the last run in %s: %s", cache_dir(), err)


def _run_stage(
    accelerator: Any,
    model: VisionLanguageModel,
    dataset: Any,
    recipe: Recipe,
    stage_name: str,
    stage: StageConfig,
    start_step: int,
    state: dict[str, Any] | None,
    checkpointer: _Checkpointer,
    completed: list[str],
    budget: int | None,
    quiet: bool,
) -> tuple[int, dict[str, float]]:
    accelerator.gradient_accumulation_steps = stage.grad_accum
    accelerator.step = 0
    trainable = {part: m for part, m in (("bridge", model.bridge), ("projection", model.projection)) if m is not None}
    for module in trainable.values():
        if not has_lora(module):
            module.requires_grad_(True)
    if model.llm is not None and has_lora(model.llm.model):
        trainable["llm"] = model.llm
    if recipe.gradient_checkpointing:
        # The LLM's activations dominate memory; the wrapped transformers model knows how to recompute them.
        inner = getattr(model.llm, "model", None)
        if hasattr(inner, "activation_checkpointing_enable"):
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(inner, "gradient_checkpointing_enable"):
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif stage_name == "stage2":
            raise ConfigError("gradient_checkpointing: this language model does not support it; remove the key")
    optimizer = build_optimizer(trainable, stage)
    scheduler = build_scheduler(optimizer, stage)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    wrapped, optimizer = accelerator.prepare(model, optimizer)

    batch_size = stage.batch_size or recipe.data.batch_size
    llm = model.llm
    collator = Collator(
        stage_name,
        model.encoder.preprocess,
        bridge_tokenize=getattr(model.bridge, "tokenize", None),
        llm_tokenize=llm.tokenize if llm is not None else None,
        caption_prompt=recipe.data.caption_prompt,
        vqa_prompt=model.vqa_prompt,
        max_text_length=recipe.data.max_text_length,
        prefix_lm=bool(llm is not None and llm.is_encoder_decoder),
    )
    sampler = BatchIndexSampler(
        stage_indices(dataset, stage.tasks, stage.task_weights),
        batch_size,
        seed=recipe.seed + (0 if stage_name == "stage1" else 1),
        start=start_step * stage.grad_accum,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
    )
    loader = iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=recipe.data.num_workers))
    if state is not None:
        # After the loader: starting its iterator draws from the global generator.
        restore_rng(*state["rng"])
    end = stage.steps if budget is None else min(stage.steps, start_step + max(0, budget))
    params = [p for m in trainable.values() for p in m.parameters() if p.requires_grad]
    metrics_path = checkpointer.run_dir / "metrics.jsonl"
    final: dict[str, float] = {}
    wrapped.train()
    with StageProgress(stage_name, stage.steps, start_step, quiet=quiet) as bar:
        for step in range(start_step, end):
            started = time.perf_counter()
            sums: dict[str, float] = {}
            samples = 0
            for _ in range(stage.grad_accum):
                batch = next(loader)
                while not batch.get("size"):
                    batch = next(loader)
                with accelerator.accumulate(wrapped):
                    losses = wrapped(batch, stage_name)
                    accelerator.backward(losses["loss"])
                    if accelerator.sync_gradients and stage.grad_clip > 0:
                        accelerator.clip_grad_norm_(params, stage.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach()) / stage.grad_accum
                samples += batch["size"]
            lr = lr_at(step, stage)
            scheduler.step()
            elapsed = time.perf_counter() - started
            final = {**sums, "lr": lr, "samples_per_s": samples * accelerator.num_processes / elapsed}
            if accelerator.is_main_process and ((step + 1) % recipe.log_every == 0 or step + 1 == stage.steps):
                row = {"stage": stage_name, "step": step + 1, **{k: round(v, 6) for k, v in final.items()}}
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
            bar.update(step + 1, final)
            done = step + 1
            at_interval = recipe.checkpoint_every and done % recipe.checkpoint_every == 0
            if accelerator.is_main_process and (at_interval or done == end):
                progress = {"stage": stage_name, "step": done, "completed": list(completed),
                            "consumed": done * stage.grad_accum}
                checkpointer.save(model, optimizer, scheduler, progress)
    if start_step >= end:
        return start_step, final
    return end, final
