"""Building blocks shared by the projector bridges: the residual MLP and token pooling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from blipkit.errors import ConfigError

__all__ = ["ResidualMLP", "check_dropout", "check_num_tokens", "check_positive", "masked_mean", "pool_tokens"]


class ResidualMLP(nn.Module):
    """``fc2(dropout(gelu(fc1(x)))) + skip(x)``; ``skip`` is the identity when the dims match, else a Linear."""

    def __init__(self, input_dim: int, output_dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)
        self.dropout = nn.Dropout(dropout)
        self.skip: nn.Module = nn.Identity() if input_dim == output_dim else nn.Linear(input_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map [..., input_dim] to [..., output_dim]."""
        return self.fc2(self.dropout(F.gelu(self.fc1(x)))) + self.skip(x)


def check_positive(**values: int | None) -> None:
    """Raise ConfigError naming the first option that is neither None nor a positive integer."""
    for label, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{label} must be a positive integer, not {value!r}")


def check_dropout(dropout: float) -> None:
    """Raise ConfigError unless 0 <= dropout < 1."""
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), not {dropout!r}")


def check_num_tokens(num_tokens: int | None) -> None:
    """Raise ConfigError unless ``num_tokens`` is None or a positive integer."""
    if num_tokens is not None and (isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1):
        raise ConfigError(f"num_tokens must be a positive integer or null (keep all tokens), not {num_tokens!r}")


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of tokens [B, N, D] over the kept positions of ``mask`` [B, N] (1 = keep): [B, D]."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def pool_tokens(tokens: torch.Tensor, num_tokens: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Adaptive average pooling of tokens [B, N, D] to [B, num_tokens, D], averaging only kept tokens.

    When both N and ``num_tokens`` are perfect squares the tokens are taken as a row-major square grid
    and pooled in 2-D (7x7 -> 2x2 averages spatial neighbours); otherwise the token axis is pooled in
    1-D. A window with no kept token gives zeros.
    """
    batch, n, dim = tokens.shape
    if num_tokens > n:
        raise ConfigError(
            f"num_tokens={num_tokens} is more than the {n} input tokens; set num_tokens to at most {n} or null"
        )
    in_side, out_side = _square_side(n), _square_side(num_tokens)
    grid = in_side is not None and out_side is not None

    def pool(x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[-1]
        x = x.transpose(1, 2)
        if grid:
            pooled = F.adaptive_avg_pool2d(x.reshape(batch, channels, in_side, in_side), out_side)
            return pooled.flatten(2).transpose(1, 2)
        return F.adaptive_avg_pool1d(x, num_tokens).transpose(1, 2)

    if mask is None:
        return pool(tokens)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    summed = pool(tokens * weights)
    kept = pool(weights)
    return torch.where(kept > 0, summed / kept.clamp_min(torch.finfo(tokens.dtype).eps), torch.zeros_like(summed))
