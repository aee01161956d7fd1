"""VisionLanguageModel: frozen encoder -> bridge -> projection -> frozen LLM; build, save, load, generate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from blipkit import __version__
from blipkit.config import ComponentConfig, Recipe, recipe_from_dict, recipe_to_dict
from blipkit.errors import BlipkitError, ConfigError
from blipkit.interfaces import Bridge, Encoder, LanguageModel
from blipkit.io import atomic_write_json, read_json

__all__ = ["VisionLanguageModel", "add_language_model", "build_model", "load_bridge", "load_model"]

ImageInput = str | Path | Image.Image | torch.Tensor
META_FILE = "blipkit.json"


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

    def prefix(self, image_tokens: torch.Tensor, image_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft visual prompts [B, Q, D_llm] and the weighted auxiliary loss of bridge and projection."""
        if self.projection is None or self.llm is None:
            raise BlipkitError("this model has no language model (stage-1 only); run stage 2 to caption")
        out = self.bridge(image_tokens, image_mask)
        projected = self.projection(out.queries)
        aux = image_tokens.new_zeros(())
        for module, output in ((self.bridge, out), (self.projection, projected)):
            if output.aux_loss is not None:
                aux = aux + float(module.config.get("aux_loss_weight", 0.0)) * output.aux_loss
        dtype = next(self.llm.parameters()).dtype
        return projected.queries.to(dtype), aux

    def forward(self, batch: dict[str, Any], objective: str) -> dict[str, torch.Tensor]:
        """Losses of one batch: ``objective`` is ``stage1`` (Q-Former objectives) or ``stage2`` (LM loss)."""
        tokens = self.batch_tokens(batch)
        mask = batch.get("image_mask")
        if objective == "stage1":
            return self.bridge.stage1_loss(tokens, batch["bridge_text"], image_mask=mask, image_ids=batch.get("image_keys"))
        prefix, aux = self.prefix(tokens, mask)
        lm_loss = self.llm.loss(prefix, batch["lm"].to(self.device))
        return {"loss": lm_loss + aux, "lm": lm_loss.detach(), "aux": aux.detach()}

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
        self.eval()
        try:
            prefix, _ = self.prefix(image_tokens.to(self.device, torch.float32))
            return self.llm.generate(prefix, prompts, **generation)
        finally:
            self.train(was_training)

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

    def stage1_bridge(self) -> Any:
        """The bridge, checked to have image-text contrastive and matching heads."""
        if not (self.bridge.supports_stage1 and hasattr(self.bridge, "image_embeds")):
            raise BlipkitError(
                f"bridge '{self.recipe.bridge.name}' has no image-text matching heads; embeddings, ITM scores "
                "and retrieval need a Q-Former trained with stage 1"
            )
        return self.bridge

    @torch.no_grad()
    def embed_images(self, images: Sequence[ImageInput] | torch.Tensor) -> torch.Tensor:
        """Normalised query features in the image-text contrastive space [B, Q, E]."""
        bridge = self.stage1_bridge()
        return bridge.image_embeds(self.image_tokens(self.pixel_values(images)).float())

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Normalised text features in the image-text contrastive space [B, E]."""
        return self.stage1_bridge().text_embeds(texts)

    @torch.no_grad()
    def similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Image-text contrastive similarity [n_images, n_texts] (best query per pair)."""
        return self.stage1_bridge().similarity(image_embeds, text_embeds)

    @torch.no_grad()
    def itm_score(self, images: Sequence[ImageInput] | torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Image-text matching logit of each row-aligned (image, text) pair [B]."""
        return self.itm_score_tokens(self.image_tokens(self.pixel_values(images)), texts)

    @torch.no_grad()
    def itm_score_tokens(self, image_tokens: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """``itm_score`` from precomputed encoder tokens."""
        return self.stage1_bridge().itm_score(image_tokens.float(), texts)

    @torch.no_grad()
    def cross_attention(self, images: Sequence[ImageInput] | torch.Tensor) -> torch.Tensor:
        """Each query's attention over the encoder tokens, averaged over layers and heads [B, Q, N]."""
        out = self.bridge(self.image_tokens(self.pixel_values(images)).float(), output_attentions=True)
        if not out.attentions:
            raise BlipkitError(f"bridge '{self.recipe.bridge.name}' has no cross-attention to show")
        return torch.stack([a.mean(dim=1) for a in out.attentions]).mean(dim=0)

    def save(self, path: str | Path) -> Path:
        """Write a run directory (blipkit.json, bridge/, projection/) that ``load_model`` reads."""
        path = Path(path)
        save_weights(self, path)
        write_meta(path, self.recipe, checkpoint=".")
        return path


def save_weights(model: VisionLanguageModel, directory: Path) -> None:
    """Save the trainable parts under ``directory``: bridge (with its LoRA), projection, LLM adapter."""
    from blipkit.train.lora import has_lora, save_bridge, save_llm_adapter

    save_bridge(model.bridge, directory / "bridge")
    if model.projection is not None:
        model.projection.save_pretrained(directory / "projection")
    if model.llm is not None and has_lora(model.llm.model):
        save_llm_adapter(model.llm, directory / "llm_adapter")


def load_weights(model: VisionLanguageModel, directory: Path) -> None:
    """Load what ``save_weights`` wrote into an already built ``model`` (resuming a run)."""
    from blipkit.io import load_safetensors
    from blipkit.train.lora import has_lora, load_bridge_lora, load_llm_adapter

    if has_lora(model.bridge):
        load_bridge_lora(model.bridge, directory / "bridge")
    else:
        model.bridge.load_state_dict(load_safetensors(directory / "bridge" / "model.safetensors"))
    if model.projection is not None and (directory / "projection").exists():
        model.projection.load_state_dict(load_safetensors(directory / "projection" / "model.safetensors"))
    if model.llm is not None and (directory / "llm_adapter").exists():
        load_llm_adapter(model.llm, directory / "llm_adapter", trainable=True)


def _apply_bridge_tuning(bridge: Bridge, config: ComponentConfig) -> Bridge:
    if config.tuning == "lora":
        from blipkit.train.lora import ALWAYS_TRAINABLE, LoraSettings, apply_bridge_lora

        settings = dict(config.lora or {})
        always = settings.pop("always_trainable", ALWAYS_TRAINABLE)
        apply_bridge_lora(bridge, LoraSettings(**settings), always)
    return bridge


def write_meta(run_dir: Path, recipe: Recipe, checkpoint: str, **extra: Any) -> None:
    """Atomically (re)write ``blipkit.json``: the resolved recipe and which checkpoint is current."""
    atomic_write_json(
        run_dir / META_FILE,
        {"blipkit_version": __version__, "checkpoint": checkpoint, **extra, "recipe": recipe_to_dict(recipe)},
    )


def _registries() -> Any:
    from blipkit.plugin_manager import registries

    return registries()


def _weights_dir(path: Path, part: str) -> Path:
    """``part`` of a run directory (following its current checkpoint) or of a bare bridge directory."""
    meta_file = path / META_FILE
    if meta_file.exists():
        return path / read_json(meta_file).get("checkpoint", ".") / part
    return path


def load_bridge(name: str, path: str | Path) -> Bridge:
    """Load a bridge registered as ``name`` from a saved directory or from a run directory."""
    entry = _registries().bridges.resolve(name).entry
    directory = Path(path)
    if (directory / META_FILE).exists():
        directory = _weights_dir(directory, "bridge")
    if not (directory / "config.json").exists():
        raise ConfigError(f"{path} holds no saved bridge (no config.json); give a run directory or a bridge directory")
    loader = getattr(entry.factory, "from_pretrained", None)
    if loader is None:
        raise ConfigError(f"bridge '{name}' cannot be loaded from a directory (its plugin has no from_pretrained)")
    return loader(directory)


def _make_bridge(config: ComponentConfig, slot: str, **dims: int) -> Bridge:
    regs = _registries()
    if config.pretrained:
        return load_bridge(config.name, _weights_dir(Path(config.pretrained), slot) if slot == "projection" else config.pretrained)
    return regs.bridges.create(config.name, **dims, **config.options)


def build_model(recipe: Recipe, with_llm: bool = True, frozen_dtype: torch.dtype | None = None) -> VisionLanguageModel:
    """Materialise the recipe's parts; without ``with_llm`` (stage 1) no LLM or projection is loaded.

    ``frozen_dtype``: what to store the frozen encoder and LLM in (training on GPU keeps them in half
    precision), None to keep them as their plugins load them; the bridge and projection stay in float32.
    """
    encoder = _registries().encoders.create(recipe.encoder.name, **recipe.encoder.options)
    if frozen_dtype is not None:
        encoder.to(frozen_dtype)
    bridge = _apply_bridge_tuning(_make_bridge(recipe.bridge, "bridge", input_dim=encoder.feature_dim), recipe.bridge)
    model = VisionLanguageModel(encoder, bridge, recipe=recipe)
    if with_llm:
        add_language_model(model, recipe, frozen_dtype)
    return model


def add_language_model(model: VisionLanguageModel, recipe: Recipe, frozen_dtype: torch.dtype | None = None) -> VisionLanguageModel:
    """Load the recipe's frozen LLM (in ``frozen_dtype`` if given; LoRA adapters stay float32) into ``model``
    and give it a projection sized for bridge and LLM."""
    llm = _registries().llms.create(recipe.llm.name, **recipe.llm.options).requires_grad_(False)
    if frozen_dtype is not None:
        llm.to(frozen_dtype)
    if recipe.llm.lora is not None:
        from blipkit.train.lora import LoraSettings, apply_llm_lora

        apply_llm_lora(llm, LoraSettings(**recipe.llm.lora))
    model.llm = llm
    model.projection = _make_bridge(
        recipe.projection, "projection", input_dim=model.bridge.output_dim, output_dim=llm.hidden_size
    )
    return model


def load_model(path: str | Path, device: str | torch.device | None = None) -> VisionLanguageModel:
    """Load a blipkit run directory (written by training or ``save``), or any checkpoint a plugin's
    ``load_model`` hook recognises (a transformers BLIP-2 directory, for one)."""
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.exists():
        from blipkit.plugin_manager import get_plugin_manager

        model = get_plugin_manager().hook.load_model(path=str(path))
        if model is None:
            raise BlipkitError(
                f"{path} is not a blipkit run directory (no {META_FILE}) nor a checkpoint any plugin can load; "
                "train one with: blipkit train"
            )
        return model.to(device) if device is not None else model
    meta = read_json(meta_file)
    recipe = recipe_from_dict(meta["recipe"])
    regs = _registries()
    checkpoint = path / meta.get("checkpoint", ".")
    encoder = regs.encoders.create(recipe.encoder.name, **recipe.encoder.options)
    from blipkit.train.lora import load_bridge_lora, load_llm_adapter

    bridge = load_bridge(recipe.bridge.name, checkpoint / "bridge")
    load_bridge_lora(bridge, checkpoint / "bridge")
    llm = projection = None
    if (checkpoint / "projection").exists():
        llm = regs.llms.create(recipe.llm.name, **recipe.llm.options)
        projection = load_bridge(recipe.projection.name, checkpoint / "projection")
        if (checkpoint / "llm_adapter").exists():
            load_llm_adapter(llm, checkpoint / "llm_adapter")
    model = VisionLanguageModel(encoder, bridge, projection, llm, recipe).eval()
    return model.to(device) if device is not None else model
