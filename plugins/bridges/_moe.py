"""The ``moe`` projector: residual-MLP experts chosen once per image by a router (BLIPren's MoE)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blipkit.errors import ConfigError
from blipkit.interfaces import Bridge, BridgeOutput
from blipkit.plugins.bridges._mlp import (
    ResidualMLP,
    check_dropout,
    check_num_tokens,
    check_positive,
    masked_mean,
    pool_tokens,
)

__all__ = ["MoEProjector"]

ROUTINGS = ("soft", "top-k")


class MoEProjector(Bridge):
    """A mixture of ``num_experts`` residual MLPs with image-level routing.

    A Linear router reads the image's mean token (over kept tokens when ``image_mask`` is given), so
    every token of an image goes through the same experts with the same weights. ``routing="soft"``
    mixes all experts by the router's softmax; ``routing="top-k"`` computes only the ``top_k`` most
    probable experts, weighted by their probabilities renormalised to sum to one (``renormalize``).
    With ``top_k=1`` and ``renormalize=True`` the weight is always 1, so the router learns only from the
    auxiliary loss; ``renormalize=False`` scales each expert by its raw probability (Switch-style).

    ``aux_loss`` is the unweighted load-balancing loss, 1.0 when balanced and up to ``num_experts``
    when collapsed; the training loop multiplies it by ``aux_loss_weight``:

    - top-k: Switch Transformer's ``E * sum_i f_i * P_i``, ``f_i`` the share of the B*top_k expert
      assignments that went to expert i, ``P_i`` its mean router probability over the batch;
    - soft: ``E * sum_i P_i ** 2`` (P used for both factors, as every expert is computed anyway).

    ``stats`` holds, per expert, ``expert_{i}_frac`` (top-k: share of assignments; soft: share of images
    whose most probable expert is i) and ``expert_{i}_prob`` (``P_i``), plus ``router_entropy`` (mean
    entropy of the per-image router distribution, in nats).
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int | None = None,
        num_experts: int = 4,
        hidden_dim: int | None = None,
        routing: str = "soft",
        top_k: int = 1,
        renormalize: bool = True,
        router_noise: float = 0.0,
        temperature: float = 1.0,
        aux_loss_weight: float = 0.01,
        layer_norm: bool = False,
        dropout: float = 0.0,
        num_tokens: int | None = None,
    ) -> None:
        super().__init__()
        check_positive(input_dim=input_dim, output_dim=output_dim, hidden_dim=hidden_dim, num_experts=num_experts)
        if routing not in ROUTINGS:
            raise ConfigError(f"routing must be one of {', '.join(ROUTINGS)}, not {routing!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ConfigError(f"top_k must be between 1 and num_experts={num_experts}, not {top_k!r}")
        if temperature <= 0:
            raise ConfigError(f"temperature must be positive, not {temperature!r}")
        if router_noise < 0:
            raise ConfigError(f"router_noise must be zero or positive, not {router_noise!r}")
        check_dropout(dropout)
        check_num_tokens(num_tokens)
        self.config: dict[str, Any] = {
            "input_dim": input_dim,
            "output_dim": output_dim,
            "num_experts": num_experts,
            "hidden_dim": hidden_dim,
            "routing": routing,
            "top_k": top_k,
            "renormalize": renormalize,
            "router_noise": router_noise,
            "temperature": temperature,
            "aux_loss_weight": aux_loss_weight,
            "layer_norm": layer_norm,
            "dropout": dropout,
            "num_tokens": num_tokens,
        }
        self.input_dim = input_dim
        self.output_dim = output_dim if output_dim is not None else input_dim
        self.num_queries = num_tokens
        self.num_experts = num_experts
        self.routing = routing
        self.top_k = top_k
        self.renormalize = renormalize
        self.router_noise = router_noise
        self.temperature = temperature
        self.aux_loss_weight = aux_loss_weight
        self.norm: nn.Module = nn.LayerNorm(input_dim) if layer_norm else nn.Identity()
        self.router = nn.Linear(input_dim, num_experts)
        nn.init.normal_(self.router.weight, std=0.02)
        nn.init.zeros_(self.router.bias)
        self.experts = nn.ModuleList(
            ResidualMLP(input_dim, self.output_dim, hidden_dim or self.output_dim, dropout) for _ in range(num_experts)
        )

    def route(self, hidden: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Router probabilities [B, num_experts] (float32) for normalised tokens [B, N, input_dim]."""
        logits = self.router(masked_mean(hidden, image_mask)).float()
        if self.training and self.router_noise > 0:
            logits = logits + torch.randn_like(logits) * self.router_noise
        return torch.softmax(logits / self.temperature, dim=-1)

    def forward(
        self,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> BridgeOutput:
        """Project tokens [B, N, input_dim] to [B, Q, output_dim] through the image's chosen experts."""
        hidden = self.norm(image_tokens)
        probs = self.route(hidden, image_mask)
        if self.num_queries is not None:
            hidden = pool_tokens(hidden, self.num_queries, image_mask)
        mean_prob = probs.mean(dim=0)
        if self.routing == "soft":
            queries = self._mix_all(hidden, probs)
            frac = F.one_hot(probs.argmax(dim=-1), self.num_experts).float().mean(dim=0)
            aux_loss = self.num_experts * (mean_prob * mean_prob).sum()
        else:
            top_prob, top_index = probs.topk(self.top_k, dim=-1)
            weights = top_prob / top_prob.sum(dim=-1, keepdim=True) if self.renormalize else top_prob
            queries = self._mix_chosen(hidden, top_index, weights)
            frac = F.one_hot(top_index, self.num_experts).float().sum(dim=1).mean(dim=0) / self.top_k
            aux_loss = self.num_experts * (frac * mean_prob).sum()
        return BridgeOutput(queries=queries, aux_loss=aux_loss, stats=self._stats(probs, frac, mean_prob))

    def _mix_all(self, hidden: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        weights = probs.to(hidden.dtype)
        out = weights[:, 0, None, None] * self.experts[0](hidden)
        for index in range(1, self.num_experts):
            out = out + weights[:, index, None, None] * self.experts[index](hidden)
        return out

    def _mix_chosen(self, hidden: torch.Tensor, top_index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        weights = weights.to(hidden.dtype)
        out = hidden.new_zeros(*hidden.shape[:-1], self.output_dim)
        for index, expert in enumerate(self.experts):
            rows, slot = (top_index == index).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            contribution = expert(hidden[rows]) * weights[rows, slot, None, None]
            out = out.index_add(0, rows, contribution)
        return out

    def _stats(self, probs: torch.Tensor, frac: torch.Tensor, mean_prob: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            entropy = -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(dim=-1).mean()
            values = torch.cat([frac, mean_prob, entropy.reshape(1)]).tolist()
        stats = {f"expert_{i}_frac": values[i] for i in range(self.num_experts)}
        stats.update({f"expert_{i}_prob": values[self.num_experts + i] for i in range(self.num_experts)})
        stats["router_entropy"] = values[-1]
        return stats
