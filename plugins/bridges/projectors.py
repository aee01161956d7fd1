"""The projector bridges: ``linear`` (BLIP-2's projection), ``mlp`` (residual GELU MLP) and ``moe``.

Each maps tokens [B, N, input_dim] to [B, Q, output_dim] and serves either as the projection after a
Q-Former or as the bridge directly over encoder tokens. ``num_tokens`` pools the tokens to a fixed
count first (see ``pool_tokens``); None keeps every token, so ``num_queries`` is None.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from blipkit import hookimpl
from blipkit.interfaces import Bridge, BridgeOutput
from blipkit.plugins.bridges._mlp import ResidualMLP, check_dropout, check_num_tokens, check_positive, pool_tokens
from blipkit.plugins.bridges._moe import MoEProjector

__all__ = ["LinearProjector", "MLPProjector", "MoEProjector", "register_bridges"]


class LinearProjector(Bridge):
    """BLIP-2's projection: one Linear(input_dim -> output_dim) on every (optionally pooled) token."""

    def __init__(
        self,
        input_dim: int,
        output_dim: int | None = None,
        num_tokens: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_positive(input_dim=input_dim, output_dim=output_dim)
        check_num_tokens(num_tokens)
        self.config: dict[str, Any] = {
            "input_dim": input_dim,
            "output_dim": output_dim,
            "num_tokens": num_tokens,
            "bias": bias,
        }
        self.input_dim = input_dim
        self.output_dim = output_dim if output_dim is not None else input_dim
        self.num_queries = num_tokens
        self.proj = nn.Linear(input_dim, self.output_dim, bias=bias)

    def forward(
        self,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> BridgeOutput:
        """Project tokens [B, N, input_dim] to [B, Q, output_dim]."""
        if self.num_queries is not None:
            image_tokens = pool_tokens(image_tokens, self.num_queries, image_mask)
        return BridgeOutput(queries=self.proj(image_tokens))

    def readout(
        self, image_tokens: torch.Tensor, image_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features: the (pooled) tokens, then a column of ones when the Linear has a bias."""
        if self.num_queries is not None:
            image_tokens = pool_tokens(image_tokens, self.num_queries, image_mask)
        return _with_bias_column(image_tokens, self.proj.bias is not None), None

    @torch.no_grad()
    def set_readout(self, weight: torch.Tensor) -> None:
        """Set the Linear's weight (and bias, the last row of ``weight``)."""
        self.proj.weight.copy_(weight[: self.input_dim].T)
        if self.proj.bias is not None:
            self.proj.bias.copy_(weight[self.input_dim])


class MLPProjector(Bridge):
    """A 2-layer GELU MLP with a residual path (LLaVA's mlp2x_gelu plus a skip, BLIPren's projector).

    ``y = fc2(gelu(fc1(h))) + skip(h)`` with ``h`` the input after the optional LayerNorm and pooling;
    ``skip`` is the identity when input_dim == output_dim, else a Linear.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int | None = None,
        hidden_dim: int | None = None,
        layer_norm: bool = False,
        dropout: float = 0.0,
        num_tokens: int | None = None,
    ) -> None:
        super().__init__()
        check_positive(input_dim=input_dim, output_dim=output_dim, hidden_dim=hidden_dim)
        check_dropout(dropout)
        check_num_tokens(num_tokens)
        self.config: dict[str, Any] = {
            "input_dim": input_dim,
            "output_dim": output_dim,
            "hidden_dim": hidden_dim,
            "layer_norm": layer_norm,
            "dropout": dropout,
            "num_tokens": num_tokens,
        }
        self.input_dim = input_dim
        self.output_dim = output_dim if output_dim is not None else input_dim
        self.num_queries = num_tokens
        self.norm: nn.Module = nn.LayerNorm(input_dim) if layer_norm else nn.Identity()
        self.mlp = ResidualMLP(input_dim, self.output_dim, hidden_dim or self.output_dim, dropout)

    def forward(
        self,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> BridgeOutput:
        """Project tokens [B, N, input_dim] to [B, Q, output_dim]."""
        return BridgeOutput(queries=self.mlp(self._inputs(image_tokens, image_mask)))

    def _inputs(self, image_tokens: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = self.norm(image_tokens)
        if self.num_queries is not None:
            hidden = pool_tokens(hidden, self.num_queries, image_mask)
        return hidden

    def readout(
        self, image_tokens: torch.Tensor, image_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features: fc2's inputs, then the skip Linear's inputs (when the skip is not the identity) and
        a column of ones; the identity skip is the fixed part. fc1 stays as it is."""
        hidden = self._inputs(image_tokens, image_mask)
        inner = torch.nn.functional.gelu(self.mlp.fc1(hidden))
        if isinstance(self.mlp.skip, nn.Linear):
            return _with_bias_column(torch.cat([inner, hidden], dim=-1), True), None
        return _with_bias_column(inner, True), hidden

    @torch.no_grad()
    def set_readout(self, weight: torch.Tensor) -> None:
        """Set fc2 (weight and bias) and the skip Linear (weight; its bias is folded into fc2's)."""
        width = self.mlp.fc2.in_features
        self.mlp.fc2.weight.copy_(weight[:width].T)
        self.mlp.fc2.bias.copy_(weight[-1])
        if isinstance(self.mlp.skip, nn.Linear):
            self.mlp.skip.weight.copy_(weight[width : width + self.input_dim].T)
            self.mlp.skip.bias.zero_()


def _with_bias_column(features: torch.Tensor, bias: bool) -> torch.Tensor:
    if not bias:
        return features
    return torch.cat([features, features.new_ones(*features.shape[:-1], 1)], dim=-1)


@hookimpl
def register_bridges(register: Any) -> None:
    """Register ``linear``, ``mlp`` and ``moe``."""
    register(
        "linear",
        LinearProjector,
        description="BLIP-2's projection: one Linear layer per token (optionally pooled)",
        kind="projector",
    )
    register(
        "mlp",
        MLPProjector,
        description="2-layer GELU MLP with a residual path (LLaVA mlp2x_gelu + skip)",
        kind="projector",
    )
    register(
        "moe",
        MoEProjector,
        description="mixture of residual-MLP experts with one routing decision per image",
        kind="projector",
    )
