"""What an encoder plugin builds on: RGB conversion, the image transform, a frozen base class, fingerprints
for cache keys, block choice, and the error for weights that cannot be had here.

The built-in encoders use exactly these; docs/plugins.md shows a third-party encoder built on them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from blipkit.errors import ConfigError, ModelUnavailableError, one_line
from blipkit.interfaces import Encoder

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FrozenEncoder",
    "ImageTransform",
    "describe_layout",
    "file_fingerprint",
    "fingerprint",
    "freeze",
    "resolve_layer",
    "seeded",
    "to_rgb",
    "unavailable",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` as 8-bit RGB.

    Transparent images (RGBA, LA, PA, P with a transparent colour) are composited onto white.
    16-bit images (I;16*, and I holding values above 255) are scaled from 0..65535; float images
    (F) from 0..1 when their maximum is at most 1, else clipped to 0..255.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        peak = float(values.max()) if values.size else 0.0
        if image.mode.startswith("I;16") or (image.mode == "I" and peak > 255):
            values = values / 257.0
        elif image.mode == "F" and peak <= 1.0:
            values = values * 255.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageTransform:
    """Resize, crop, scale to [0, 1] and normalise an RGB PIL image into a [3, size, size] tensor.

    ``resize_mode`` "shortest": the short side goes to ``resize_to`` (default ``size``) keeping the
    aspect ratio, then a centre crop of ``size``; "squash": both sides go to ``size``.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"
    resize_to: int | None = None
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        if self.resize_mode not in ("shortest", "squash"):
            raise ConfigError(f"resize_mode must be 'shortest' or 'squash', not '{self.resize_mode}'")
        if self.resample not in _RESAMPLE:
            raise ConfigError(f"resample must be one of {', '.join(_RESAMPLE)}, not '{self.resample}'")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Transform one image (any mode) into a float tensor [3, size, size]."""
        image = to_rgb(image)
        resample = _RESAMPLE[self.resample]
        if self.resize_mode == "squash":
            image = image.resize((self.size, self.size), resample=resample)
        else:
            short = self.resize_to or self.size
            width, height = image.size
            if width <= height:
                new_size = (short, max(1, int(short * height / width)))
            else:
                new_size = (max(1, int(short * width / height)), short)
            if max(new_size) > 4 * max(short, self.size):
                image = _resize_middle(image, new_size, max(short, self.size), resample)
            elif new_size != image.size:
                image = image.resize(new_size, resample=resample)
            image = _center_crop(image, self.size)
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (tensor - mean) / std

    def describe(self) -> dict[str, Any]:
        """The settings, for cache keys."""
        return asdict(self)


def _resize_middle(image: Image.Image, new_size: tuple[int, int], keep: int, resample: Image.Resampling) -> Image.Image:
    """The middle ``keep`` pixels (along the long side) of ``image`` resized to ``new_size``, without resizing
    the rest: a 1 x 100000 strip would otherwise become a multi-gigabyte image before the crop."""
    width, height = image.size
    if new_size[0] > new_size[1]:
        span = keep * width / new_size[0]
        left = (width - span) / 2
        return image.resize((keep, new_size[1]), resample=resample, box=(left, 0, left + span, height))
    span = keep * height / new_size[1]
    top = (height - span) / 2
    return image.resize((new_size[0], keep), resample=resample, box=(0, top, width, top + span))


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if width < size or height < size:
        padded = Image.new("RGB", (max(width, size), max(height, size)), (0, 0, 0))
        padded.paste(image, ((padded.width - width) // 2, (padded.height - height) // 2))
        image, (width, height) = padded, padded.size
    left = (width - size) // 2
    top = (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable ``parts``."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def file_fingerprint(path: str | Path, chunk: int = 1 << 20) -> str:
    """A short hash of a file's size and its first and last MiB (cheap even for multi-GB weights)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(chunk))
        if size > chunk:
            handle.seek(max(chunk, size - chunk))
            digest.update(handle.read(chunk))
    return digest.hexdigest()[:12]


def resolve_layer(layer: int, depth: int, model: str) -> int:
    """Turn ``layer`` (negative counts from the end, -1 = last block) into a block index in ``[0, depth)``."""
    index = layer + depth if layer < 0 else layer
    if not 0 <= index < depth:
        raise ConfigError(
            f"layer={layer} is out of range for {model}, which has {depth} blocks; use -{depth}..{depth - 1}"
        )
    return index


def describe_layout(num_prefix: int, grid: tuple[int, int], prefix_name: str = "CLS") -> str:
    """Human text such as ``"1 CLS + 196 patches (14x14)"``."""
    patches = f"{grid[0] * grid[1]} patches ({grid[0]}x{grid[1]})"
    if num_prefix == 0:
        return patches + ", no CLS token"
    return f"{num_prefix} {prefix_name} + {patches}"


def unavailable(message: str) -> ModelUnavailableError:
    """A ModelUnavailableError whose message is collapsed onto one line."""
    return ModelUnavailableError(one_line(message))


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with gradients off on every parameter; return it."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU RNG seeded, restoring the outer RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class FrozenEncoder(Encoder):
    """Encoder base: fixed token geometry, a preprocessing callable, a cache key, always in eval mode."""

    def __init__(
        self,
        *,
        transform: Callable[[Image.Image], torch.Tensor],
        feature_dim: int,
        image_size: int,
        patch_grid: tuple[int, int],
        num_prefix_tokens: int,
        key: str,
        prefix_name: str = "CLS",
    ) -> None:
        super().__init__()
        self._transform = transform
        self.feature_dim = int(feature_dim)
        self.image_size = int(image_size)
        self.patch_grid = (int(patch_grid[0]), int(patch_grid[1]))
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.num_tokens = self.num_prefix_tokens + self.patch_grid[0] * self.patch_grid[1]
        self.token_layout = describe_layout(self.num_prefix_tokens, self.patch_grid, prefix_name)
        self._key = key

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Stay in eval mode: a frozen encoder never runs dropout or updates batch-norm statistics."""
        return super().train(False)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The model's own transform after converting ``image`` to RGB: a float tensor [3, S, S]."""
        return self._transform(to_rgb(image))

    @property
    def cache_key(self) -> str:
        """Model, weights, layer, image size and preprocessing, as one string."""
        return self._key

    def _input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        parameter = next(self.parameters(), None)
        if parameter is None:
            return pixel_values
        return pixel_values.to(device=parameter.device, dtype=parameter.dtype)
