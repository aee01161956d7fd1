"""An example blipkit plugin: ``hf-tower``, any transformers ViT-style vision tower by hub id or directory.

Tokens: the CLS token then the patch grid, from a block's output before the final norm (default: the
penultimate block). Install with ``pip install -e examples/blipkit-example-encoder``, then train with
``blipkit train encoder=hf-tower "encoder.options={model: facebook/dino-vits16}" ...``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from blipkit import hookimpl
from blipkit.encoders import FrozenEncoder, ImageTransform, file_fingerprint, fingerprint, freeze, resolve_layer, unavailable


class HFTower(FrozenEncoder):
    """A transformers vision tower cut after block ``index``."""

    def __init__(self, tower: torch.nn.Module, index: int, **geometry) -> None:
        super().__init__(**geometry)
        self.tower = tower
        self.index = index

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, 1 + patches, D]: hidden_states[0] is the embeddings, [i + 1] block i's output."""
        return self.tower(pixel_values=self._input(pixel_values), output_hidden_states=True).hidden_states[self.index + 1]


def hf_tower(model: str, layer: int = -2) -> HFTower:
    """Load ``model`` (a hub id or a saved directory) frozen; ``layer`` picks the block (-1 = last)."""
    from transformers import AutoImageProcessor, AutoModel

    try:
        tower, processor = AutoModel.from_pretrained(model), AutoImageProcessor.from_pretrained(model)
    except OSError as err:
        raise unavailable(f"vision tower '{model}' cannot be loaded here ({err}); pass a local directory") from None
    config, size = tower.config, tower.config.image_size
    index = resolve_layer(layer, config.num_hidden_layers, model)
    transform = ImageTransform(size, tuple(processor.image_mean), tuple(processor.image_std), resize_mode="squash")
    weights = [file_fingerprint(f) for f in sorted(Path(model).glob("*.safetensors"))] if Path(model).is_dir() else [model]
    key = f"hf-tower:{model}:{fingerprint(config.to_dict(), weights, transform.describe())}:block{index}"
    side = size // config.patch_size
    encoder = HFTower(tower, index, transform=transform, feature_dim=config.hidden_size, image_size=size,
                      patch_grid=(side, side), num_prefix_tokens=1, key=key)
    return freeze(encoder)


@hookimpl
def register_encoders(register) -> None:
    """Register ``hf-tower``."""
    register("hf-tower", hf_tower, description="Example plugin: a transformers ViT-style tower by hub id or dir",
             kind="example")
