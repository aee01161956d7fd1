"""The recipe runner: stage 1 (Q-Former objectives, no LLM) then stage 2 (LM loss through the frozen LLM).

Written on accelerate's Accelerator (prepare, accumulate, backward, clip), so one CPU process and many
GPU processes run the same loop. Every process of a run executes this code; the main process alone
creates and writes the run directory, draws progress and prints, while the others wait for it. Each
process's loss is weighted by its share of the global batch's items (rows in stage 1, target tokens in
stage 2), so N processes, or N micro-batches of gradient accumulation, compute the gradient that one
process computes over the whole batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from blipkit.config import SHORTHAND_STAGES, Recipe, StageConfig
from blipkit.data.augment import AugmentedDataset
from blipkit.data.dataset import CORRUPT_IMAGE, open_dataset
from blipkit.data.stream import StreamBatches
from blipkit.distributed import Ranks
from blipkit.errors import ConfigError, NonFiniteError, PeerLostError, one_line
from blipkit.features import cached_features
from blipkit.interfaces import Objective
from blipkit.io import read_json
from blipkit.locks import DirectoryLock
from blipkit.model.build import add_language_model, build_model
from blipkit.model.lora import has_lora
from blipkit.model.persistence import META_FILE, checkpoint_dir, load_weights, remember_last_run, write_meta
from blipkit.model.vlm import VisionLanguageModel
from blipkit.plugin_manager import registries
from blipkit.train.checkpoint import Checkpointer, ResumePoint, append_metrics, open_run_dir
from blipkit.train.feedback import StageProgress, plot_curves
from blipkit.train.lexical import LexicalFit
from blipkit.train.memory import reuse_freed_memory
from blipkit.train.plan import parameters_line, run_plan
from blipkit.train.optim import build_optimizer, build_scheduler, lr_at
from blipkit.train.processes import (
    frozen_dtype,
    load_whole_optimizer_state,
    main_first,
    make_accelerator,
    peer_lost,
    ranks_of,
)
from blipkit.train.sampling import BatchIndexSampler, stage_indices
from blipkit.train.state import load_trainer_state, restore_rng, rng_state
from blipkit.train.tracking import check_trackers, start_trackers, tracker_dir
from blipkit.train.validation import score, validation_loss, validation_tasks

__all__ = ["TrainResult", "run_dir_for", "train"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Where the run went and how it ended; ``is_main`` tells the process that reports it."""

    run_dir: Path
    final: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    completed: bool = True
    feature_cache: Path | None = None
    validation: dict[str, dict[str, Any]] = field(default_factory=dict)
    prepared: dict[str, Any] = field(default_factory=dict)
    is_main: bool = True
    processes: int = 1

    @property
    def projection_fit(self) -> LexicalFit | None:
        """The lexical warm start's fit, when a stage ran one."""
        return next((report for report in self.prepared.values() if isinstance(report, LexicalFit)), None)


def run_dir_for(recipe: Recipe, output: str | Path | None) -> Path:
    """The run directory: ``output`` if given, else the recipe's ``output`` pattern."""
    return Path(output) if output else Path(recipe.output.format(name=recipe.name))


def train(
    recipe: Recipe,
    output: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    quiet: bool = False,
    report: Callable[[str], None] | None = None,
) -> TrainResult:
    """Run the recipe's stages and write the run directory; ``stop_after`` optimizer steps ends early.
    ``report`` receives the plan before training and each stage's parts as it starts (main process only).

    Under a launcher (``blipkit train --processes N``, ``accelerate launch``, ``torchrun``) every process
    calls this and each returns a TrainResult; the one with ``is_main`` reports.
    """
    with reuse_freed_memory(enabled=not torch.cuda.is_available()):
        check_trackers(recipe.log_with)
        run_dir = run_dir_for(recipe, output)
        accelerator = make_accelerator(recipe, tracker_dir(run_dir))
        ranks = ranks_of(accelerator)
        try:
            trainer = _Trainer(accelerator, ranks, recipe, run_dir, quiet or not ranks.is_main, report)
            return trainer.run(resume, overwrite, stop_after)
        except Exception as err:
            if peer_lost(err, ranks):
                raise PeerLostError(
                    f"another process of this run stopped ({one_line(err)[:160]}); every process ends here. "
                    f"Continue with: blipkit train --resume {run_dir} --processes {ranks.world}"
                ) from None
            raise


class _Trainer:
    """One run of a recipe on this process."""

    def __init__(self, accelerator: Any, ranks: Ranks, recipe: Recipe, run_dir: Path, quiet: bool,
                 report: Callable[[str], None] | None) -> None:
        self.accelerator = accelerator
        self.ranks = ranks
        self.recipe = recipe
        self.run_dir = run_dir
        self.quiet = quiet
        self.checkpointer = Checkpointer(run_dir, recipe, recipe.keep_checkpoints, ranks)
        self.result = TrainResult(run_dir, is_main=ranks.is_main, processes=ranks.world)
        self._report = report if ranks.is_main else None
        self.validation_data: Any = None

    def report(self, text: str) -> None:
        """Say ``text`` to the user (main process, when asked to)."""
        if self._report is not None:
            self._report(text)

    def run(self, resume: bool, overwrite: bool, stop_after: int | None) -> TrainResult:
        """Open the run directory (locked while training), then train every stage not yet completed."""
        recipe, ranks = self.recipe, self.ranks
        lock = DirectoryLock(self.run_dir, "training")

        def open_locked() -> ResumePoint | None:
            lock.acquire()
            try:
                return open_run_dir(self.run_dir, recipe, resume, overwrite)
            except BaseException:
                lock.release()
                raise

        resume_from: ResumePoint | None = main_first(ranks, open_locked)
        try:
            return self._run(resume_from, stop_after)
        finally:
            self.accelerator.end_training()
            if ranks.is_main:
                lock.release()

    def _run(self, resume_from: ResumePoint | None, stop_after: int | None) -> TrainResult:
        from accelerate.utils import set_seed

        recipe, ranks = self.recipe, self.ranks
        set_seed(recipe.seed)
        completed = list(resume_from[0]["completed"]) if resume_from else []
        dataset = open_dataset(recipe.data.train.name, recipe.data.train.split, recipe.data.train.options)
        with self.accelerator.main_process_first():
            # The first load may download or convert weights into a cache the others then read.
            model = build_model(recipe, with_llm=False, frozen_dtype=frozen_dtype(self.accelerator))
        model.to(self.accelerator.device)
        if resume_from is None:
            self._resolve_epochs(dataset)
        start_trackers(self.accelerator, recipe)
        training_data: Any = dataset
        cached = _use_cache(recipe, dataset)
        self.report(run_plan(recipe, self.run_dir, dataset, ranks.world, cached))
        if cached:
            training_data = cached_features(model, dataset, quiet=self.quiet, ranks=ranks, report=self.report)
            self.result.feature_cache = training_data.cache.path
        validation_data = self.validation_data = self._validation_data(model)
        budget = stop_after
        for number, stage in enumerate(recipe.stages):
            if stage.name in completed:
                continue
            objective = registries().objectives.create(stage.objective, **stage.options)
            if not objective.applies_to(model):
                logger.info("bridge '%s' cannot train with objective '%s': skipping %s", recipe.bridge.name, stage.objective, stage.name)
                continue
            steps_done, start = self._stage(model, training_data, stage, objective, _seed_offset(stage, number),
                                            resume_from, completed, budget)
            if budget is not None:
                budget -= steps_done - start
            if steps_done < stage.steps:
                self.result.completed = False
                break
            completed.append(stage.name)
            resume_from = None
            if _is_sharded(self.accelerator):
                model = self._unsharded(with_llm=model.llm is not None)
            if validation_data is not None:
                self._validate(model, validation_data, stage, objective)
        self._finish(training_data)
        return self.result

    def _stage(self, model: VisionLanguageModel, data: Any, stage: StageConfig, objective: Objective, number: int,
               resume_from: ResumePoint | None, completed: list[str], budget: int | None) -> tuple[int, int]:
        """Build, restore, prepare and train one stage; returns (steps done, step it started from)."""
        _follow_main_rng(self.ranks)
        if objective.uses_language_model and model.llm is None:
            with self.accelerator.main_process_first():
                add_language_model(model, self.recipe, frozen_dtype=frozen_dtype(self.accelerator))
        start_step, state = 0, None
        if resume_from is not None:
            progress, checkpoint = resume_from
            load_weights(model, checkpoint)
            if progress["stage"] == stage.name:
                state = load_trainer_state(checkpoint / "trainer_state", rank=self.ranks.rank)
                start_step = progress["step"]
        if state is None:
            report = objective.prepare(model, data, self.recipe, stage, self.quiet)
            if report is not None:
                self.result.prepared[stage.name] = report
            if self.ranks.rank > 0:
                _decorrelate(self.recipe.seed, self.ranks.rank, number)
        loop = _StageLoop(self, model, data, stage, objective, number)
        steps_done, final = loop.run(start_step, state, completed, budget)
        self.result.final[stage.name] = final
        self.accelerator.free_memory()
        return steps_done, start_step

    def _resolve_epochs(self, dataset: Any) -> None:
        """Turn each stage's ``epochs`` into steps over the samples of its tasks, and record them in the run's
        recipe, so that a resumed run keeps the same schedule."""
        stages = [stage for stage in self.recipe.stages if stage.epochs is not None]
        if not stages:
            return
        if getattr(dataset, "streaming", False):
            raise ConfigError(f"{stages[0].name}.epochs: the length of streaming data is unknown; give steps instead")
        for stage in stages:
            samples = len(stage_indices(dataset, stage.tasks, stage.task_weights))
            per_step = (stage.batch_size or self.recipe.data.batch_size) * stage.grad_accum
            stage.steps, stage.epochs = max(1, math.ceil(stage.epochs * samples / per_step)), None
        if self.ranks.is_main:
            write_meta(self.run_dir, self.recipe, checkpoint=".")

    def _unsharded(self, with_llm: bool) -> VisionLanguageModel:
        """The model rebuilt whole from the checkpoint just written: FSDP leaves the trained parts sharded in
        place, and the next stage, validation and saving need them whole."""
        checkpoint = checkpoint_dir(self.run_dir, read_json(self.run_dir / META_FILE))
        with torch.random.fork_rng(devices=[]):
            model = build_model(self.recipe, with_llm=with_llm, frozen_dtype=frozen_dtype(self.accelerator))
        load_weights(model, checkpoint)
        return model.to(self.accelerator.device)

    def _validation_data(self, model: VisionLanguageModel) -> Any:
        split = self.recipe.data.validation
        if split is None:
            return None
        dataset = open_dataset(split.name, split.split, split.options)
        if getattr(dataset, "streaming", False):
            raise ConfigError(
                f"data.validation: '{split.name}' streams, and validation scores a split held in memory; "
                "give a map-style dataset (a JSON, a folder, shapes) or remove the key"
            )
        if _use_cache(self.recipe, dataset):
            dataset = cached_features(model, dataset, quiet=self.quiet, ranks=self.ranks)
        return dataset

    def _validate(self, model: VisionLanguageModel, dataset: Any, stage: StageConfig, objective: Objective) -> None:
        """Score the whole validation split after a stage on the main process while the others wait;
        predictions go to run/eval-validation/<stage>/, scores to metrics.jsonl."""
        if self.ranks.is_main:
            scores = score(model, dataset, validation_tasks(objective, dataset), self.run_dir / "eval-validation" / stage.name)
            self.result.validation[stage.name] = scores
            self.record({"stage": stage.name, "step": stage.steps, "split": dataset.split, **scores})
        self.ranks.barrier()

    def record(self, row: dict[str, Any], step: int | None = None) -> None:
        """Add a metric row to metrics.jsonl and the trackers (main process); ``step`` counts over all stages."""
        if not self.ranks.is_main:
            return
        append_metrics(self.run_dir, row)
        if self.recipe.log_with:
            values = {f"{row['stage']}/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(values, step=step if step is not None else self.global_step(row["stage"], row["step"]))

    def global_step(self, stage_name: str, step: int) -> int:
        """``step`` of stage ``stage_name`` counted from the first stage's first step."""
        names = [stage.name for stage in self.recipe.stages]
        return sum(stage.steps for stage in self.recipe.stages[: names.index(stage_name)]) + step

    def _finish(self, training_data: Any) -> None:
        self.result.skipped = _skipped_everywhere(training_data, self.ranks)
        if self.result.completed and self.ranks.is_main:
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
            remember_last_run(self.run_dir)


def _skipped_everywhere(data: Any, ranks: Ranks) -> dict[str, int]:
    """The samples the run skipped, over every process: what the dataset found when it was built (the same
    on each) and the images any process found unreadable when it loaded them."""
    if getattr(data, "streaming", False):
        # Each process reads records no other reads, so their counts add up.
        total: Counter[str] = Counter()
        for counts in ranks.gather_objects(dict(data.skipped)):
            total.update(counts)
        return {reason: count for reason, count in total.items() if count}
    dataset = getattr(data, "dataset", data)
    skipped = Counter(data.skipped)
    mine = getattr(dataset, "unreadable", frozenset())
    everywhere = frozenset().union(*ranks.gather_objects(mine))
    skipped[CORRUPT_IMAGE] += len(everywhere) - len(mine)
    return {reason: count for reason, count in skipped.items() if count}


def _use_cache(recipe: Recipe, dataset: Any) -> bool:
    """Whether to train from cached features: the recipe's choice, else yes unless the dataset streams."""
    streaming = getattr(dataset, "streaming", False)
    if recipe.data.feature_cache and streaming:
        raise ConfigError(
            f"data.feature_cache: dataset '{dataset.name}' streams; the cache needs a dataset held in memory. "
            "Remove the key (streaming data is read without it), or fill the cache from a map-style copy"
        )
    if recipe.data.feature_cache is None:
        return not (streaming or recipe.data.augment)
    return recipe.data.feature_cache


def _seed_offset(stage: StageConfig, number: int) -> int:
    """What a stage adds to the recipe's seed: its place among the stages, where the stage1/stage2 shorthand
    keeps its own (so stage 2 alone orders its data as it does after stage 1)."""
    return list(SHORTHAND_STAGES).index(stage.name) if stage.name in SHORTHAND_STAGES else number


def _is_sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _follow_main_rng(ranks: Ranks) -> None:
    """Give every process the main process's random state, so that the parts built next (random
    initialisations) are the same everywhere, and the main process draws as it would alone."""
    if ranks.active:
        restore_rng(*ranks.broadcast_object(rng_state()))


def _decorrelate(seed: int, rank: int, stage_number: int) -> None:
    """Seed process ``rank`` (> 0) apart from the others for a stage's training (dropout, ITM negatives)."""
    from accelerate.utils import set_seed

    set_seed(seed + 1_000_003 * rank + 7919 * stage_number)


class _StageLoop:
    """The optimizer-step loop of one stage on this process."""

    def __init__(self, trainer: _Trainer, model: VisionLanguageModel, data: Any, stage: StageConfig, objective: Objective,
                 number: int) -> None:
        self.trainer = trainer
        self.accelerator = trainer.accelerator
        self.ranks = trainer.ranks
        self.recipe = trainer.recipe
        self.model = model
        self.data = data
        self.stage_name = stage.name
        self.stage = stage
        self.objective = objective
        self.number = number
        self.skipped = 0
        self.skipped_in_row = 0
        self.stream_positions: dict[int, dict[str, Any]] = {}

    def run(self, start_step: int, state: dict[str, Any] | None, completed: list[str], budget: int | None) -> tuple[int, dict[str, float]]:
        """Train from ``start_step`` to the stage's end (or ``budget`` steps); returns (steps done, last metrics)."""
        stage, accelerator = self.stage, self.accelerator
        accelerator.gradient_accumulation_steps = stage.grad_accum
        accelerator.step = 0
        trainable = _trainable_parts(self.model, self.objective, self.recipe.gradient_checkpointing)
        self.trainer.report(parameters_line(self.stage_name, trainable, self.model))
        optimizer = build_optimizer(trainable, stage)
        scheduler = build_scheduler(optimizer, stage)
        wrapped, optimizer = accelerator.prepare(self.model, optimizer)
        consumed = start_step * stage.grad_accum
        if state is not None:
            load_whole_optimizer_state(optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state["scaler"] is not None and accelerator.scaler is not None:
                accelerator.scaler.load_state_dict(state["scaler"])
            consumed = state["progress"].get("consumed", consumed)
        positions = None
        if state is not None and "stream" in state["progress"]:
            positions = {int(slot): position for slot, position in state["progress"]["stream"].items()}
        loader = self._loader(consumed, positions)
        if state is not None:
            # After the loader: starting its iterator draws from the global generator.
            if state["rng"] is not None:
                restore_rng(*state["rng"])
            else:
                _decorrelate(self.recipe.seed + start_step, self.ranks.rank, self.number)
        end = stage.steps if budget is None else min(stage.steps, start_step + max(0, budget))
        params = [p for m in trainable.values() for p in m.parameters() if p.requires_grad]
        final: dict[str, float] = {}
        wrapped.train()
        with StageProgress(self.stage_name, stage.steps, start_step, quiet=self.trainer.quiet) as bar:
            for step in range(start_step, end):
                final, drawn = self._step(wrapped, optimizer, loader, params, step)
                consumed += drawn
                scheduler.step()
                self._log(step + 1, final)
                bar.update(step + 1, final)
                done = step + 1
                if self.recipe.eval_every and (done % self.recipe.eval_every == 0 or done == stage.steps):
                    self._evaluate(done)
                if (self.recipe.checkpoint_every and done % self.recipe.checkpoint_every == 0) or done == end:
                    progress = {"stage": self.stage_name, "step": done, "completed": list(completed), "consumed": consumed}
                    if getattr(self.data, "streaming", False):
                        progress["stream"] = self._all_stream_positions()
                    self.trainer.checkpointer.save(self.model, optimizer, scheduler, progress, accelerator.scaler)
        return max(start_step, end), final

    def _loader(self, consumed: int, positions: dict[int, dict[str, Any]] | None) -> Any:
        """Batches of this process's share: sampled from a dataset in memory from ``consumed`` global batches
        on, or read from a streaming dataset from each reader's saved ``positions``."""
        recipe, stage = self.recipe, self.stage
        collator = self.objective.collator(self.model, recipe)
        batch_size = stage.batch_size or recipe.data.batch_size
        pin = self.accelerator.device.type == "cuda"
        if getattr(self.data, "streaming", False):
            if stage.task_weights:
                raise ConfigError(f"{self.stage_name}.task_weights: a streaming dataset is read as it comes; remove the key")
            if recipe.data.augment:
                raise ConfigError("data.augment: streaming data is not augmented yet; remove the key")
            rows = (self.ranks.rank + 1) * batch_size // self.ranks.world - self.ranks.rank * batch_size // self.ranks.world
            batches = StreamBatches(self.data, stage.tasks, rows, collator, recipe.seed + self.number, self.ranks.rank,
                                    self.ranks.world, recipe.data.num_workers, recipe.data.shuffle_buffer, positions)
            return iter(DataLoader(batches, batch_size=None, num_workers=recipe.data.num_workers, pin_memory=pin))
        augment = bool(recipe.data.augment)
        sampler = BatchIndexSampler(
            stage_indices(self.data, stage.tasks, stage.task_weights),
            batch_size,
            seed=recipe.seed + self.number,
            start=consumed,
            rank=self.ranks.rank,
            world=self.ranks.world,
            with_epoch=augment,
        )
        data = AugmentedDataset(self.data, recipe.data.augment, recipe.seed + self.number) if augment else self.data
        return iter(DataLoader(data, batch_sampler=sampler, collate_fn=collator, num_workers=recipe.data.num_workers,
                               pin_memory=pin))

    def _draw(self, loader: Any) -> tuple[dict[str, Any], int]:
        """The next micro-batch every process can use, and how many were drawn to find it: one that came
        out empty on any process (every image unreadable) is passed over by all of them together."""
        drawn = 0
        while True:
            batch = next(loader)
            drawn += 1
            if "stream_slot" in batch:
                self.stream_positions[batch.pop("stream_slot")] = batch.pop("stream_position")
                self.data.skipped.update(batch.pop("stream_skipped"))
            if self.ranks.reduce([batch.get("size", 0)], "min")[0] > 0:
                return batch, drawn

    def _step(self, wrapped: Any, optimizer: Any, loader: Any, params: list[torch.nn.Parameter], step: int) -> tuple[dict[str, float], int]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics and the batches drawn."""
        stage, accelerator = self.stage, self.accelerator
        started = time.perf_counter()
        micro, drawn = [], 0
        for _ in range(stage.grad_accum):
            batch, count = self._draw(loader)
            micro.append(batch)
            drawn += count
        weights = [self._items(batch) for batch in micro]
        total = self.ranks.reduce([sum(weights)])[0]
        sums: dict[str, float] = {}
        for batch, weight in zip(micro, weights, strict=True):
            share = weight / total
            with accelerator.accumulate(wrapped):
                losses = wrapped(batch, self.objective)
                # accelerate divides by grad_accum and DDP averages over processes: undo both, weigh by share.
                scale = share * self.ranks.world * stage.grad_accum
                accelerator.backward(losses["loss"] if scale == 1.0 else losses["loss"] * scale)
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach()) * share
                if accelerator.sync_gradients:
                    self._update(optimizer, params, sums["loss"], step)
        keys = list(sums)
        values = self.ranks.reduce([*(sums[k] for k in keys), sum(b["size"] for b in micro)])
        elapsed = time.perf_counter() - started
        metrics = dict(zip(keys, values[:-1], strict=True))
        return {**metrics, "lr": lr_at(step, stage), "samples_per_s": values[-1] / elapsed, "skipped_steps": self.skipped}, drawn

    def _update(self, optimizer: Any, params: list[torch.nn.Parameter], loss: float, step: int) -> None:
        """Clip and apply the step's gradients, unless the loss or the gradient norm is not finite on some
        process: then the step is skipped (as a GradScaler skips an overflow) and counted, and after
        ``max_skipped_steps`` in a row the run stops, its last checkpoint untouched."""
        accelerator, stage = self.accelerator, self.stage
        norm = accelerator.clip_grad_norm_(params, stage.grad_clip if stage.grad_clip > 0 else float("inf"))
        bad = not (math.isfinite(loss) and math.isfinite(float(norm)))
        bad = self.ranks.reduce([float(bad)], "max")[0] > 0
        if accelerator.scaler is not None:
            optimizer.step()  # the GradScaler skips an overflow itself and lowers its scale
            bad = bool(optimizer.step_was_skipped)
        elif not bad:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.skipped += bad
        self.skipped_in_row = self.skipped_in_row + 1 if bad else 0
        if self.skipped_in_row >= self.recipe.max_skipped_steps:
            raise NonFiniteError(
                f"{self.stage_name}: the loss or the gradients were not finite for {self.skipped_in_row} steps in a row "
                f"(up to step {step + 1}); training stopped and the last checkpoint is kept. Lower the learning rate, "
                "train in fp32 or bf16 rather than fp16, or check the data"
            )

    def _all_stream_positions(self) -> dict[str, dict[str, Any]]:
        """Every process's readers' positions (a collective: every process calls it at the same step)."""
        merged: dict[str, dict[str, Any]] = {}
        for positions in self.ranks.gather_objects(self.stream_positions):
            merged.update({str(slot): position for slot, position in positions.items()})
        return merged

    def _items(self, batch: dict[str, Any]) -> int:
        """How many items a micro-batch's mean loss averages over: target tokens for the LM loss, rows otherwise."""
        return self.objective.items(batch)

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.recipe.log_every == 0 or step == self.stage.steps:
            self.trainer.record({"stage": self.stage_name, "step": step, **{k: round(v, 6) for k, v in metrics.items()}})

    def _evaluate(self, step: int) -> None:
        """The validation split's loss (every process) and scores on a subset (main process) at ``step``."""
        data, recipe = self.trainer.validation_data, self.recipe
        batch_size = self.stage.batch_size or recipe.data.batch_size
        loss = validation_loss(self.model, self.objective, data, self.objective.collator(self.model, recipe),
                               self.stage.tasks, recipe.eval_samples, batch_size, self.ranks)
        scores = score(self.model, data, validation_tasks(self.objective, data), limit=recipe.eval_samples) if self.ranks.is_main else {}
        self.trainer.record({"stage": self.stage_name, "step": step, "split": data.split, "val_loss": loss, **scores})
        self.ranks.barrier()


def _trainable_parts(model: VisionLanguageModel, objective: Objective, gradient_checkpointing: bool) -> dict[str, torch.nn.Module]:
    """The parts the objective trains, made trainable (all of a part's weights, unless it carries LoRA)."""
    trainable = objective.trainable(model)
    for part, module in trainable.items():
        if part != "llm" and not has_lora(module):
            module.requires_grad_(True)
    if gradient_checkpointing and objective.uses_language_model:
        # The LLM's activations dominate memory; the wrapped transformers model knows how to recompute them.
        inner = getattr(model.llm, "model", None)
        if hasattr(inner, "activation_checkpointing_enable"):
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(inner, "gradient_checkpointing_enable"):
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise ConfigError("gradient_checkpointing: this language model does not support it; remove the key")
    return trainable
