"""Tiny random language models for tests and smoke runs: ``tiny-llama`` and ``tiny-t5``.

Each comes with a small word-level tokenizer built in code over a fixed English vocabulary (colours,
shapes, digits, punctuation, question/answer words), so they run anywhere without downloads and go
through exactly the same wrappers as real models.
"""

from __future__ import annotations

from typing import Any

from blipkit import hookimpl
from blipkit.errors import ConfigError

from ._hf import CausalLM, Seq2SeqLM, resolve_dtype

__all__ = ["SPECIAL_TOKENS", "WORDS", "build_tokenizer", "tiny_llama", "tiny_t5"]

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")

WORDS = (
    # function words
    "a an the of in on at to with and or is are was be it its this that there these those has have "
    "for from by as not no yes one two three four five six seven eight nine ten many some all "
    # questions and prompts
    "what which where who how why when colour color shape size number count question answer short "
    "caption describe picture image photo shows showing kind object objects thing things "
    # colours
    "red green blue yellow white purple black orange pink brown grey gray "
    # shapes
    "circle circles square squares triangle triangles star rectangle shape shapes dot line "
    # positions and sizes
    "left right top bottom center centre middle above below next near corner side upper lower "
    "small large big little tiny huge "
    # common nouns and verbs
    "background foreground cat dog man woman person people car tree house table sky water "
    "sitting standing on there"
).split()

PUNCTUATION = list(".,?!:;'\"-()")
DIGITS = [str(d) for d in range(10)]


def build_tokenizer(add_bos: bool = False, add_eos: bool = False, pad_token: bool = True) -> Any:
    """A word-level PreTrainedTokenizerFast over WORDS, digits and punctuation (lower-cased).

    ``add_bos`` / ``add_eos`` make it put ``<s>`` first / ``</s>`` last like Llama / T5 tokenizers do;
    ``pad_token=False`` leaves the pad token unset, as many decoder-only tokenizers ship.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *WORDS, *DIGITS, *PUNCTUATION):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    # WordPiece's decoder joins words with spaces and its cleanup glues punctuation back on.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    template = " ".join(["<s>"] * add_bos + ["$A"] + ["</s>"] * add_eos)
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if pad_token:
        specials["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def _vocab_size(tokenizer: Any, vocab_size: int | None) -> int:
    size = len(tokenizer)
    if vocab_size is None:
        return size
    if vocab_size < size:
        raise ConfigError(f"vocab_size {vocab_size} is smaller than the tiny tokenizer's {size} tokens; use >= {size}")
    return vocab_size


def _seeded(build: Any, seed: int) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_llama(
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 64,
    vocab_size: int | None = None,
    seed: int = 0,
    max_target_tokens: int | None = None,
    dtype: str = "float32",
    initializer_range: float = 0.5,
) -> CausalLM:
    """A random Llama (decoder-only) with the tiny tokenizer (adds BOS), weights fixed by ``seed``.

    ``initializer_range`` is far above Llama's 0.02 so that the frozen random model has logits a visual
    prefix can steer: with near-zero weights every output is close to uniform and no bridge could learn.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch_dtype = resolve_dtype(dtype)
    tokenizer = build_tokenizer(add_bos=True)
    config = LlamaConfig(
        vocab_size=_vocab_size(tokenizer, vocab_size),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    model = _seeded(lambda: LlamaForCausalLM(config), seed).to(torch_dtype)
    return CausalLM(model, tokenizer, name="tiny-llama", max_target_tokens=max_target_tokens)


def tiny_t5(
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 64,
    vocab_size: int | None = None,
    seed: int = 0,
    max_target_tokens: int | None = None,
    dtype: str = "float32",
) -> Seq2SeqLM:
    """A random T5 (encoder-decoder) with the tiny tokenizer (adds EOS), weights and prefix-LM splits fixed by ``seed``."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch_dtype = resolve_dtype(dtype)
    tokenizer = build_tokenizer(add_eos=True)
    if hidden_size % num_heads:
        raise ConfigError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    config = T5Config(
        vocab_size=_vocab_size(tokenizer, vocab_size),
        d_model=hidden_size,
        d_kv=hidden_size // num_heads,
        d_ff=intermediate_size,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="relu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = _seeded(lambda: T5ForConditionalGeneration(config), seed).to(torch_dtype)
    return Seq2SeqLM(model, tokenizer, name="tiny-t5", max_target_tokens=max_target_tokens, seed=seed)


@hookimpl
def register_language_models(register: Any) -> None:
    """Register tiny-llama and tiny-t5."""
    register(
        "tiny-llama",
        tiny_llama,
        description="tiny random Llama (decoder-only) with a built-in word-level tokenizer, for tests",
        kind="decoder-only",
        available=True,
    )
    register(
        "tiny-t5",
        tiny_t5,
        description="tiny random T5 (encoder-decoder) with a built-in word-level tokenizer, for tests",
        kind="encoder-decoder",
        available=True,
    )
