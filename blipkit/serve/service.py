"""The model behind the server: its tasks (caption, ask, embed) as batched work, and what it can do."""

from __future__ import annotations

import time
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from blipkit.errors import BlipkitError
from blipkit.serve.batcher import Batcher
from blipkit.serve.errors import RequestError

if TYPE_CHECKING:
    from blipkit.model.vlm import VisionLanguageModel

__all__ = ["Generated", "Generation", "ModelService", "model_name"]

ASK_MAX_NEW_TOKENS = 10
"""``VisionLanguageModel.ask``'s default length limit for answers."""


@dataclass(frozen=True)
class Generation:
    """Generation settings of one request; requests are batched together only when these are equal.
    None means the model's default (the recipe's for captions, beam 5 and 10 new tokens for answers)."""

    prompt: str | None = None
    num_beams: int | None = None
    max_new_tokens: int | None = None
    n: int = 1
    sample: bool = False
    top_p: float | None = None
    temperature: float | None = None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the model's ``caption`` and ``ask``, beyond the number of outputs."""
        settings = {k: v for k, v in (("num_beams", self.num_beams), ("max_new_tokens", self.max_new_tokens),
                                      ("top_p", self.top_p), ("temperature", self.temperature)) if v is not None}
        if self.sample:
            settings["do_sample"] = True
        return settings


@dataclass(frozen=True)
class Generated:
    """The texts generated for one image (``n`` of them), the token counts OpenAI's usage reports, and the
    length limit that applied (a text that reached it may have been cut)."""

    texts: list[str]
    prompt_tokens: int
    completion_tokens: list[int]
    max_new_tokens: int

    @property
    def finish_reasons(self) -> list[str]:
        """Per text, OpenAI's finish reason: ``length`` when it reached the limit, else ``stop``."""
        return ["length" if tokens >= self.max_new_tokens else "stop" for tokens in self.completion_tokens]


class ModelService:
    """A loaded model answering batched requests; every model call runs on the batcher's one thread."""

    def __init__(self, model: VisionLanguageModel, name: str, max_batch: int = 8, max_wait_ms: float = 10.0,
                 max_queue: int = 256) -> None:
        self.model = model
        self.name = name
        self.created = int(time.time())
        self.batcher = Batcher(self._run_batch, max_batch=max_batch, max_wait_s=max_wait_ms / 1000, max_queue=max_queue)

    @property
    def can_generate(self) -> bool:
        """Whether the model has a language model (stage 2 trained)."""
        return self.model.llm is not None and self.model.projection is not None

    @property
    def can_embed(self) -> bool:
        """Whether the bridge embeds images and texts in a shared space."""
        return bool(getattr(self.model.bridge, "supports_retrieval", False))

    def describe(self) -> dict[str, Any]:
        """What the model is made of and which endpoints it answers."""
        recipe = self.model.recipe
        tasks = (["caption", "ask", "chat"] if self.can_generate else []) + (["embed"] if self.can_embed else [])
        return {
            "encoder": recipe.encoder.name,
            "bridge": recipe.bridge.name,
            "llm": recipe.llm.name if self.can_generate else None,
            "tasks": tasks,
        }

    def caption(self, image: Image.Image, generation: Generation) -> Future:
        """Queue captioning ``image``; the future gets a ``Generated``."""
        self._check_generate()
        return self.batcher.submit(("caption", generation), image)

    def ask(self, image: Image.Image, question: str, generation: Generation) -> Future:
        """Queue answering ``question`` about ``image``; the future gets a ``Generated``."""
        self._check_generate()
        return self.batcher.submit(("ask", generation), (image, question))

    def embed_image(self, image: Image.Image) -> Future:
        """Queue embedding ``image``; the future gets its normalised query features [Q, E]."""
        self._check_embed()
        return self.batcher.submit(("embed_image",), image)

    def embed_text(self, text: str) -> Future:
        """Queue embedding ``text``; the future gets its normalised feature [E]."""
        self._check_embed()
        return self.batcher.submit(("embed_text",), text)

    def similarity(self, image_embeds: list[torch.Tensor], text_embeds: list[torch.Tensor]) -> list[list[float]]:
        """Image-text similarity [n_images][n_texts] of embeddings this service made."""
        with torch.no_grad():
            scores = self.model.similarity(torch.stack(image_embeds), torch.stack(text_embeds))
        return scores.cpu().tolist()

    def _check_generate(self) -> None:
        if not self.can_generate:
            raise RequestError(
                f"model '{self.name}' has no language model (stage 1 only), so it cannot caption or answer; "
                "serve a model trained with stage 2", 400, "invalid_request_error",
            )

    def _check_embed(self) -> None:
        if not self.can_embed:
            try:
                self.model.retrieval_bridge()
            except BlipkitError as err:
                raise RequestError(f"model '{self.name}' cannot embed: {err}") from None

    def _run_batch(self, key: Hashable, items: list[Any]) -> list[Any]:
        task = key[0]
        if task == "embed_image":
            return list(self.model.embed_images(items).cpu())
        if task == "embed_text":
            return list(self.model.embed_texts(items).cpu())
        generation: Generation = key[1]
        if task == "caption":
            texts = self.model.caption(items, prompt=generation.prompt, num_captions=generation.n, **generation.kwargs())
            prompt = self.model.recipe.data.caption_prompt if generation.prompt is None else generation.prompt
            prompts = [prompt] * len(items)
            limit = generation.max_new_tokens or self.model.recipe.generation.max_new_tokens
        else:
            images, questions = zip(*items)
            texts = self.model.ask(list(images), list(questions), **self._ask_kwargs(generation))
            prompts = [self.model.vqa_prompt(question) for question in questions]
            limit = generation.max_new_tokens or ASK_MAX_NEW_TOKENS
        return [self._generated(prompts[i], texts[i * generation.n : (i + 1) * generation.n], limit)
                for i in range(len(items))]

    @staticmethod
    def _ask_kwargs(generation: Generation) -> dict[str, Any]:
        settings = generation.kwargs()
        if generation.n > 1:
            settings["num_return_sequences"] = generation.n
            if not generation.sample:
                settings["num_beams"] = max(settings.get("num_beams", 5), generation.n)
        if generation.sample:
            settings.setdefault("num_beams", 1)
        return settings

    def _generated(self, prompt: str, texts: list[str], limit: int) -> Generated:
        visual = self.model.bridge.num_queries or 0
        return Generated(list(texts), visual + self._count_tokens(prompt), [self._count_tokens(t) for t in texts], limit)

    def _count_tokens(self, text: str) -> int:
        tokenizer = getattr(self.model.llm, "tokenizer", None)
        try:
            return len(tokenizer.encode(text, add_special_tokens=False))
        except (AttributeError, TypeError):  # a plugin's tokenizer without transformers' encode
            return len(text.split())


def model_name(path: str | Path, name: str | None = None) -> str:
    """The id a served model goes by: ``name``, else its directory's name."""
    return name or Path(path).resolve().name or "blipkit"
