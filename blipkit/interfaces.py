"""The contract every plugin fulfils: Encoder, Bridge, LanguageModel, and the Objective a stage trains.

The data path runs one way::

    image --Encoder--> tokens [B, N, D_enc] --Bridge--> queries [B, Q, H]
          --projection (a Bridge too)--> prefix [B, Q, D_llm] --LanguageModel--> loss | text
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image
from torch import nn

if TYPE_CHECKING:
    from blipkit.config import Recipe, StageConfig
    from blipkit.data.sample import Sample
    from blipkit.model.vlm import VisionLanguageModel

__all__ = ["BridgeOutput", "Bridge", "Encoder", "Exporter", "LMBatch", "LanguageModel", "Objective"]


class Encoder(nn.Module, abc.ABC):
    """A frozen image encoder that returns patch tokens from its penultimate block.

    Subclasses set ``feature_dim`` (D), ``num_tokens`` (N), ``image_size`` (square input side) and
    ``token_layout`` (a short human description of which tokens ``forward`` returns, e.g.
    ``"1 CLS + 196 patches (14x14)"``), and ``patch_grid`` (rows, cols) of the patch tokens when they
    form a grid, used to draw attention maps; ``num_prefix_tokens`` says how many non-patch tokens
    (CLS, registers) come before the grid.
    """

    feature_dim: int
    num_tokens: int
    image_size: int
    token_layout: str = ""
    patch_grid: tuple[int, int] | None = None
    num_prefix_tokens: int = 0

    @abc.abstractmethod
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Map ``pixel_values`` [B, 3, S, S] to patch tokens [B, N, D] (penultimate block, no final norm)."""

    @abc.abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Turn one PIL image of any mode into the model's input tensor [3, S, S]."""

    @property
    @abc.abstractmethod
    def cache_key(self) -> str:
        """A string that changes whenever the features for the same image would change."""


@dataclass
class BridgeOutput:
    """What a bridge returns: query outputs plus optional auxiliary loss, attention maps and stats."""

    queries: torch.Tensor
    aux_loss: torch.Tensor | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    stats: dict[str, float] = field(default_factory=dict)


class Bridge(nn.Module, abc.ABC):
    """A trainable module from token sequences [B, N, D_in] to [B, Q, output_dim].

    Serves in two slots: as the bridge over encoder tokens, and as the projection from bridge outputs
    into the LLM's embedding space. ``config`` holds the constructor keyword arguments, so that
    ``save_pretrained`` / ``from_pretrained`` round-trip any bridge exactly.

    Optional parts (docs/plugins.md): ``aux_loss_weight`` (how much of ``BridgeOutput.aux_loss`` the training loss adds),
    ``lora_always_trainable`` (parameter-name patterns that keep training under LoRA), ``readout`` /
    ``set_readout`` (a linear read-out a warm start can fit), retrieval: ``supports_retrieval`` with
    ``image_embeds``, ``text_embeds``, ``similarity``, and ``has_itm`` with ``itm_score``, and
    ``reads_instructions`` with ``instructed`` (query outputs that have read the prompt: InstructBLIP);
    ``export_state`` (its weights in another library's layout, for an exporter).
    """

    output_dim: int
    num_queries: int | None
    config: dict[str, Any]
    supports_retrieval: ClassVar[bool] = False
    has_itm: bool = False
    aux_loss_weight: float = 0.0
    lora_always_trainable: ClassVar[tuple[str, ...]] = ()
    reads_instructions: ClassVar[bool] = False

    @abc.abstractmethod
    def forward(
        self,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> BridgeOutput:
        """Map tokens [B, N, D_in] (mask [B, N], 1 = keep) to a BridgeOutput with queries [B, Q, H]."""

    def readout(
        self, image_tokens: torch.Tensor, image_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The bridge's output as a linear read-out: ``(features [B, Q, F], fixed [B, Q, output_dim] or None)``
        with ``forward(...).queries == features @ W + fixed`` (in eval mode) for the [F, output_dim] matrix ``W`` that
        ``set_readout`` installs. None (the default) when the output is not linear in a read-out of the
        bridge's own; a lexical warm start (``stage2.projection_init: lexical``) then refuses the bridge."""
        return None

    def set_readout(self, weight: torch.Tensor) -> None:
        """Install the read-out matrix ``weight`` [F, output_dim] described by ``readout``."""
        raise NotImplementedError(f"{type(self).__name__} has no linear read-out")

    def image_embeds(self, image_tokens: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised image features in the image-text space [B, Q, E] (with ``supports_retrieval``)."""
        raise self._cannot("embed images for retrieval")

    def text_embeds(self, text: Sequence[str] | Any) -> torch.Tensor:
        """Normalised text features in the image-text space [B, E] (with ``supports_retrieval``)."""
        raise self._cannot("embed texts for retrieval")

    def similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Image-text similarity [n_images, n_texts] of embeddings from ``image_embeds`` and ``text_embeds``."""
        raise self._cannot("compare images and texts")

    def itm_score(self, image_tokens: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Image-text matching logit of each row-aligned (image, text) pair [B] (with ``has_itm``)."""
        raise self._cannot("score image-text pairs")

    def instructed(
        self, image_tokens: torch.Tensor, instructions: Sequence[str], image_mask: torch.Tensor | None = None
    ) -> BridgeOutput:
        """Like ``forward``, with each image's instruction text read beside its tokens (with
        ``reads_instructions``): the queries extract what the instruction asks about."""
        from blipkit.errors import ConfigError

        raise ConfigError(
            f"bridge {type(self).__name__} cannot read instructions; use a Q-Former (bridge.name=qformer) for an "
            "instruction-aware prefix"
        )

    def _cannot(self, what: str) -> Exception:
        from blipkit.errors import BlipkitError

        return BlipkitError(f"bridge {type(self).__name__} cannot {what}; retrieval needs a bridge with image-text heads, such as a Q-Former trained with stage 1")

    def export_state(self, layout: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The bridge's weights under another library's names and that library's config fields, for an
        exporter (``blipkit export --to``); ``layout`` names the target ("transformers-blip2"). None (the
        default) when the bridge has no such form."""
        return None

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into the directory ``path``."""
        from blipkit.io import atomic_write_json, save_safetensors

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / "config.json", {"class": type(self).__qualname__, **self.config})
        save_safetensors(self.state_dict(), path / "model.safetensors")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Bridge:
        """Rebuild a bridge saved by ``save_pretrained``."""
        from blipkit.io import load_safetensors

        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        config.pop("class", None)
        model = cls(**config)
        model.load_state_dict(load_safetensors(path / "model.safetensors"), strict=True)
        return model


@dataclass
class LMBatch:
    """Tokenised text for a language model, without the visual prefix.

    Decoder-only: ``input_ids`` = [prompt][target][eos] right-padded, ``labels`` aligned with it and
    -100 on prompt and padding. Encoder-decoder: ``input_ids`` = the encoder's prompt, ``labels`` the
    decoder's target (+eos), -100 on padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    decoder_attention_mask: torch.Tensor | None = None

    def num_targets(self) -> int:
        """How many label tokens the mean loss averages over (every label that is not -100)."""
        return int((self.labels != -100).sum())

    def to(self, device: torch.device | str) -> LMBatch:
        """Move every tensor to ``device``."""
        return LMBatch(
            **{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        )


class LanguageModel(nn.Module, abc.ABC):
    """A frozen language model that takes a visual prefix of soft prompts."""

    hidden_size: int
    is_encoder_decoder: bool
    tokenizer: Any

    @abc.abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] to input embeddings [B, T, hidden_size]."""

    @abc.abstractmethod
    def tokenize(self, prompts: list[str], targets: list[str], prefix_lm: bool = False) -> LMBatch:
        """Tokenise prompt/target pairs for ``loss``; EOS is appended to every target.

        ``prefix_lm`` (encoder-decoder only): for captions with an empty prompt, split each target at a
        random word and move its first part into the encoder (BLIP-2's prefix-LM objective).
        """

    @abc.abstractmethod
    def loss(self, prefix_embeds: torch.Tensor, batch: LMBatch) -> torch.Tensor:
        """Mean token cross-entropy on the targets, with ``prefix_embeds`` [B, Q, hidden] first."""

    @abc.abstractmethod
    def generate(self, prefix_embeds: torch.Tensor, prompts: list[str], **generation: Any) -> list[str]:
        """Generate text after [prefix][prompt] through transformers' generate with max_new_tokens."""

    def lora_targets(self) -> list[str] | None:
        """The module names LoRA adapts by default (``llm.lora`` without ``target_modules``); None when the
        model names none, and the recipe must."""
        return None


class Objective(abc.ABC):
    """How a training stage trains a model: which parts learn, how samples become batches, the loss, work
    before the stage's first step, and how an inference prefix is built.

    A plugin registers one through ``register_objectives`` as ``factory(**options) -> Objective``; a
    recipe's stage names it (``stages: [{objective: NAME, options: {...}, steps: ...}]``) and its
    ``options`` reach the factory. Only ``collator`` and ``loss`` are required; docs/plugins.md says
    when to override the rest.
    """

    #: Whether the stage needs the language model and the projection (loaded before the stage starts).
    uses_language_model: ClassVar[bool] = True
    #: The sample tasks (``caption``, ``vqa``, or a dataset plugin's own) it trains on; None: any.
    tasks: ClassVar[frozenset[str] | None] = None
    #: What the validation split is scored on after the stage: ``retrieval``, ``caption``, ``vqa``.
    evaluates: ClassVar[tuple[str, ...]] = ()

    def applies_to(self, model: VisionLanguageModel) -> bool:
        """Whether this model can train with the objective; a stage whose objective does not apply (a
        bridge without the heads it needs) is skipped with a message."""
        return True

    def trainable(self, model: VisionLanguageModel) -> dict[str, nn.Module]:
        """The parts that learn, by the names ``lr_scale`` uses (``bridge``, ``projection``, ``llm``): the
        bridge and the projection, and the LLM when it has trainable (LoRA) parameters. The runner makes
        every parameter of the bridge and projection trainable unless they carry LoRA adapters, and
        gives the trainable ones to the optimizer."""
        parts: dict[str, nn.Module] = {"bridge": model.bridge}
        if model.projection is not None:
            parts["projection"] = model.projection
        if model.llm is not None and any(p.requires_grad for p in model.llm.parameters()):
            parts["llm"] = model.llm
        return parts

    @abc.abstractmethod
    def collator(self, model: VisionLanguageModel, recipe: Recipe) -> Callable[[Sequence[Sample | None]], dict[str, Any]]:
        """The function that turns a list of samples (None for one whose image failed) into a batch with
        ``size`` (rows kept) and whatever ``loss`` reads."""

    @abc.abstractmethod
    def loss(self, model: VisionLanguageModel, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The batch's losses: ``loss`` (what is minimised, a mean over the batch's items) and any parts
        of it or metrics to log, by name."""

    def items(self, batch: dict[str, Any]) -> int:
        """How many items ``loss``'s mean averages over (rows by default); several processes and
        accumulated micro-batches are weighted by it, so that they compute one pass's gradient."""
        return int(batch["size"])

    def check(self, stage: StageConfig, recipe: Recipe) -> None:
        """Refuse, with a one-line ConfigError, stage settings this objective cannot train with; runs when the
        recipe is validated, before anything loads."""

    def prepare(self, model: VisionLanguageModel, data: Any, recipe: Recipe, stage: StageConfig, quiet: bool) -> Any:
        """Work before a fresh stage's first step (not on resume), e.g. a warm start; returns what the
        run should report, or None."""
        return None

    def prefix(self, model: VisionLanguageModel, image_tokens: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The LLM's visual prefix [B, Q, D_llm] for encoder tokens and their prompts, at inference."""
        return model.prefix(image_tokens)[0]


class Exporter(abc.ABC):
    """Writes a model in another library's format: ``blipkit export RUN --to NAME DIR``.

    A plugin registers one through ``register_exporters`` as ``factory() -> Exporter``. The core checks
    ``unsupported`` first (a model the format cannot hold is written in blipkit's own format instead, with
    that reason shown), gives ``write`` an empty temporary directory that it renames into place when
    complete, adds the model card (README.md) and pushes to a hub when asked.
    """

    #: The model card's ``library_name`` (the library that loads the directory).
    library_name: ClassVar[str] = ""

    @abc.abstractmethod
    def unsupported(self, model: VisionLanguageModel) -> str | None:
        """Why ``model`` cannot be written in this format (one line, naming the part), or None when it can."""

    @abc.abstractmethod
    def write(self, model: VisionLanguageModel, directory: Path, dtype: torch.dtype | None = None) -> None:
        """Write ``model`` into the empty ``directory``, floating-point weights cast to ``dtype`` when given."""

    @abc.abstractmethod
    def usage(self, location: str) -> str:
        """Markdown for the model card: how to load and run the directory or hub repository ``location``."""
