"""VisionLanguageModel: frozen encoder -> bridge -> projection -> frozen LLM; prefix, losses, generation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from blipkit.config import Recipe
from blipkit.errors import BlipkitError
from blipkit.interfaces import Bridge, Encoder, LanguageModel, Objective
from blipkit.model.persistence import save_weights, write_meta

__all__ = ["ImageInput", "VisionLanguageModel"]

ImageInput = str | Path | Image.Image | torch.Tensor


class VisionLanguageModel(nn.Module):
    """The whole model. Stage 1 has no ``projection``/``llm``; they are None there."""

    def __init__(
        self,
        encoder: Encoder | None,
        bridge: Bridge,
        projection: Bridge | None = None,
        llm: LanguageModel | None = None,
        recipe: Recipe | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.bridge = bridge
        self.projection = projection
        self.llm = llm
        self.recipe = recipe or Recipe()
        for frozen in (encoder, llm):
            if frozen is not None:
                frozen.requires_grad_(False)

    def train(self, mode: bool = True) -> VisionLanguageModel:
        """Train the bridge and projection; the encoder stays in eval mode, and so does the LLM unless it
        carries trainable LoRA adapters (its wrapper decides)."""
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()
        if self.llm is not None:
            self.llm.train(mode)
        return self

    @property
    def device(self) -> torch.device:
        """Where the bridge's parameters live."""
        return next(self.bridge.parameters()).device

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen encoder tokens [B, N, D] for preprocessed pixels [B, 3, S, S]."""
        if self.encoder is None:
            raise BlipkitError("this model has no image encoder; pass precomputed image tokens instead")
        dtype = next(self.encoder.parameters(), pixel_values).dtype
        with torch.no_grad():
            return self.encoder(pixel_values.to(self.device, dtype if dtype.is_floating_point else pixel_values.dtype))

    def batch_tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        """A batch's image tokens [B, N, D] in float32: the cached ones, else the encoder's."""
        tokens = batch.get("image_tokens")
        if tokens is None:
            tokens = self.image_tokens(batch["pixel_values"])
        return tokens.to(self.device, torch.float32)

    def prefix(
        self, image_tokens: torch.Tensor, image_mask: torch.Tensor | None = None, instructions: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft visual prompts [B, Q, D_llm] and the weighted auxiliary loss of bridge and projection; with
        ``instructions`` (one per image), the bridge reads them too (``Bridge.instructed``, InstructBLIP)."""
        if self.projection is None or self.llm is None:
            raise BlipkitError("this model has no language model (stage-1 only); run stage 2 to caption")
        if instructions is None:
            out = self.bridge(image_tokens, image_mask)
        else:
            out = self.bridge.instructed(image_tokens, instructions, image_mask)
        projected = self.projection(out.queries)
        aux = image_tokens.new_zeros(())
        for module, output in ((self.bridge, out), (self.projection, projected)):
            if output.aux_loss is not None:
                aux = aux + float(module.aux_loss_weight) * output.aux_loss
        dtype = next(self.llm.parameters()).dtype
        return projected.queries.to(dtype), aux

    def forward(self, batch: dict[str, Any], objective: Objective) -> dict[str, torch.Tensor]:
        """Losses of one batch under a training ``objective`` (called through ``__call__``, so that DDP and
        FSDP wrappers see the forward pass)."""
        return objective.loss(self, batch)

    def pixel_values(self, images: Sequence[ImageInput] | torch.Tensor) -> torch.Tensor:
        """Preprocess paths, PIL images or tensors into a batch [B, 3, S, S]."""
        from blipkit.data.images import load_image

        if isinstance(images, torch.Tensor):
            return images if images.dim() == 4 else images.unsqueeze(0)
        if self.encoder is None:
            raise BlipkitError("this model has no image encoder; pass a pixel tensor")
        tensors = []
        for image in images:
            if isinstance(image, torch.Tensor):
                tensors.append(image)
                continue
            if isinstance(image, (str, Path)):
                image = load_image(image)
            tensors.append(self.encoder.preprocess(image))
        return torch.stack(tensors)

    @torch.no_grad()
    def generate(self, images: Sequence[ImageInput] | torch.Tensor, prompts: list[str], **generation: Any) -> list[str]:
        """Text after each image's visual prefix and its prompt."""
        return self.generate_from_tokens(self.image_tokens(self.pixel_values(images)), prompts, **generation)

    @torch.no_grad()
    def generate_from_tokens(self, image_tokens: torch.Tensor, prompts: list[str], **generation: Any) -> list[str]:
        """Text after the visual prefix of precomputed encoder tokens [B, N, D] and each prompt."""
        was_training = self.training
        if was_training:  # switching every submodule costs milliseconds a call; a model in eval mode needs none
            self.eval()
        try:
            image_tokens = image_tokens.to(self.device, torch.float32)
            objective = self.inference_objective()
            prefix = self.prefix(image_tokens)[0] if objective is None else objective.prefix(self, image_tokens, prompts)
            return self.llm.generate(prefix, prompts, **generation)
        finally:
            if was_training:
                self.train()

    def inference_objective(self) -> Objective | None:
        """The objective of the recipe's last stage that trains through the language model, which builds the
        prefix at inference (``lm``'s reads the image alone, ``instructblip``'s the prompt too); None when
        no stage does."""
        from blipkit.plugin_manager import registries

        objectives = registries().objectives
        for stage in reversed(self.recipe.stages):
            objective = objectives.create(stage.objective, **stage.options)
            if objective.uses_language_model:
                return objective
        return None

    def generation_defaults(self) -> dict[str, Any]:
        """The recipe's caption generation settings as keyword arguments."""
        gen = self.recipe.generation
        return {
            "num_beams": gen.num_beams,
            "max_new_tokens": gen.max_new_tokens,
            "min_new_tokens": gen.min_new_tokens,
            "repetition_penalty": gen.repetition_penalty,
            "length_penalty": gen.length_penalty,
        }

    def caption(
        self,
        images: Sequence[ImageInput] | torch.Tensor,
        prompt: str | None = None,
        num_captions: int = 1,
        **generation: Any,
    ) -> list[str]:
        """Captions, ``num_captions`` per image in image order: beam search with the recipe's defaults, or
        nucleus sampling with ``do_sample=True`` (then top_p 0.9 and temperature 1.0 unless given)."""
        batch = self.pixel_values(images)
        prompt = self.recipe.data.caption_prompt if prompt is None else prompt
        settings = {**self.generation_defaults(), **generation, "num_return_sequences": num_captions}
        if settings.get("do_sample"):
            settings = {"top_p": 0.9, "temperature": 1.0, **settings, "num_beams": generation.get("num_beams", 1)}
        elif settings["num_beams"] < num_captions:
            settings["num_beams"] = num_captions
        return self.generate(batch, [prompt] * len(batch), **settings)

    def vqa_prompt(self, question: str) -> str:
        """The recipe's question prompt, in its decoder-only or encoder-decoder form."""
        data = self.recipe.data
        template = data.vqa_prompt_encoder_decoder if self.llm is not None and self.llm.is_encoder_decoder else data.vqa_prompt
        return template.format(question)

    def ask(self, images: Sequence[ImageInput] | torch.Tensor, questions: list[str], **generation: Any) -> list[str]:
        """Short answers: beam 5, at most 10 new tokens unless overridden."""
        settings = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, **generation}
        return self.generate(images, [self.vqa_prompt(q) for q in questions], **settings)

    def retrieval_bridge(self) -> Bridge:
        """The bridge, checked to embed images and texts in a shared space."""
        if not self.bridge.supports_retrieval:
            raise BlipkitError(
                f"bridge '{self.recipe.bridge.name}' has no image-text matching heads; embeddings, ITM scores "
                "and retrieval need a Q-Former trained with stage 1"
            )
        return self.bridge

    @torch.no_grad()
    def embed_images(self, images: Sequence[ImageInput] | torch.Tensor) -> torch.Tensor:
        """Normalised query features in the image-text contrastive space [B, Q, E]."""
        bridge = self.retrieval_bridge()
        return bridge.image_embeds(self.image_tokens(self.pixel_values(images)).float())

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Normalised text features in the image-text contrastive space [B, E]."""
        return self.retrieval_bridge().text_embeds(texts)

    @torch.no_grad()
    def similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Image-text contrastive similarity [n_images, n_texts] (best query per pair)."""
        return self.retrieval_bridge().similarity(image_embeds, text_embeds)

    @torch.no_grad()
    def itm_score(self, images: Sequence[ImageInput] | torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Image-text matching logit of each row-aligned (image, text) pair [B]."""
        return self.itm_score_tokens(self.image_tokens(self.pixel_values(images)), texts)

    @torch.no_grad()
    def itm_score_tokens(self, image_tokens: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """``itm_score`` from precomputed encoder tokens."""
        return self.retrieval_bridge().itm_score(image_tokens.float(), texts)

    @torch.no_grad()
    def cross_attention(self, images: Sequence[ImageInput] | torch.Tensor) -> torch.Tensor:
        """Each query's attention over the encoder tokens, averaged over layers and heads [B, Q, N]."""
        out = self.bridge(self.image_tokens(self.pixel_values(images)).float(), output_attentions=True)
        if not out.attentions:
            raise BlipkitError(f"bridge '{self.recipe.bridge.name}' has no cross-attention to show")
        return torch.stack([a.mean(dim=1) for a in out.attentions]).mean(dim=0)

    def save(self, path: str | Path) -> Path:
        """Write a run directory (blipkit.json, bridge/, projection/) that ``blipkit.load`` reads."""
        path = Path(path)
        save_weights(self, path)
        write_meta(path, self.recipe, checkpoint=".")
        return path
