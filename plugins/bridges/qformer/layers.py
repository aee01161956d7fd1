"""Q-Former building blocks: BERT-style attention and feed-forward blocks, and a layer that splits
query positions from text positions (separate FFNs; only queries cross-attend to the image)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

KeyValue = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ImageBlock:
    """What a block of consecutive query rows cross-attends to: the keys/values [B, heads, S, head_dim] and
    additive mask ([B, 1, 1, S] or None) of B images, read by ``repeats * B`` rows, row ``r * B + b``
    reading image ``b``. Rows that read the same image attend to it together, so no keys/values are copied."""

    kv: KeyValue
    mask: torch.Tensor | None = None
    repeats: int = 1


def additive_mask(keep: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Turn a keep mask (1/True = attend) into an additive mask: 0 where kept, the dtype's minimum elsewhere."""
    keep = keep.to(torch.bool)
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


class Attention(nn.Module):
    """Multi-head attention followed by BERT's output block (dense, dropout, residual LayerNorm).

    Keys and values come from ``kv_dim``-wide states: the hidden states for self-attention, the image
    tokens for cross-attention.
    """

    def __init__(self, hidden_size: int, num_heads: int, kv_dim: int, dropout: float, eps: float) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(kv_dim, hidden_size)
        self.value = nn.Linear(kv_dim, hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.attention_dropout = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    def project_kv(
        self, states: torch.Tensor, norm: nn.LayerNorm | None = None, offset: torch.Tensor | None = None
    ) -> KeyValue:
        """Keys and values [B, heads, S, head_dim] of ``states`` [B, S, kv_dim]. With ``norm``, ``states``
        are normalised but not yet scaled and shifted: ``norm``'s weight and bias apply on the way in.
        ``offset`` [S, kv_dim], when given, is added to every image's states after ``norm``."""
        if norm is None:
            if offset is not None:
                states = states + offset
            return self._heads(self.key(states)), self._heads(self.value(states))
        if type(self.key) is nn.Linear and type(self.value) is nn.Linear:
            # Folded into the projection weights, the affine needs no gradient w.r.t. the [B, S, kv_dim]
            # tokens in backward, only the weight gradients: a third of the largest matmuls' work saved.
            # The offset is shared by the batch, so it is projected once.
            k, v = (
                F.linear(states, lin.weight * norm.weight, lin.bias + lin.weight @ norm.bias)
                + (0 if offset is None else F.linear(offset, lin.weight))
                for lin in (self.key, self.value)
            )
            return self._heads(k), self._heads(v)
        return self.project_kv(states * norm.weight + norm.bias, offset=offset)

    def forward(
        self,
        hidden: torch.Tensor,
        kv: KeyValue,
        mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from ``hidden`` [B, L, H] to ``kv``; ``mask`` is additive, broadcastable to [B, heads, L, S]."""
        context, weights = self._attend(self._heads(self.query(hidden)), kv, mask, need_weights)
        return self._output(context, hidden), weights

    def read(
        self, hidden: torch.Tensor, blocks: Sequence[ImageBlock], need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cross-attend from ``hidden`` [R, L, H], whose rows ``blocks`` cover in order, to their images."""
        covered = sum(block.repeats * block.kv[0].shape[0] for block in blocks)
        if covered != hidden.shape[0]:
            raise ValueError(f"image blocks cover {covered} rows, the queries have {hidden.shape[0]}")
        q = self._heads(self.query(hidden))
        length = q.shape[2]
        contexts, weights, start = [], [], 0
        for block in blocks:
            images = block.kv[0].shape[0]
            rows = q[start : start + block.repeats * images]
            start += rows.shape[0]
            # [r * B, heads, L, d] -> [B, heads, r * L, d]: a block's repeats become more query positions.
            folded = rows.unflatten(0, (block.repeats, images)).permute(1, 2, 0, 3, 4).flatten(2, 3)
            context, weight = self._attend(folded, block.kv, block.mask, need_weights)
            contexts.append(_unfold(context, block.repeats, length))
            if weight is not None:
                weights.append(_unfold(weight, block.repeats, length))
        context = contexts[0] if len(contexts) == 1 else torch.cat(contexts)
        return self._output(context, hidden), (torch.cat(weights) if need_weights else None)

    def _attend(
        self, q: torch.Tensor, kv: KeyValue, mask: torch.Tensor | None, need_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        k, v = kv
        if mask is not None and mask.dtype != q.dtype:
            # scaled_dot_product_attention on CPU silently misreads a float32 mask beside float64 inputs.
            mask = mask.to(q.dtype)
        p = self.attention_dropout if self.training else 0.0
        if not need_weights:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p), None
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)
        return F.dropout(weights, p=p, training=self.training) @ v, weights

    def _output(self, context: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        context = context.transpose(1, 2).reshape(*hidden.shape[:-1], -1)
        return self.norm(self.dropout(self.dense(context)) + hidden)


def _unfold(x: torch.Tensor, repeats: int, length: int) -> torch.Tensor:
    """[B, heads, r * L, ...] -> [r * B, heads, L, ...], undoing ``Attention.read``'s folding of repeats."""
    x = x.unflatten(2, (repeats, length))
    return x.permute(2, 0, 1, *range(3, x.dim())).flatten(0, 1)


class FeedForward(nn.Module):
    """BERT's intermediate + output block: Linear, GELU, Linear, dropout, residual LayerNorm."""

    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.down = nn.Linear(intermediate_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the block to ``x`` [..., H]; with ``rows`` (indices into ``x`` flattened to [N, H]) to those
        rows only, passing the others through unchanged."""
        if rows is None:
            return self.norm(self.dropout(self.down(F.gelu(self.up(x)))) + x)
        flat = x.reshape(-1, x.shape[-1])
        return flat.index_copy(0, rows, self(flat.index_select(0, rows))).view_as(x)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, *grad.shape[1:]).index_add_(0, index, grad.contiguous()), None


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)``, whose backward first makes the incoming gradient contiguous: the gradients
    that reach these gathers (attention's key/value gradients, slices of a concatenation) come strided, and on
    those index_add falls back to a generic scatter several times slower."""
    return _GatherRows.apply(x, index)


def real_rows(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Flat indices of the non-pad positions of ``attention_mask`` [B, T], or None when none is padding.

    Padding positions are masked out as keys everywhere, so what the position-wise blocks compute for them
    never reaches a real position: their feed-forward can be skipped.
    """
    rows = attention_mask.flatten().nonzero().squeeze(1)
    return None if rows.numel() == attention_mask.numel() else rows


class QFormerLayer(nn.Module):
    """One Q-Former layer over [queries | text]: shared self-attention, cross-attention for the query
    positions only (in cross-attention layers), then ``ffn_query`` on queries and ``ffn`` on text."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        input_dim: int,
        has_cross_attention: bool,
        dropout: float,
        eps: float,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(hidden_size, num_heads, hidden_size, dropout, eps)
        self.cross_attn = (
            Attention(hidden_size, num_heads, input_dim, dropout, eps) if has_cross_attention else None
        )
        self.ffn = FeedForward(hidden_size, intermediate_size, dropout, eps)
        self.ffn_query = FeedForward(hidden_size, intermediate_size, dropout, eps)

    def forward(
        self,
        hidden: torch.Tensor,
        num_queries: int,
        self_mask: torch.Tensor | None = None,
        past_kv: KeyValue | None = None,
        image: Sequence[ImageBlock] | None = None,
        need_weights: bool = False,
        first: int | None = None,
        text_rows: torch.Tensor | None = None,
        expand: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KeyValue, torch.Tensor | None]:
        """Run the layer; returns (hidden, this pass's self-attention keys/values, cross-attention weights).

        The first ``num_queries`` positions of ``hidden`` are queries. ``past_kv`` (cached keys/values of
        an earlier pass) is prepended to the self-attention keys/values; ``image`` is what the query rows
        cross-attend to. With ``first``, only the first ``first`` positions are computed and returned (every
        position still serves as a key and value). ``text_rows`` (from ``real_rows`` of the text's attention
        mask) limits the text feed-forward to real tokens. With ``expand`` [R], output row r continues input
        row ``expand[r]``: self-attention and the text feed-forward, which do not see the image, run once per
        input row, and only the query rows' cross-attention and feed-forward run once per output row.
        """
        k, v = self.self_attn.project_kv(hidden)
        present = (k, v)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        if first is not None and first < hidden.shape[1]:
            hidden = hidden[:, :first]
            if self_mask is not None and self_mask.shape[-2] > 1:
                self_mask = self_mask[..., :first, :]
            num_queries = min(num_queries, first)
            text_rows = None
        attended, _ = self.self_attn(hidden, (k, v), self_mask)
        cross_weights = None
        if num_queries == 0:
            return self.ffn(attended, text_rows), present, None
        # split, not two slices: its backward concatenates the two gradients instead of zero-filling
        # two full-size tensors and adding them.
        queries, text = attended.split([num_queries, attended.shape[1] - num_queries], dim=1)
        if text.shape[1]:
            text = self.ffn(text, text_rows)
        if expand is not None:
            queries, text = gather_rows(queries, expand), gather_rows(text, expand)
        if self.cross_attn is not None:
            if image is None:
                raise ValueError("a cross-attention layer needs image keys/values")
            queries, cross_weights = self.cross_attn.read(queries, image, need_weights)
        out = self.ffn_query(queries)
        if text.shape[1]:
            out = torch.cat([out, text], dim=1)
        return out, present, cross_weights
