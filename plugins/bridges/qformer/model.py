"""The BLIP-2 Q-Former bridge: learned queries that read frozen image tokens through cross-attention,
with a BERT text branch for the stage-1 objectives (ITC, ITM, ITG)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blipkit.errors import BlipkitError, ConfigError, DataError
from blipkit.interfaces import Bridge, BridgeOutput
from blipkit.io import atomic_path, load_safetensors, read_json

from .init import MINILM, bert_state_for, build_tokenizer, init_bert_style, resolve_init
from .keymap import to_transformers_generation
from .layers import ImageBlock, KeyValue, QFormerLayer, additive_mask, real_rows

TokenizedText = Mapping[str, torch.Tensor]
LayerImages = Sequence[Sequence[ImageBlock] | None]


@dataclass
class QueryPass:
    """The query-only pass over one batch of images, kept for reuse by the stage-1 objectives."""

    hidden: torch.Tensor
    past: list[KeyValue]
    image_kv: list[KeyValue | None]
    image_mask: torch.Tensor | None
    attentions: tuple[torch.Tensor, ...] | None


@dataclass
class Expansion:
    """A pass whose first layer runs on U texts and the rest on R rows (row r continuing text ``rows[r]``),
    with the self-attention mask and real text rows of the R-row layout."""

    rows: torch.Tensor
    self_mask: torch.Tensor
    text_rows: torch.Tensor | None


@contextlib.contextmanager
def fp32(device: torch.device) -> Iterator[None]:
    """Run the block with autocast off: the Q-Former computes in fp32 whatever the caller's autocast."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


class LMHead(nn.Module):
    """BERT's prediction head: dense, GELU, LayerNorm, then a decoder tied to the word embeddings."""

    def __init__(self, hidden_size: int, vocab_size: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """Logits [..., vocab] for ``hidden`` [..., H]."""
        return F.linear(self.norm(F.gelu(self.dense(hidden))), word_embeddings, self.bias)


class TextEmbeddings(nn.Module):
    """Word + absolute position embeddings (no token types), LayerNorm and dropout; queries share the
    LayerNorm and dropout but take no position embedding."""

    def __init__(
        self, vocab_size: int, hidden_size: int, max_positions: int, pad_id: int, dropout: float, eps: float
    ) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_id)
        self.position = nn.Embedding(max_positions, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        queries: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        words: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed [queries | text] -> [B, Q + T, H]; ``words`` [B, T, H], when given, are the word embeddings
        of ``input_ids`` looked up beforehand."""
        parts = [] if queries is None else [queries]
        if input_ids is not None:
            if input_ids.shape[1] > self.position.num_embeddings:
                raise DataError(
                    f"text of {input_ids.shape[1]} tokens exceeds the Q-Former's {self.position.num_embeddings} "
                    "positions; tokenize with a smaller max_length"
                )
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append((self.word(input_ids) if words is None else words) + self.position(positions))
        return self.dropout(self.norm(torch.cat(parts, dim=1)))


def grid_position_embedding(rows: int, cols: int, dim: int) -> torch.Tensor:
    """A 2-D sin-cos position embedding [rows * cols, dim], row-major: half the channels encode the row,
    half the column, each as sines and cosines of geometrically spaced frequencies (MAE's)."""
    if rows < 1 or cols < 1 or dim % 4:
        raise ConfigError(
            f"image_grid [{rows}, {cols}] over {dim}-wide tokens: the grid needs positive sides and the width a "
            "multiple of 4"
        )
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def axis(length: int) -> torch.Tensor:
        angles = torch.arange(length, dtype=torch.float64)[:, None] * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    row = axis(rows)[:, None].expand(rows, cols, dim // 2)
    col = axis(cols)[None, :].expand(rows, cols, dim // 2)
    return torch.cat([row, col], dim=-1).reshape(rows * cols, dim).float()


OBJECTIVES = ("itc", "itm", "itg", "spell")
"""The stage-1 losses a Q-Former can train: BLIP-2's contrastive, matching and image-grounded generation,
and blipkit's query spelling (query k names the caption's k-th word)."""
BLIP2_OBJECTIVES = OBJECTIVES[:3]


def _chosen(objectives: Sequence[str] | None) -> tuple[str, ...]:
    """The stage-1 losses picked (BLIP-2's three when None), in ``OBJECTIVES``' order; ConfigError for anything else."""
    objectives = BLIP2_OBJECTIVES if objectives is None else objectives
    if isinstance(objectives, str) or not objectives or set(objectives) - set(OBJECTIVES):
        raise ConfigError(
            f"objectives: expected a non-empty list drawn from {', '.join(OBJECTIVES)} (e.g. [itc, itg]), "
            f"got {objectives!r}"
        )
    return tuple(o for o in OBJECTIVES if o in objectives)


class QFormer(Bridge):
    """BLIP-2's Querying Transformer (LAVIS-faithful), usable as a bridge and trainable in stage 1.

    ``forward`` maps encoder tokens [B, N, input_dim] to query outputs [B, num_queries, hidden_size].
    ``init`` picks the starting weights: "bert-base-uncased" (hub), "minilm" (offline package), a local
    BERT directory, or None/"random". With a BERT, layer count and widths come from its config.
    ``tokenizer``: None (the init BERT's, or "minilm" for a random init), "minilm", "char", a directory
    or a hub id; [DEC] is added as bos. ``config`` records the final sizes with ``init=None``, so a
    saved Q-Former reloads without the BERT. ``objectives``: the stage-1 losses ``stage1_loss`` trains,
    any of "itc", "itm", "itg" (None: these three, as BLIP-2) and "spell" (each query's output, through
    the LM head, names the caption's word at its position, cycling over the caption: a prefix that the
    lexical warm start can map word for word); without "itm" the ITM head stays untrained and
    ``itm_score`` refuses. ``image_grid`` [rows, cols]: the encoder's patch tokens form this grid (after
    at most one CLS token), and a trained 2-D position embedding, started as sin-cos, is added to them after
    ln_vision (None: none, as BLIP-2, whose ViT tokens already carry position).
    """

    supports_retrieval = True
    reads_instructions = True
    # BLIP-2 trains these fresh in every stage and they are not Linear layers, so LoRA cannot adapt them.
    lora_always_trainable = ("query_tokens", "ln_vision", "image_position")
    #: InstructBLIP's cap on the instruction's Q-Former tokens (LAVIS's max_txt_len), cut from the left.
    instruction_max_length = 128

    def __init__(
        self,
        input_dim: int,
        num_queries: int = 32,
        num_layers: int = 12,
        hidden_size: int = 768,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        cross_attention_freq: int = 2,
        dropout: float = 0.1,
        init: str | None = None,
        tokenizer: str | None = None,
        embed_dim: int = 256,
        max_position_embeddings: int = 512,
        layer_norm_eps: float = 1e-12,
        vision_norm_eps: float = 1e-5,
        objectives: Sequence[str] | None = None,
        image_grid: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.objectives = _chosen(objectives)
        if image_grid is not None and (isinstance(image_grid, str) or len(image_grid) != 2):
            raise ConfigError(f"image_grid: expected [rows, cols] of the encoder's patch tokens (e.g. [7, 7]), got {image_grid!r}")
        self.image_grid = None if image_grid is None else (int(image_grid[0]), int(image_grid[1]))
        if cross_attention_freq < 1:
            raise ConfigError(f"cross_attention_freq must be >= 1, got {cross_attention_freq}")
        source = resolve_init(init)
        sizes = {
            "num_layers": num_layers, "hidden_size": hidden_size, "num_heads": num_heads,
            "intermediate_size": intermediate_size, "max_position_embeddings": max_position_embeddings,
            "layer_norm_eps": layer_norm_eps,
        }
        if source is not None:
            sizes.update(source.sizes())
            tokenizer = source.tokenizer_spec if tokenizer is None else tokenizer
        if sizes["hidden_size"] % sizes["num_heads"]:
            raise ConfigError(f"hidden_size {sizes['hidden_size']} is not a multiple of num_heads {sizes['num_heads']}")
        tokenizer = MINILM if tokenizer is None else tokenizer
        self.tokenizer = build_tokenizer(tokenizer)
        self.input_dim = input_dim
        self.num_queries = num_queries
        self.output_dim = self.hidden_size = sizes["hidden_size"]
        self.config: dict[str, Any] = {
            "input_dim": input_dim, "num_queries": num_queries, **sizes,
            "cross_attention_freq": cross_attention_freq, "dropout": dropout, "init": None, "tokenizer": tokenizer,
            "embed_dim": embed_dim, "vision_norm_eps": vision_norm_eps, "objectives": list(self.objectives),
            "image_grid": None if self.image_grid is None else list(self.image_grid),
        }
        self._build(cross_attention_freq, dropout, embed_dim, vision_norm_eps, **sizes)
        init_bert_style(self)
        nn.init.normal_(self.query_tokens, std=0.02)
        if self.image_grid is not None:
            self.image_position = nn.Parameter(grid_position_embedding(*self.image_grid, input_dim))
        if source is not None:
            result = self.load_state_dict(bert_state_for(source, len(self.tokenizer), self.state_dict()), strict=False)
            new_parts = (".cross_attn.", ".ffn_query.")
            if any(k.startswith("layers.") and not any(p in k for p in new_parts) for k in result.missing_keys):
                raise ConfigError(f"init: {init} is missing BERT encoder weights; pass a complete BERT checkpoint")
        self.copy_text_ffn_to_query_ffn()

    def _build(self, cross_attention_freq: int, dropout: float, embed_dim: int, vision_norm_eps: float, *, num_layers: int,
               hidden_size: int, num_heads: int, intermediate_size: int, max_position_embeddings: int,
               layer_norm_eps: float) -> None:
        """Create the layers: ``ln_vision``, the queries, the BERT-shaped stack with cross-attention every
        ``cross_attention_freq`` layers, and the stage-1 heads."""
        vocab_size = len(self.tokenizer)
        self.ln_vision = nn.LayerNorm(self.input_dim, eps=vision_norm_eps)
        self.query_tokens = nn.Parameter(torch.zeros(1, self.num_queries, hidden_size))
        self.embeddings = TextEmbeddings(
            vocab_size, hidden_size, max_position_embeddings, self.tokenizer.pad_token_id, dropout, layer_norm_eps
        )
        self.layers = nn.ModuleList(
            QFormerLayer(
                hidden_size,
                num_heads,
                intermediate_size,
                self.input_dim,
                has_cross_attention=i % cross_attention_freq == 0,
                dropout=dropout,
                eps=layer_norm_eps,
            )
            for i in range(num_layers)
        )
        self.lm_head = LMHead(hidden_size, vocab_size, layer_norm_eps)
        self.vision_proj = nn.Linear(hidden_size, embed_dim)
        self.text_proj = nn.Linear(hidden_size, embed_dim)
        self.itm_head = nn.Linear(hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))

    @torch.no_grad()
    def copy_text_ffn_to_query_ffn(self) -> None:
        """Initialise each layer's query FFN as a copy of its text FFN (LAVIS's init)."""
        for layer in self.layers:
            layer.ffn_query.load_state_dict(layer.ffn.state_dict())

    @property
    def cross_attention_layers(self) -> list[int]:
        """Indices of the layers that cross-attend to the image."""
        return [i for i, layer in enumerate(self.layers) if layer.cross_attn is not None]

    # ---- passes ----------------------------------------------------------------------------------

    def _run(
        self,
        hidden: torch.Tensor,
        num_queries: int,
        self_mask: torch.Tensor | None,
        past: Sequence[KeyValue] | None = None,
        image: LayerImages | None = None,
        need_weights: bool = False,
        first: int | None = None,
        text_rows: torch.Tensor | None = None,
        expand: Expansion | None = None,
    ) -> tuple[torch.Tensor, list[KeyValue], list[torch.Tensor]]:
        presents: list[KeyValue] = []
        weights: list[torch.Tensor] = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden, present, cross = layer(
                hidden,
                num_queries,
                self_mask,
                past[i] if past is not None else None,
                image[i] if image is not None else None,
                need_weights,
                first if i == last else None,
                text_rows,
                expand.rows if expand is not None and i == 0 else None,
            )
            if expand is not None and i == 0:
                self_mask, text_rows = expand.self_mask, expand.text_rows
            presents.append(present)
            if cross is not None:
                weights.append(cross)
        return hidden, presents, weights

    def project_image(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, list[KeyValue | None]]:
        """Encoder tokens normalised as ln_vision does but not yet scaled and shifted, and every
        cross-attention layer's keys/values for ln_vision's output."""
        norm = self.ln_vision
        normed = F.layer_norm(image_tokens.to(norm.weight.dtype), norm.normalized_shape, eps=norm.eps)
        return normed, self.project_normed(normed)

    def project_normed(self, normed: torch.Tensor) -> list[KeyValue | None]:
        """Every cross-attention layer's keys/values for ln_vision applied to ``normed`` (from ``project_image``),
        with the image position embedding added when there is one."""
        offset = self.image_offset(normed.shape[1])
        return [
            None if layer.cross_attn is None else layer.cross_attn.project_kv(normed, self.ln_vision, offset)
            for layer in self.layers
        ]

    def image_offset(self, num_tokens: int) -> torch.Tensor | None:
        """What ``image_grid``'s position embedding adds to each of ``num_tokens`` encoder tokens
        [num_tokens, input_dim] (zero for a leading CLS token), or None without a grid."""
        if self.image_grid is None:
            return None
        rows, cols = self.image_grid
        cells = rows * cols
        if num_tokens not in (cells, cells + 1):
            raise ConfigError(
                f"bridge.options.image_grid is [{rows}, {cols}] ({cells} patch tokens) but the encoder gives "
                f"{num_tokens} tokens; set it to the encoder's patch grid (`blipkit encoders NAME` describes it)"
            )
        return F.pad(self.image_position, (0, 0, num_tokens - cells, 0))

    @staticmethod
    def image_additive_mask(image_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Encoder-token keep mask [B, N] -> additive mask [B, 1, 1, N]."""
        return None if image_mask is None else additive_mask(image_mask)[:, None, None, :]

    @staticmethod
    def image_blocks(image_kv: Sequence[KeyValue | None], image_mask: torch.Tensor | None) -> list[list[ImageBlock] | None]:
        """Per layer, the cross-attention input of a pass whose row b reads image b (``image_mask`` additive or None)."""
        return [None if kv is None else [ImageBlock(kv, image_mask)] for kv in image_kv]

    def query_pass(
        self,
        image_kv: Sequence[KeyValue | None],
        image_mask: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> QueryPass:
        """Queries only, cross-attending to projected image tokens (``image_mask`` additive or None)."""
        batch = next(kv[0].shape[0] for kv in image_kv if kv is not None)
        hidden = self.embeddings(queries=self.query_tokens.expand(batch, -1, -1))
        image = self.image_blocks(image_kv, image_mask)
        hidden, past, weights = self._run(hidden, self.num_queries, None, None, image, output_attentions)
        return QueryPass(hidden, past, list(image_kv), image_mask, tuple(weights) if output_attentions else None)

    def forward(
        self,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> BridgeOutput:
        """Encoder tokens [B, N, input_dim] (mask [B, N], 1 = keep) -> queries [B, Q, H] in fp32;
        with ``output_attentions``, one [B, heads, Q, N] cross-attention map per cross-attention layer."""
        with fp32(image_tokens.device):
            _, kv = self.project_image(image_tokens)
            out = self.query_pass(kv, self.image_additive_mask(image_mask), output_attentions)
        return BridgeOutput(queries=out.hidden, attentions=out.attentions)

    def instructed(
        self,
        image_tokens: torch.Tensor,
        instructions: Sequence[str] | TokenizedText,
        image_mask: torch.Tensor | None = None,
    ) -> BridgeOutput:
        """InstructBLIP's query outputs [B, Q, H] in fp32: the instruction's tokens join the queries in
        self-attention (text through the text FFN), only the queries read the image, and only their
        outputs are returned. ``instructions``: strings (``tokenize_instructions``) or a tokenized batch."""
        if isinstance(instructions, Mapping):
            tokens = self.as_tokenized(instructions)
        else:
            tokens = self.tokenize_instructions(instructions)
        with fp32(image_tokens.device):
            _, kv = self.project_image(image_tokens)
            image = self.image_blocks(kv, self.image_additive_mask(image_mask))
            hidden = self.pair_pass(tokens["input_ids"], tokens["attention_mask"], image, queries_only=True)
        return BridgeOutput(queries=hidden)

    def tokenize_instructions(self, instructions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Instructions -> {input_ids, attention_mask} [B, T] as InstructBLIP tokenizes them for its Q-Former:
        [CLS] text [SEP], padded to the longest, at most ``instruction_max_length`` tokens, a longer text
        losing its start."""
        if isinstance(instructions, str):
            instructions = [instructions]
        side = self.tokenizer.truncation_side
        self.tokenizer.truncation_side = "left"
        try:
            encoded = self.tokenizer(
                list(instructions), padding="longest", truncation=True, max_length=self.instruction_max_length,
                return_tensors="pt",
            )
        finally:
            self.tokenizer.truncation_side = side
        device = self.query_tokens.device
        return {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}

    def text_pass(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        words: torch.Tensor | None = None,
        cls_only: bool = False,
    ) -> torch.Tensor:
        """Text only, bidirectional over non-pad tokens -> [B, T, H] (position 0 is [CLS]; padding positions
        hold unspecified values in this and the other passes), or with ``cls_only`` [B, 1, H] (the last
        layer then skips the other positions). ``words``: the word embeddings of ``input_ids`` if already
        looked up, in this and the other passes."""
        hidden = self.embeddings(input_ids=input_ids, words=words)
        mask = additive_mask(attention_mask)[:, None, None, :]
        return self._run(hidden, 0, mask, first=1 if cls_only else None, text_rows=real_rows(attention_mask))[0]

    def pair_pass(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image: LayerImages,
        words: torch.Tensor | None = None,
        queries_only: bool = False,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[queries | text] with bidirectional self-attention, queries cross-attending to ``image`` (per layer,
        from ``image_blocks``) -> [B, Q + T, H], or with ``queries_only`` [B, Q, H] (the last layer then skips
        its text positions). With ``rows`` [R], row r pairs text ``rows[r]`` with the image of row r -> [R, ...]:
        the first layer, where no image has reached the text yet, runs once per text."""
        batch = input_ids.shape[0]
        hidden = self.embeddings(queries=self.query_tokens.expand(batch, -1, -1), input_ids=input_ids, words=words)
        first = self.num_queries if queries_only else None
        expand = None
        if rows is not None:
            expanded = attention_mask.index_select(0, rows)
            expand = Expansion(rows, self._pair_mask(expanded), real_rows(expanded))
        mask, text_rows = self._pair_mask(attention_mask), real_rows(attention_mask)
        return self._run(
            hidden, self.num_queries, mask, None, image, first=first, text_rows=text_rows, expand=expand
        )[0]

    def _pair_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = torch.cat([attention_mask.new_ones(attention_mask.shape[0], self.num_queries), attention_mask], dim=1)
        return additive_mask(keep)[:, None, None, :]

    def decoder_pass(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past: Sequence[KeyValue],
        words: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text after a query pass: each token sees all queries (through their cached keys/values) and
        the text up to itself; queries never see text. -> [B, T, H]."""
        batch, length = input_ids.shape
        hidden = self.embeddings(input_ids=input_ids, words=words)
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        text_keep = causal[None] & attention_mask.bool()[:, None, :]
        query_keep = text_keep.new_ones(batch, length, past[0][0].shape[2])
        mask = additive_mask(torch.cat([query_keep, text_keep], dim=2))[:, None]
        return self._run(hidden, 0, mask, past, text_rows=real_rows(attention_mask))[0]

    # ---- text and inference helpers ----------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], max_length: int = 32) -> dict[str, torch.Tensor]:
        """Stage-1 text -> {input_ids, attention_mask} [B, T], padded to the longest, truncated."""
        if isinstance(texts, str):
            texts = [texts]
        encoded = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
        )
        device = self.query_tokens.device
        return {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}

    def as_tokenized(self, text: Sequence[str] | TokenizedText) -> dict[str, torch.Tensor]:
        """Accept raw strings or an already tokenized batch."""
        if isinstance(text, Mapping):
            ids = text["input_ids"].to(self.query_tokens.device)
            mask = text.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(ids.device)
            return {"input_ids": ids, "attention_mask": mask}
        return self.tokenize(text)

    def image_embeds(self, image_tokens: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised query features in ITC space [B, Q, embed_dim]."""
        with fp32(image_tokens.device):
            return F.normalize(self.vision_proj(self(image_tokens, image_mask).queries), dim=-1)

    def text_embeds(self, text: Sequence[str] | TokenizedText) -> torch.Tensor:
        """L2-normalised [CLS] features in ITC space [B, embed_dim]."""
        tokens = self.as_tokenized(text)
        with fp32(tokens["input_ids"].device):
            hidden = self.text_pass(tokens["input_ids"], tokens["attention_mask"], cls_only=True)
            return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    @staticmethod
    def similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """ITC similarity [B_img, B_txt]: the best-matching query's cosine, without temperature."""
        return torch.einsum("iqe,te->itq", image_embeds, text_embeds).amax(dim=-1)

    @property
    def has_itm(self) -> bool:
        """Whether stage 1 trains the image-text matching head (retrieval re-ranks with it only then)."""
        return "itm" in self.objectives

    def itm_logits(
        self, image_tokens: torch.Tensor, text: Sequence[str] | TokenizedText, image_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Match/no-match logits [B, 2] for row-aligned image-text pairs, averaged over queries."""
        if not self.has_itm:
            raise BlipkitError(
                f"this Q-Former was trained without image-text matching (objectives: {', '.join(self.objectives)}), "
                "so it has no ITM scores; rank by ITC similarity, or train with itm among bridge.options.objectives"
            )
        tokens = self.as_tokenized(text)
        with fp32(image_tokens.device):
            _, kv = self.project_image(image_tokens)
            image = self.image_blocks(kv, self.image_additive_mask(image_mask))
            hidden = self.pair_pass(tokens["input_ids"], tokens["attention_mask"], image, queries_only=True)
            return self.itm_head(hidden).mean(dim=1)

    def itm_score(
        self, image_tokens: torch.Tensor, text: Sequence[str] | TokenizedText, image_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The "match" logit [B] of row-aligned pairs, averaged over queries (LAVIS's compute_itm)."""
        return self.itm_logits(image_tokens, text, image_mask)[:, 1]

    # ---- persistence ---------------------------------------------------------------------------------

    def export_state(self, layout: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """For layout "transformers-blip2": the weights under Blip2ForConditionalGeneration's names (queries,
        ``vision_model.post_layernorm`` = ln_vision, the query branch) and that config's fields
        (``num_query_tokens``, ``qformer_config``, ``vision_layer_norm_eps``); None for other layouts, and for a
        Q-Former with an ``image_grid`` position embedding, which transformers' Blip2 has no place for."""
        if layout != "transformers-blip2" or self.image_grid is not None:
            return None
        config = self.config
        qformer_config = {
            "hidden_size": config["hidden_size"], "num_hidden_layers": config["num_layers"],
            "num_attention_heads": config["num_heads"], "intermediate_size": config["intermediate_size"],
            "hidden_act": "gelu", "hidden_dropout_prob": config["dropout"],
            "attention_probs_dropout_prob": config["dropout"],
            "max_position_embeddings": config["max_position_embeddings"], "layer_norm_eps": config["layer_norm_eps"],
            "cross_attention_frequency": config["cross_attention_freq"], "encoder_hidden_size": self.input_dim,
            "vocab_size": len(self.tokenizer), "pad_token_id": self.tokenizer.pad_token_id,
        }
        fields = {
            "num_query_tokens": self.num_queries, "image_text_hidden_size": config["embed_dim"],
            "qformer_config": qformer_config, "vision_layer_norm_eps": self.ln_vision.eps,
        }
        return to_transformers_generation(self.state_dict()), fields

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json, model.safetensors and the tokenizer files into ``path``."""
        super().save_pretrained(path)
        path = Path(path)
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save_pretrained(tmp)
            for file in sorted(Path(tmp).iterdir()):
                with atomic_path(path / file.name) as target:
                    target.write_bytes(file.read_bytes())

    @classmethod
    def from_pretrained(cls, path: str | Path) -> QFormer:
        """Rebuild a Q-Former saved by ``save_pretrained`` (weights, config and tokenizer from ``path``)."""
        path = Path(path)
        config = read_json(path / "config.json")
        config.pop("class", None)
        spec = config.get("tokenizer")
        model = cls(**{**config, "init": None, "tokenizer": str(path)})
        model.config["tokenizer"] = spec
        model.load_state_dict(load_safetensors(path / "model.safetensors"), strict=True)
        return model


__all__ = ["QFormer", "QueryPass"]
