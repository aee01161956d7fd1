"""LanguageModel wrappers over transformers models: CausalLM (decoder-only) and Seq2SeqLM (encoder-decoder).

Both take an already loaded model and tokenizer, freeze the model, and put the visual prefix in front of the
text embeddings. Text is tokenised without the tokenizer's own special tokens and the wrappers add them
themselves (BOS for decoder-only models whose tokenizer adds one, EOS for encoders whose tokenizer adds
one, and always an EOS after each target), so that every model sees the same layout.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch

from blipkit.errors import ConfigError, ModelUnavailableError
from blipkit.interfaces import LanguageModel, LMBatch

__all__ = ["CausalLM", "Seq2SeqLM", "resolve_dtype", "wrap"]

IGNORE_INDEX = -100

GENERATION_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 30,
    "min_new_tokens": 0,
    "num_beams": 1,
    "do_sample": False,
    "top_p": 1.0,
    "top_k": 50,
    "temperature": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "num_return_sequences": 1,
    "no_repeat_ngram_size": 0,
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn a dtype option ("float32", "bf16", torch.float16, ...) into a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"dtype '{dtype}' is not supported; use one of: float32, bfloat16, float16") from None


def _first_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _all_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _join(prompt: str, target: str) -> str:
    """The target as it reads after the prompt: a space between them unless one side already has it."""
    if prompt and not prompt[-1].isspace() and target and not target[0].isspace():
        return " " + target
    return target


LORA_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "smollm3", "gemma", "gemma2"),
        ["q_proj", "k_proj", "v_proj", "o_proj"],
    ),
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    **dict.fromkeys(("t5", "mt5", "umt5"), ["q", "k", "v", "o"]),
}
"""The attention projections LoRA adapts by default, per transformers ``model_type``."""


def _hf_config(model: Any) -> Any:
    """The transformers config behind a LanguageModel wrapper, a (peft-wrapped) HF model or a config."""
    seen = 0
    while not hasattr(model, "model_type") and seen < 4:
        if hasattr(model, "config") and hasattr(model.config, "model_type"):
            return model.config
        model = getattr(model, "model", None)
        seen += 1
    return model


def default_lora_targets(model: Any) -> list[str]:
    """LoRA target modules for a language model (wrapper, HF model or config), from its config's model_type."""
    model_type = getattr(_hf_config(model), "model_type", None)
    if model_type not in LORA_TARGETS:
        raise ConfigError(
            f"no default LoRA target modules for model type '{model_type}'; set llm.lora.target_modules "
            "to the names of its attention projection layers (e.g. [q_proj, v_proj])"
        )
    return list(LORA_TARGETS[model_type])


class _HFLanguageModel(LanguageModel):
    """What both wrappers share: freezing, embeddings, special tokens, padding, generation options."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "", max_target_tokens: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "name_or_path", "") or type(model).__name__
        self.max_target_tokens = max_target_tokens
        # The longest sequence the model takes (its learned or trained positions); None when it names none.
        self.max_positions: int | None = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", None
        )
        self.hidden_size = int(model.config.hidden_size)
        model.requires_grad_(False)
        model.eval()

        self.eos_token_id = _first_id(tokenizer.eos_token_id)
        if self.eos_token_id is None:
            self.eos_token_id = _first_id(getattr(model.generation_config, "eos_token_id", None))
        if self.eos_token_id is None:
            self.eos_token_id = _first_id(model.config.eos_token_id)
        if self.eos_token_id is None:
            raise ModelUnavailableError(
                f"language model '{self.name}' has no EOS token in its tokenizer or config; add one "
                "(tokenizer.eos_token) so that generation can stop"
            )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(self.eos_token_id)
        self.pad_token_id = int(tokenizer.pad_token_id)
        self._adds_bos, self._adds_eos = self._special_tokens_added()

    def lora_targets(self) -> list[str]:
        """The attention projections of this model's family (raises ConfigError for a family not in the table)."""
        return default_lora_targets(self.model)

    def _special_tokens_added(self) -> tuple[bool, bool]:
        """Whether the tokenizer, left to itself, puts BOS first / EOS last."""
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        bos = self.tokenizer.bos_token_id
        adds_bos = bos is not None and len(full) > len(plain) and full[0] == bos and plain[:1] != [bos]
        eos = self.tokenizer.eos_token_id
        adds_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and plain[-1:] != [eos]
        return adds_bos, adds_eos

    def train(self, mode: bool = True) -> _HFLanguageModel:
        """Set training mode; the wrapped model stays in eval mode unless some of its weights train (LoRA)."""
        super().train(mode)
        self.model.train(mode and any(p.requires_grad for p in self.model.parameters()))
        return self

    @property
    def device(self) -> torch.device:
        """Where the model's input embeddings live."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's input embeddings."""
        return self.model.get_input_embeddings().weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] to input embeddings [B, T, hidden_size]."""
        return self.model.get_input_embeddings()(input_ids.to(self.device))

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _limit(self, ids: list[int]) -> list[int]:
        """A target's ids cut to ``max_target_tokens`` and to the model's positions: a caption of any length
        is truncated, never fed whole."""
        limits = [n for n in (self.max_target_tokens, self.max_positions) if n is not None]
        return ids[: min(limits)] if limits else ids

    def _fit(self, rows: torch.Tensor) -> torch.Tensor:
        """Sequences [B, T, ...] cut to the model's positions (keeping the start)."""
        return rows if self.max_positions is None else rows[:, : self.max_positions]

    def _target_ids(self, text: str) -> list[int]:
        return self._limit(self._encode(text)) + [self.eos_token_id]

    def _prefix(self, prefix_embeds: torch.Tensor) -> torch.Tensor:
        return prefix_embeds.to(device=self.device, dtype=self.dtype)

    @staticmethod
    def _broadcast(prompts: list[str] | str, batch_size: int) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if len(prompts) == 1 and batch_size > 1:
            prompts = prompts * batch_size
        if len(prompts) != batch_size:
            raise ConfigError(f"got {len(prompts)} prompts for {batch_size} images; pass one prompt or one per image")
        return prompts

    def _stop_ids(self) -> list[int]:
        """Our EOS first, then any other EOS the model's generation config names."""
        ids = [self.eos_token_id]
        for extra in _all_ids(getattr(self.model.generation_config, "eos_token_id", None)):
            if extra not in ids:
                ids.append(extra)
        return ids

    def _generation_kwargs(self, generation: dict[str, Any]) -> dict[str, Any]:
        if "max_length" in generation:
            raise ConfigError("generation option 'max_length' is not supported; use max_new_tokens")
        unknown = sorted(set(generation) - set(GENERATION_DEFAULTS))
        if unknown:
            raise ConfigError(
                f"unknown generation option '{unknown[0]}'; options: {', '.join(sorted(GENERATION_DEFAULTS))}"
            )
        options = {**GENERATION_DEFAULTS, **{k: v for k, v in generation.items() if v is not None}}
        options["eos_token_id"] = self._stop_ids()
        options["pad_token_id"] = self.pad_token_id
        return options

    def _run_generate(self, **inputs: Any) -> torch.Tensor:
        with warnings.catch_warnings():
            # With inputs_embeds the penalties apply to the generated tokens only, which is what we want.
            warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
            warnings.filterwarnings("ignore", message="Passing `no_repeat_ngram_size` with `inputs_embeds`")
            return self.model.generate(**inputs)

    def _decode(self, sequences: torch.Tensor) -> list[str]:
        """Text of each sequence up to its first EOS (which a tokenizer may not mark as special)."""
        stops = set(self._stop_ids())
        rows = []
        for row in sequences.tolist():
            cut = next((i for i, token in enumerate(row) if token in stops), len(row))
            rows.append(row[:cut])
        return [text.strip() for text in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]


def _forward_parameters(model: Any) -> set[str]:
    """The keyword arguments of the (peft-wrapped) model's own forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _keeps_logits(model: Any) -> bool:
    """Whether the causal LM's forward takes ``logits_to_keep`` (a tensor of positions) as transformers' do."""
    return "logits_to_keep" in _forward_parameters(model)


def _pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)


def _mask_right(rows: list[list[int]]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long).reshape(
        len(rows), width
    )


class CausalLM(_HFLanguageModel):
    """A decoder-only model: [visual prefix][BOS?][prompt][target][EOS], loss on target and EOS."""

    is_encoder_decoder = False

    def __init__(self, model: Any, tokenizer: Any, name: str = "", max_target_tokens: int | None = None) -> None:
        super().__init__(model, tokenizer, name=name, max_target_tokens=max_target_tokens)
        tokenizer.padding_side = "left"

    def _prompt_ids(self, prompt: str, room: int | None = None) -> list[int]:
        """BOS (when the tokenizer adds one) and the prompt's ids; a prompt longer than ``room`` (default: the
        model's positions) keeps its end, which the answer continues."""
        bos = [self.tokenizer.bos_token_id] if self._adds_bos else []
        ids = self._encode(prompt)
        room = self.max_positions if room is None else room
        if room is not None and len(bos) + len(ids) > room:
            ids = ids[len(ids) - max(room - len(bos), 0) :]
        return bos + ids

    def _continuation_ids(self, prompt: str, target: str) -> list[int]:
        """Target ids (+ EOS) as the tokenizer splits them when the target follows the prompt in one text."""
        text = _join(prompt, target)
        if prompt:
            head = self._encode(prompt)
            full = self._encode(prompt + text)
            if full[: len(head)] == head:
                return self._limit(full[len(head) :]) + [self.eos_token_id]
        return self._target_ids(text)

    def tokenize(self, prompts: list[str], targets: list[str], prefix_lm: bool = False) -> LMBatch:
        """Tokenise prompt/target pairs, right-padded; labels are -100 on prompt and padding.

        ``prefix_lm`` only concerns encoder-decoder models and is ignored here.
        """
        prompts = self._broadcast(prompts, len(targets))
        ids: list[list[int]] = []
        labels: list[list[int]] = []
        for prompt, target in zip(prompts, targets):
            prompt_ids = self._prompt_ids(prompt)
            target_ids = self._continuation_ids(prompt, target)
            ids.append(prompt_ids + target_ids)
            labels.append([IGNORE_INDEX] * len(prompt_ids) + target_ids)
        return LMBatch(
            input_ids=_pad_right(ids, self.pad_token_id),
            attention_mask=_mask_right(ids),
            labels=_pad_right(labels, IGNORE_INDEX),
        )

    def loss(self, prefix_embeds: torch.Tensor, batch: LMBatch) -> torch.Tensor:
        """Mean cross-entropy over target tokens (EOS included) after [prefix][prompt]."""
        batch = batch.to(self.device)
        prefix = self._prefix(prefix_embeds)
        size, length = prefix.shape[:2]
        embeds = self._fit(torch.cat([prefix, self.embed(batch.input_ids)], dim=1))
        ones = torch.ones(size, length, dtype=batch.attention_mask.dtype, device=self.device)
        ignore = torch.full((size, length), IGNORE_INDEX, dtype=batch.labels.dtype, device=self.device)
        labels = self._fit(torch.cat([ignore, batch.labels], dim=1))
        mask = self._fit(torch.cat([ones, batch.attention_mask], dim=1))
        targets = labels[:, 1:]
        # Only positions that predict a label need the vocabulary-sized head: the visual prefix and most of
        # the prompt do not, and their logits would cost time and B x L x vocab memory for nothing.
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        if keep.numel() == 0 or not _keeps_logits(self.model):
            return self.model(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False).loss
        logits = self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
        return torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), targets[:, keep].flatten(), ignore_index=IGNORE_INDEX
        )

    @torch.no_grad()
    def generate(self, prefix_embeds: torch.Tensor, prompts: list[str], **generation: Any) -> list[str]:
        """Generate after [prefix][prompt] (left-padded); returns B * num_return_sequences strings."""
        prefix = self._prefix(prefix_embeds)
        size, length, hidden = prefix.shape
        room = None
        if self.max_positions is not None:
            new = generation.get("max_new_tokens") or GENERATION_DEFAULTS["max_new_tokens"]
            room = max(self.max_positions - length - new, 1)
        rows = [self._prompt_ids(p, room) for p in self._broadcast(prompts, size)]
        width = max(len(r) for r in rows)
        pad_embed = self.embed(torch.tensor([self.pad_token_id], device=self.device))[0].to(self.dtype)
        embeds = []
        masks = []
        for i, row in enumerate(rows):
            missing = width - len(row)
            text = self.embed(torch.tensor(row, dtype=torch.long, device=self.device)).reshape(len(row), hidden)
            embeds.append(torch.cat([pad_embed.expand(missing, hidden), prefix[i], text.to(self.dtype)], dim=0))
            masks.append([0] * missing + [1] * (length + len(row)))
        inputs = {
            "inputs_embeds": torch.stack(embeds),
            "attention_mask": torch.tensor(masks, dtype=torch.long, device=self.device),
        }
        options = self._generation_kwargs(generation)
        sequences = self._run_generate(**inputs, **self._shared_cache(inputs, options), **options)
        return self._decode(sequences)

    def _shared_cache(self, inputs: dict[str, torch.Tensor], options: dict[str, Any]) -> dict[str, Any]:
        """The key/value cache of every input position but the last, computed once per row and repeated for
        each beam (or returned sequence): generate would otherwise run the whole visual prefix and prompt
        once per copy, most of a short beam search's work. Empty where the model's cache API is not
        transformers' ``cache=`` with a DynamicCache."""
        from transformers import DynamicCache

        copies = max(int(options["num_beams"]), int(options["num_return_sequences"]))
        embeds, mask = inputs["inputs_embeds"], inputs["attention_mask"]
        accepts = _forward_parameters(self.model)
        if copies == 1 or embeds.shape[1] < 2 or not {"cache", "position_ids"} <= accepts:
            return {}
        head = {"inputs_embeds": embeds[:, :-1], "attention_mask": mask[:, :-1], "use_cache": True,
                "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)[:, :-1]}
        if "logits_to_keep" in accepts:
            head["logits_to_keep"] = 1
        cache = getattr(self.model(**head), "cache", None)
        if not isinstance(cache, DynamicCache):
            return {}
        cache.batch_repeat_interleave(copies)
        return {"cache": cache}


class Seq2SeqLM(_HFLanguageModel):
    """An encoder-decoder model: encoder [visual prefix][prompt][EOS?], decoder target + EOS."""

    is_encoder_decoder = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str = "",
        max_target_tokens: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(model, tokenizer, name=name, max_target_tokens=max_target_tokens)
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def _encoder_ids(self, prompt: str) -> list[int]:
        eos = [self.tokenizer.eos_token_id] if self._adds_eos else []
        ids = self._encode(prompt)
        if self.max_positions is not None:
            ids = ids[max(len(ids) + len(eos) - self.max_positions, 0) :]
        return ids + eos

    def split_prefix_lm(self, text: str, generator: torch.Generator | None = None) -> tuple[str, str]:
        """Split ``text`` at a random word: (first words for the encoder, the rest as the target, never empty)."""
        words = text.split()
        if len(words) < 2:
            return "", text
        cut = int(torch.randint(0, len(words), (1,), generator=generator or self.generator))
        return " ".join(words[:cut]), " ".join(words[cut:])

    def tokenize(
        self,
        prompts: list[str],
        targets: list[str],
        prefix_lm: bool = False,
        generator: torch.Generator | None = None,
    ) -> LMBatch:
        """Encoder prompt ids and decoder labels (target + EOS), both right-padded.

        With ``prefix_lm``, samples whose prompt is empty get their target split at a random word
        (``generator``, else the model's seeded generator): the first part becomes the encoder prompt.
        """
        prompts = self._broadcast(prompts, len(targets))
        encoder_rows: list[list[int]] = []
        label_rows: list[list[int]] = []
        for prompt, target in zip(prompts, targets):
            if prefix_lm and not prompt.strip():
                prompt, target = self.split_prefix_lm(target, generator)
            encoder_rows.append(self._encoder_ids(prompt))
            label_rows.append(self._target_ids(target))
        return LMBatch(
            input_ids=_pad_right(encoder_rows, self.pad_token_id),
            attention_mask=_mask_right(encoder_rows),
            labels=_pad_right(label_rows, IGNORE_INDEX),
            decoder_attention_mask=_mask_right(label_rows),
        )

    def _encoder_inputs(self, prefix: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        ones = torch.ones(prefix.shape[:2], dtype=mask.dtype, device=self.device)
        return {
            "inputs_embeds": self._fit(torch.cat([prefix, self.embed(input_ids).to(self.dtype)], dim=1)),
            "attention_mask": self._fit(torch.cat([ones, mask.to(self.device)], dim=1)),
        }

    def loss(self, prefix_embeds: torch.Tensor, batch: LMBatch) -> torch.Tensor:
        """Mean cross-entropy over the decoder targets (EOS included)."""
        batch = batch.to(self.device)
        out = self.model(
            **self._encoder_inputs(self._prefix(prefix_embeds), batch.input_ids, batch.attention_mask),
            labels=batch.labels,
            decoder_attention_mask=batch.decoder_attention_mask,
            use_cache=False,
        )
        return out.loss

    @torch.no_grad()
    def generate(self, prefix_embeds: torch.Tensor, prompts: list[str], **generation: Any) -> list[str]:
        """Decode from the encoder's [prefix][prompt]; returns B * num_return_sequences strings."""
        prefix = self._prefix(prefix_embeds)
        rows = [self._encoder_ids(p) for p in self._broadcast(prompts, prefix.shape[0])]
        options = self._generation_kwargs(generation)
        start = self.model.generation_config.decoder_start_token_id
        if start is None:
            start = self.model.config.decoder_start_token_id
        options["decoder_start_token_id"] = start
        sequences = self._run_generate(
            **self._encoder_inputs(prefix, _pad_right(rows, self.pad_token_id), _mask_right(rows)),
            **options,
        )
        return self._decode(sequences[:, 1:])


def wrap(
    model: Any,
    tokenizer: Any,
    name: str = "",
    max_target_tokens: int | None = None,
    seed: int | None = None,
) -> CausalLM | Seq2SeqLM:
    """Wrap a loaded transformers model in the wrapper its config calls for (``seed``: prefix-LM splits)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return Seq2SeqLM(model, tokenizer, name=name, max_target_tokens=max_target_tokens, seed=seed)
    return CausalLM(model, tokenizer, name=name, max_target_tokens=max_target_tokens)
