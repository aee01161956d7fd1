"""``tiny-vit``: a small random ViT for tests and smoke runs, its weights fixed by ``seed``.

Tokens: 1 CLS token, then the patch grid, from the penultimate block without the final norm
(defaults: 32 px, patch 8, hidden 32, 3 blocks: 1 CLS + 16 patches x 32).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from blipkit import hookimpl
from blipkit.errors import ConfigError
from blipkit.interfaces import Encoder

from blipkit.encoders import FrozenEncoder, ImageTransform, fingerprint, freeze, resolve_layer, seeded

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


class TinyViTEncoder(FrozenEncoder):
    """A randomly initialised transformers ViTModel returning one block's tokens (no final norm)."""

    def __init__(self, model: nn.Module, index: int, **geometry: Any) -> None:
        super().__init__(**geometry)
        self.model = model
        self.index = index

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tokens [B, 1 + grid*grid, hidden] of block ``index``."""
        out = self.model(pixel_values=self._input(pixel_values), output_hidden_states=True)
        return out.hidden_states[self.index + 1]


def tiny_vit(
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 3,
    seed: int = 0,
    layer: int = -2,
) -> Encoder:
    """Build the tiny ViT; the same options and ``seed`` always give the same weights."""
    import transformers

    if image_size % patch_size:
        raise ConfigError(f"tiny-vit image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    if hidden_size % 16:
        raise ConfigError(f"tiny-vit hidden_size must be a multiple of 16 (heads of 16), not {hidden_size}")
    index = resolve_layer(layer, num_layers, "tiny-vit")
    config = transformers.ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 16,
        intermediate_size=4 * hidden_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with seeded(seed):
        model = transformers.ViTModel(config, add_pooling_layer=False)
    model.float()
    transform = ImageTransform(size=image_size, mean=MEAN, std=STD, resize_mode="squash", resample="bilinear")
    grid = image_size // patch_size
    options = {"image_size": image_size, "patch_size": patch_size, "hidden_size": hidden_size, "num_layers": num_layers}
    key = (
        f"tiny-vit:seed{seed}:{fingerprint(options, transformers.__version__)}:block{index}:{image_size}px:"
        f"pre-{fingerprint(transform.describe())}"
    )
    encoder = TinyViTEncoder(
        freeze(model),
        index,
        transform=transform,
        feature_dim=hidden_size,
        image_size=image_size,
        patch_grid=(grid, grid),
        num_prefix_tokens=1,
        key=key,
    )
    return freeze(encoder)


@hookimpl
def register_encoders(register: Callable[..., None]) -> None:
    """Register ``tiny-vit``."""
    register(
        "tiny-vit",
        tiny_vit,
        description="a tiny random ViT for tests and smoke runs (seeded): 1 CLS + 16 patches x 32 at 32 px",
        kind="test",
        available=True,
    )
