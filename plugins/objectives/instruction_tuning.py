"""InstructBLIP's instruction tuning (``instructblip``): BLIP-2's language-modelling loss, with every sample
asked through an instruction template of its task, and a bridge that reads the instruction too.

Each sample gets one of its task's templates ("A short image caption:", "Question: {} Short answer:", ...),
picked from the run's seed and the sample itself, so that every process and every resumed run sees the
same instruction. The instruction is both the LLM's prompt after the visual prefix ([queries][instruction])
and, for a bridge that ``reads_instructions`` (the Q-Former), text the queries attend to, so that they
extract what the instruction asks about. Evaluation asks through the recipe's own prompts
(``data.caption_prompt``, ``data.vqa_prompt``), which the shipped recipes hold out of training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from blipkit import hookimpl
from blipkit.config import Recipe, StageConfig
from blipkit.data.collate import Collator
from blipkit.data.sample import Sample
from blipkit.errors import ConfigError
from blipkit.hookspecs import Register
from blipkit.interfaces import LMBatch, Objective
from blipkit.model.vlm import VisionLanguageModel

__all__ = ["CAPTION_TEMPLATES", "IMAGE_MARK", "InstructionText", "InstructionTuning", "VQA_TEMPLATES"]

IMAGE_MARK = "<Image>"
"""Where the paper's templates put the image; blipkit's visual prefix always comes first, so it is dropped."""

# The paper's templates (Dai et al. 2023, appendix), less those the shipped recipes hold out for evaluation:
# "A short image description:" and "Q: {} A:".
CAPTION_TEMPLATES: tuple[str, ...] = (
    "<Image>A short image caption:",
    "<Image>A photo of",
    "<Image>An image that shows",
    "<Image>Write a short description for the image.",
    "<Image>Write a description for the photo.",
    "<Image>Provide a description of what is presented in the photo.",
    "<Image>Briefly describe the content of the image.",
    "<Image>Can you briefly explain what you see in the image?",
    "<Image>Could you use a few words to describe what you perceive in the photo?",
    "<Image>Please provide a short depiction of the picture.",
    "<Image>Using language, provide a short account of the image.",
    "<Image>Use a few words to illustrate what is happening in the picture.",
)
VQA_TEMPLATES: tuple[str, ...] = (
    "<Image>{}",
    "<Image>Question: {}",
    "<Image>{} A short answer to the question is",
    "<Image>Question: {} Short answer:",
    "<Image>Given the image, answer the following question with no more than three words. {}",
    "<Image>Based on the image, respond to this question with a short answer: {}. Answer:",
    "<Image>Use the provided image to answer the question: {} Provide your answer as short as possible:",
    '<Image>What is the answer to the following question? "{}"',
    '<Image>The question "{}" can be answered using the image. A short answer is',
)
DEFAULT_TEMPLATES: dict[str, tuple[str, ...]] = {"caption": CAPTION_TEMPLATES, "vqa": VQA_TEMPLATES}


def _clean(template: str) -> str:
    return template.removeprefix(IMAGE_MARK).strip()


def checked_templates(templates: Mapping[str, Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    """Each task's templates, ``<Image>`` dropped; ConfigError for an unknown task, an empty list, or a VQA
    template without exactly one ``{}`` for the question (a caption template takes none)."""
    chosen = {**DEFAULT_TEMPLATES, **(templates or {})}
    unknown = sorted(set(chosen) - set(DEFAULT_TEMPLATES))
    if unknown:
        raise ConfigError(f"options.templates: unknown task '{unknown[0]}'; give templates for caption and/or vqa")
    result: dict[str, tuple[str, ...]] = {}
    for task, listed in chosen.items():
        if isinstance(listed, str) or not listed or not all(isinstance(t, str) for t in listed):
            raise ConfigError(f"options.templates.{task}: expected a non-empty list of strings, got {listed!r}")
        holes = 1 if task == "vqa" else 0
        bad = next((t for t in listed if t.count("{}") != holes), None)
        if bad is not None:
            raise ConfigError(
                f"options.templates.{task}: {bad!r} must hold {holes} '{{}}' "
                f"({'where the question goes' if holes else 'a caption template takes no question'})"
            )
        result[task] = tuple(_clean(t) for t in listed)
    return result


def pick(templates: Sequence[str], seed: int, sample: Sample) -> str:
    """The template for ``sample``: the same in every process, worker and resumed run of ``seed``."""
    key = "\x1f".join((str(seed), sample.task, sample.image_id, sample.question or "", sample.text))
    return templates[int(hashlib.sha1(key.encode()).hexdigest()[:12], 16) % len(templates)]


class InstructionText:
    """Each sample's instruction (its task's template, filled with the question) as ``instructions``, and the
    LLM's tokens of [instruction][target] as ``lm``."""

    def __init__(self, llm_tokenize: Callable[..., LMBatch], templates: dict[str, tuple[str, ...]], seed: int) -> None:
        self.llm_tokenize = llm_tokenize
        self.templates = templates
        self.seed = seed

    def instruction(self, sample: Sample) -> str:
        """The sample's filled-in template."""
        template = pick(self.templates[sample.task], self.seed, sample)
        return template.format(sample.question or "") if sample.task == "vqa" else template

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        instructions = [self.instruction(s) for s in samples]
        return {"instructions": instructions, "lm": self.llm_tokenize(instructions, [s.text for s in samples])}


class InstructionTuning(Objective):
    """Train the bridge and projection (and LoRA adapters in the LLM) on captions and answers asked through
    instruction templates, the bridge reading the instruction when it can (InstructBLIP's Q-Former).

    ``templates`` ({caption: [...], vqa: [...]}) replaces the paper's templates of a task; a VQA template
    holds ``{}`` where the question goes, and a leading ``<Image>`` is dropped.
    """

    uses_language_model = True
    tasks = frozenset({"caption", "vqa"})
    evaluates = ("caption", "vqa")

    def __init__(self, templates: dict[str, list[str]] | None = None) -> None:
        self.templates = checked_templates(templates)

    def collator(self, model: VisionLanguageModel, recipe: Recipe) -> Callable[[Sequence[Sample | None]], dict[str, Any]]:
        """Images, each sample's instruction, and the LLM's instruction/target tokens."""
        return Collator(model.encoder.preprocess, InstructionText(model.llm.tokenize, self.templates, recipe.seed))

    def loss(self, model: VisionLanguageModel, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The LLM's mean loss on the target tokens after [instruction-aware prefix][instruction], plus the
        bridge's and projection's weighted auxiliary loss."""
        instructions = batch["instructions"] if model.bridge.reads_instructions else None
        prefix, aux = model.prefix(model.batch_tokens(batch), batch.get("image_mask"), instructions)
        lm_loss = model.llm.loss(prefix, batch["lm"].to(model.device))
        return {"loss": lm_loss + aux, "lm": lm_loss.detach(), "aux": aux.detach()}

    def items(self, batch: dict[str, Any]) -> int:
        """The target tokens the LLM's loss averages over."""
        return batch["lm"].num_targets()

    def prepare(self, model: VisionLanguageModel, data: Any, recipe: Recipe, stage: StageConfig, quiet: bool) -> Any:
        """The lexical warm start of the projection when the stage asks for it (fitted to the bridge's
        outputs without an instruction)."""
        if stage.projection_init != "lexical":
            return None
        from blipkit.train.lexical import lexical_init

        return lexical_init(model, data, recipe, quiet=quiet)

    def prefix(self, model: VisionLanguageModel, image_tokens: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The visual prefix of each image with its prompt as the instruction (one prompt serves every image)."""
        if not model.bridge.reads_instructions:
            return model.prefix(image_tokens)[0]
        prompts = list(prompts) * image_tokens.shape[0] if len(prompts) == 1 else list(prompts)
        return model.prefix(image_tokens, instructions=prompts)[0]


@hookimpl
def register_objectives(register: Register) -> None:
    """Register ``instructblip``."""
    register(
        "instructblip",
        InstructionTuning,
        aliases=("instruction-tuning",),
        description="InstructBLIP: the LM loss on captions and answers asked through instruction templates, "
        "the Q-Former reading the instruction",
        kind="objective",
    )
