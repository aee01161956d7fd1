"""The linear, mlp and moe projector bridges: numerics against float64 recomputations, routing, I/O."""

from __future__ import annotations

import json
import math

import pytest
import torch

from blipkit import plugin_manager
from blipkit.errors import ConfigError
from blipkit.plugins.bridges._mlp import pool_tokens
from blipkit.plugins.bridges.projectors import LinearProjector, MLPProjector, MoEProjector


def _randomise(module: torch.nn.Module) -> None:
    """Give every parameter (LayerNorm ones included) random values so that no term is trivially 0 or 1."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param) * 0.5)


def _gelu64(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _layer_norm64(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def _linear64(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    out = x @ layer.weight.double().T
    return out + layer.bias.double() if layer.bias is not None else out


def _residual_mlp64(x: torch.Tensor, block: torch.nn.Module) -> torch.Tensor:
    skip = x if isinstance(block.skip, torch.nn.Identity) else _linear64(x, block.skip)
    return _linear64(_gelu64(_linear64(x, block.fc1)), block.fc2) + skip


def _explicit_pool(tokens: torch.Tensor, num_tokens: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Adaptive average pooling written out window by window (1-D, or 2-D on square grids)."""
    batch, n, dim = tokens.shape
    weights = torch.ones(batch, n, dtype=tokens.dtype) if mask is None else mask.to(tokens.dtype)

    def window(i: int, size_in: int, size_out: int) -> range:
        return range(math.floor(i * size_in / size_out), math.ceil((i + 1) * size_in / size_out))

    side_in, side_out = math.isqrt(n), math.isqrt(num_tokens)
    if side_in**2 == n and side_out**2 == num_tokens:
        cells = [
            [r * side_in + c for r in window(i, side_in, side_out) for c in window(j, side_in, side_out)]
            for i in range(side_out)
            for j in range(side_out)
        ]
    else:
        cells = [list(window(i, n, num_tokens)) for i in range(num_tokens)]
    out = torch.zeros(batch, num_tokens, dim, dtype=tokens.dtype)
    for b in range(batch):
        for q, cell in enumerate(cells):
            kept = weights[b, cell]
            if kept.sum() > 0:
                out[b, q] = (tokens[b, cell] * kept[:, None]).sum(0) / kept.sum()
    return out


# ---------------------------------------------------------------- linear and mlp


def test_linear_matches_float64() -> None:
    bridge = LinearProjector(8, 12).eval()
    x = torch.randn(3, 5, 8)
    out = bridge(x).queries
    assert out.shape == (3, 5, 12)
    torch.testing.assert_close(out.double(), _linear64(x.double(), bridge.proj), atol=1e-5, rtol=1e-5)
    assert bridge.num_queries is None and bridge.output_dim == 12


def test_linear_output_dim_defaults_to_input_dim() -> None:
    bridge = LinearProjector(8, bias=False)
    assert bridge.output_dim == 8 and bridge.proj.bias is None
    assert bridge(torch.randn(2, 3, 8)).queries.shape == (2, 3, 8)


@pytest.mark.parametrize("output_dim, layer_norm", [(8, False), (12, True), (12, False), (None, True)])
def test_mlp_matches_float64(output_dim: int | None, layer_norm: bool) -> None:
    bridge = MLPProjector(8, output_dim, hidden_dim=20, layer_norm=layer_norm, dropout=0.3).eval()
    _randomise(bridge)
    x = torch.randn(3, 5, 8)
    hidden = _layer_norm64(x.double(), bridge.norm) if layer_norm else x.double()
    expected = _residual_mlp64(hidden, bridge.mlp)
    torch.testing.assert_close(bridge(x).queries.double(), expected, atol=1e-5, rtol=1e-5)
    assert bridge.mlp.fc1.out_features == 20
    assert isinstance(bridge.mlp.skip, torch.nn.Identity) == (output_dim in (8, None))


def test_mlp_hidden_dim_defaults_to_output_dim() -> None:
    assert MLPProjector(8, 16).mlp.fc1.out_features == 16


@pytest.mark.parametrize("output_dim", [8, 12])
def test_mlp_residual_path(output_dim: int) -> None:
    bridge = MLPProjector(8, output_dim).eval()
    with torch.no_grad():
        bridge.mlp.fc2.weight.zero_()
        bridge.mlp.fc2.bias.zero_()
    x = torch.randn(2, 4, 8)
    out = bridge(x).queries
    expected = x if output_dim == 8 else bridge.mlp.skip(x)
    torch.testing.assert_close(out, expected)
    assert out.abs().sum() > 0


def test_mlp_dropout_only_in_training() -> None:
    bridge = MLPProjector(8, 8, dropout=0.5)
    x = torch.randn(2, 6, 8)
    bridge.eval()
    torch.testing.assert_close(bridge(x).queries, bridge(x).queries)
    bridge.train()
    assert not torch.allclose(bridge(x).queries, bridge(x).queries)


# ---------------------------------------------------------------- pooling


@pytest.mark.parametrize("n, num_tokens", [(10, 3), (7, 7), (16, 4), (49, 4), (49, 9), (50, 4), (9, 1)])
def test_pool_tokens_equals_explicit_average(n: int, num_tokens: int) -> None:
    x = torch.randn(2, n, 5, dtype=torch.float64)
    out = pool_tokens(x, num_tokens)
    assert out.shape == (2, num_tokens, 5)
    torch.testing.assert_close(out, _explicit_pool(x, num_tokens))


def test_pool_tokens_2d_grid_averages_spatial_blocks() -> None:
    grid = torch.arange(16, dtype=torch.float64).reshape(1, 16, 1)
    out = pool_tokens(grid, 4).flatten()
    # 4x4 grid, row-major: the top-left 2x2 block holds tokens 0, 1, 4, 5.
    torch.testing.assert_close(out, torch.tensor([2.5, 4.5, 10.5, 12.5], dtype=torch.float64))


@pytest.mark.parametrize("n, num_tokens", [(10, 3), (16, 4)])
def test_pool_tokens_masked(n: int, num_tokens: int) -> None:
    x = torch.randn(3, n, 4, dtype=torch.float64)
    mask = (torch.rand(3, n) > 0.4).long()
    mask[2] = 0
    mask[2, :2] = 1
    out = pool_tokens(x, num_tokens, mask)
    torch.testing.assert_close(out, _explicit_pool(x, num_tokens, mask))
    garbage = torch.where(mask.bool().unsqueeze(-1), x, torch.full_like(x, 1e6))
    torch.testing.assert_close(pool_tokens(garbage, num_tokens, mask), out)


def test_pool_tokens_rejects_more_tokens_than_input() -> None:
    with pytest.raises(ConfigError, match="num_tokens=8"):
        pool_tokens(torch.randn(1, 4, 2), 8)


@pytest.mark.parametrize("factory", [LinearProjector, MLPProjector, MoEProjector])
def test_bridges_pool_before_projecting(factory: type) -> None:
    bridge = factory(6, 10, num_tokens=4).eval()
    assert bridge.num_queries == 4
    x = torch.randn(2, 16, 6)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 9:] = 0
    unpooled = factory(6, 10).eval()
    unpooled.load_state_dict(bridge.state_dict())
    pooled_input = pool_tokens(x, 4, mask)
    expected = unpooled(pooled_input).queries
    if factory is MoEProjector:
        # The router reads the unpooled tokens; pooled windows here have unequal kept counts.
        probs = bridge.route(x, mask)
        expected = sum(probs[:, e, None, None] * bridge.experts[e](pooled_input) for e in range(4))
    torch.testing.assert_close(bridge(x, mask).queries, expected)


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_bad_num_tokens(value: object) -> None:
    with pytest.raises(ConfigError, match="num_tokens"):
        MLPProjector(8, num_tokens=value)


# ---------------------------------------------------------------- moe


def _moe(**kwargs: object) -> MoEProjector:
    bridge = MoEProjector(8, 12, hidden_dim=10, **kwargs).eval()
    _randomise(bridge)
    return bridge


def _route64(bridge: MoEProjector, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    hidden = x.double()
    if isinstance(bridge.norm, torch.nn.LayerNorm):
        hidden = _layer_norm64(hidden, bridge.norm)
    weights = torch.ones(x.shape[:2], dtype=torch.float64) if mask is None else mask.double()
    mean = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
    return torch.softmax(_linear64(mean, bridge.router) / bridge.temperature, dim=-1)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_moe_soft_mixture_matches_float64(layer_norm: bool) -> None:
    bridge = _moe(layer_norm=layer_norm, temperature=0.7)
    x = torch.randn(4, 6, 8)
    probs = _route64(bridge, x)
    torch.testing.assert_close(bridge.route(bridge.norm(x)).double(), probs, atol=1e-6, rtol=1e-5)
    hidden = _layer_norm64(x.double(), bridge.norm) if layer_norm else x.double()
    expected = sum(probs[:, e, None, None] * _residual_mlp64(hidden, bridge.experts[e]) for e in range(4))
    torch.testing.assert_close(bridge(x).queries.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k, renormalize", [(1, True), (2, True), (3, False), (1, False)])
def test_moe_top_k_matches_float64(top_k: int, renormalize: bool) -> None:
    bridge = _moe(routing="top-k", top_k=top_k, renormalize=renormalize, temperature=2.0)
    x = torch.randn(5, 3, 8)
    probs = _route64(bridge, x)
    expected = torch.zeros(5, 3, 12, dtype=torch.float64)
    for b in range(5):
        chosen = probs[b].argsort(descending=True)[:top_k]
        total = probs[b, chosen].sum() if renormalize else 1.0
        for e in chosen.tolist():
            expected[b] += probs[b, e] / total * _residual_mlp64(x[b].double(), bridge.experts[e])
    torch.testing.assert_close(bridge(x).queries.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("routing", ["soft", "top-k"])
def test_moe_routing_is_per_image(routing: str) -> None:
    bridge = _moe(routing=routing, top_k=2)
    x = torch.randn(3, 7, 8)
    perm = torch.randperm(7)
    probs = bridge.route(x)
    torch.testing.assert_close(bridge.route(x[:, perm]), probs)
    torch.testing.assert_close(bridge(x[:, perm]).queries, bridge(x).queries[:, perm])
    # Each image's routing ignores the other images in the batch.
    torch.testing.assert_close(bridge.route(x[1:2]), probs[1:2])
    # Every token of an image gets the same expert weights: a token's output is the image's mixture
    # applied to that token alone.
    out = bridge(x).queries
    assert not torch.allclose(bridge.route(x[:, :1]), probs)
    for b in range(3):
        for t in range(7):
            if routing == "soft":
                expected = sum(probs[b, e] * bridge.experts[e](x[b, t]) for e in range(4))
            else:
                top_p, top_i = probs[b].topk(2)
                expected = sum(p / top_p.sum() * bridge.experts[i](x[b, t]) for p, i in zip(top_p, top_i.tolist()))
            torch.testing.assert_close(out[b, t], expected)


@pytest.mark.parametrize("routing", ["soft", "top-k"])
def test_moe_image_mask_honoured(routing: str) -> None:
    bridge = _moe(routing=routing)
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    garbage = x.clone()
    garbage[0, 4:] = 100.0
    probs = bridge.route(garbage, mask)
    torch.testing.assert_close(probs[0], bridge.route(x[:1, :4])[0])
    torch.testing.assert_close(probs, _route64(bridge, garbage, mask).float())
    assert not torch.allclose(bridge.route(garbage)[0], probs[0])
    out = bridge(garbage, mask).queries
    torch.testing.assert_close(out[0, :4], bridge(x[:1, :4]).queries[0])


@pytest.mark.parametrize("routing", ["soft", "top-k"])
def test_moe_load_balancing_loss(routing: str) -> None:
    bridge = _moe(routing=routing)
    x = torch.randn(16, 4, 8)
    with torch.no_grad():
        bridge.router.weight.zero_()
        bridge.router.bias.zero_()
    uniform = bridge(x).aux_loss
    assert uniform.item() == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        bridge.router.bias[2] = 30.0
    collapsed = bridge(x).aux_loss
    assert collapsed.item() == pytest.approx(4.0, abs=1e-4)

    _randomise(bridge)
    with torch.no_grad():
        bridge.router.weight.mul_(4.0)
    out = bridge(x)
    probs = _route64(bridge, x)
    mean_prob = probs.mean(0)
    if routing == "soft":
        expected = 4 * (mean_prob**2).sum()
    else:
        frac = torch.bincount(probs.argmax(-1), minlength=4).double() / 16
        expected = 4 * (frac * mean_prob).sum()
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert uniform.item() < out.aux_loss.item() < collapsed.item()
    assert out.aux_loss.requires_grad
    assert bridge.aux_loss_weight == 0.01


def test_moe_top_k_aux_loss_counts_every_assignment() -> None:
    bridge = _moe(routing="top-k", top_k=2)
    x = torch.randn(10, 3, 8)
    probs = _route64(bridge, x)
    chosen = probs.topk(2, dim=-1).indices
    frac = torch.bincount(chosen.flatten(), minlength=4).double() / 20
    out = bridge(x)
    assert out.aux_loss.item() == pytest.approx((4 * (frac * probs.mean(0)).sum()).item(), rel=1e-5)
    assert [out.stats[f"expert_{e}_frac"] for e in range(4)] == pytest.approx(frac.tolist())


def test_moe_top1_gradients_reach_only_routed_experts() -> None:
    bridge = MoEProjector(8, 12, routing="top-k", top_k=1, renormalize=False).train()
    with torch.no_grad():
        bridge.router.weight.zero_()
        bridge.router.weight[0, 0] = 10.0
        bridge.router.weight[2, 0] = -10.0
    x = torch.randn(4, 5, 8)
    x[:2, :, 0] += 3.0
    x[2:, :, 0] -= 3.0
    out = bridge(x)
    assert bridge.route(x).argmax(-1).tolist() == [0, 0, 2, 2]
    out.queries.sum().backward()
    for e, expert in enumerate(bridge.experts):
        grads = [p.grad for p in expert.parameters()]
        if e in (0, 2):
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None or g.abs().sum() == 0 for g in grads)
    assert bridge.router.weight.grad is not None and bridge.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("routing, top_k", [("soft", 1), ("top-k", 1), ("top-k", 3)])
def test_moe_stats(routing: str, top_k: int) -> None:
    bridge = _moe(routing=routing, top_k=top_k)
    x = torch.randn(9, 4, 8)
    stats = bridge(x).stats
    assert set(stats) == {f"expert_{e}_{k}" for e in range(4) for k in ("frac", "prob")} | {"router_entropy"}
    assert sum(stats[f"expert_{e}_frac"] for e in range(4)) == pytest.approx(1.0)
    assert sum(stats[f"expert_{e}_prob"] for e in range(4)) == pytest.approx(1.0)
    probs = _route64(bridge, x)
    assert [stats[f"expert_{e}_prob"] for e in range(4)] == pytest.approx(probs.mean(0).tolist(), rel=1e-5)
    entropy = -(probs * probs.log()).sum(-1).mean()
    assert stats["router_entropy"] == pytest.approx(entropy.item(), rel=1e-5)
    assert all(isinstance(v, float) for v in stats.values())


def test_moe_router_noise_only_in_training() -> None:
    bridge = _moe(router_noise=1.0)
    x = torch.randn(3, 4, 8)
    torch.testing.assert_close(bridge.route(x), _route64(bridge, x).float())
    bridge.train()
    assert not torch.allclose(bridge.route(x), bridge.route(x))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"routing": "hard"}, "routing"),
        ({"routing": "top-k", "top_k": 5}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"num_experts": 0}, "num_experts"),
        ({"temperature": 0.0}, "temperature"),
        ({"router_noise": -1.0}, "router_noise"),
        ({"dropout": 1.0}, "dropout"),
        ({"hidden_dim": -3}, "hidden_dim"),
    ],
)
def test_moe_bad_options(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        MoEProjector(8, **kwargs)


# ---------------------------------------------------------------- save / load and registration


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (LinearProjector, {"output_dim": 12, "num_tokens": 4, "bias": False}),
        (MLPProjector, {"output_dim": 12, "hidden_dim": 6, "layer_norm": True, "dropout": 0.1}),
        (MoEProjector, {"routing": "top-k", "top_k": 2, "num_experts": 3, "layer_norm": True, "aux_loss_weight": 0.5}),
        (MoEProjector, {}),
    ],
)
def test_save_pretrained_round_trip(tmp_path, factory: type, kwargs: dict) -> None:
    bridge = factory(8, **kwargs).eval()
    _randomise(bridge)
    bridge.save_pretrained(tmp_path / "bridge")
    saved = json.loads((tmp_path / "bridge" / "config.json").read_text())
    assert saved["class"] == factory.__qualname__
    loaded = factory.from_pretrained(tmp_path / "bridge").eval()
    assert type(loaded) is factory
    assert loaded.config == bridge.config
    assert loaded.config == {**{k: saved[k] for k in saved if k != "class"}}
    x = torch.randn(2, 16, 8)
    before, after = bridge(x), loaded(x)
    assert torch.equal(before.queries, after.queries)
    assert before.stats == after.stats
    for key, value in bridge.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def test_registered_under_their_names() -> None:
    bridges = plugin_manager.registries().bridges
    for name, cls in (("linear", LinearProjector), ("mlp", MLPProjector), ("moe", MoEProjector)):
        entry = bridges.resolve(name).entry
        assert entry.factory is cls
        assert entry.plugin == "blipkit.plugins.bridges.projectors"
    moe = bridges.create("moe", input_dim=8, output_dim=16)
    assert isinstance(moe, MoEProjector)
    assert moe(torch.randn(2, 3, 8)).queries.shape == (2, 3, 16)
    assert bridges.create("mlp", input_dim=8).output_dim == 8
    bridges.check_kwargs("moe", {"num_experts": 2, "routing": "top-k", "aux_loss_weight": 0.1})
    with pytest.raises(ConfigError, match="projection.experts"):
        bridges.check_kwargs("moe", {"experts": 2}, where="projection")

