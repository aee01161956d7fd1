"""An example blipkit plugin: registers the ``patch-mean`` encoder.

The encoder cuts the image into square patches and returns each patch's mean colour passed through a
fixed random linear map: no weights to download, so it works anywhere. Install this folder with
``pip install -e examples/blipkit-example-encoder`` and it appears in ``blipkit plugins`` and
``blipkit encoders``; use it with ``blipkit train --encoder patch-mean``.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from blipkit import hookimpl
from blipkit.interfaces import Encoder

MEAN = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)
STD = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)


class PatchMeanEncoder(Encoder):
    """Mean colour of each patch, projected to ``dim`` features; every token is a patch (no CLS)."""

    def __init__(self, image_size: int = 64, patch_size: int = 8, dim: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        side = image_size // patch_size
        self.patch_grid = (side, side)
        self.num_tokens = side * side
        self.feature_dim = dim
        self.token_layout = f"{self.num_tokens} patches ({side}x{side}), no CLS"
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.proj = nn.Linear(3, dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(dim, 3, generator=generator))
            self.proj.bias.zero_()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, N, dim]."""
        pooled = nn.functional.avg_pool2d(pixel_values, self.patch_size)
        return self.proj(pooled.flatten(2).transpose(1, 2))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Any PIL image -> normalised [3, S, S]."""
        image = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = data.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float() / 255.0
        return (pixels - MEAN) / STD

    @property
    def cache_key(self) -> str:
        """Changes with every option that changes the features."""
        return f"patch-mean:{self.image_size}:{self.patch_size}:{self.feature_dim}:{self.seed}"


def patch_mean(image_size: int = 64, patch_size: int = 8, dim: int = 32, seed: int = 0) -> PatchMeanEncoder:
    """Build the frozen ``patch-mean`` encoder."""
    return PatchMeanEncoder(image_size, patch_size, dim, seed).eval().requires_grad_(False)


@hookimpl
def register_encoders(register) -> None:
    """Register ``patch-mean`` (alias ``pm``)."""
    register(
        "patch-mean",
        patch_mean,
        aliases=["pm"],
        description="Example plugin: per-patch mean colour, projected (no weights)",
        kind="example",
        available=True,
    )
