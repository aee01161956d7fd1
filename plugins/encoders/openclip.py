"""open_clip image towers: SigLIP, CLIP, EVA-CLIP, and any open_clip ViT through ``open_clip:<arch>[:<pretrained>]``.

Tokens come from a block's output before the tower's final norm (default: the penultimate block):

- native open_clip ViTs (``clip`` = ViT-L-14): 1 CLS token, then the patch grid;
- timm-trunk towers: SigLIP (``siglip``, ``siglip-so400m``) have no CLS token, only the patch grid;
  EVA (``eva``) has 1 CLS token, then the patch grid; timm ViTs with registers put CLS + registers first.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blipkit import hookimpl
from blipkit.errors import ConfigError
from blipkit.interfaces import Encoder

from blipkit.encoders import FrozenEncoder, file_fingerprint, fingerprint, freeze, resolve_layer, seeded, unavailable

_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")

# name: (open_clip architecture, pretrained tag, Hugging Face repo holding the weights, aliases, description)
NAMED_MODELS: dict[str, tuple[str, str, str, tuple[str, ...], str]] = {
    "siglip": (
        "ViT-B-16-SigLIP",
        "webli",
        "timm/ViT-B-16-SigLIP",
        ("siglip-b16",),
        "SigLIP ViT-B/16, 224 px (open_clip ViT-B-16-SigLIP / webli): 196 patch tokens x 768, no CLS token",
    ),
    "siglip-so400m": (
        "ViT-SO400M-14-SigLIP",
        "webli",
        "timm/ViT-SO400M-14-SigLIP",
        ("siglip-so400m-14",),
        "SigLIP SO400M/14, 224 px (open_clip ViT-SO400M-14-SigLIP / webli): 256 patch tokens x 1152, no CLS token",
    ),
    "clip": (
        "ViT-L-14",
        "openai",
        "timm/vit_large_patch14_clip_224.openai",
        ("clip-l14",),
        "OpenAI CLIP ViT-L/14, 224 px (open_clip ViT-L-14 / openai, QuickGELU): 1 CLS + 256 patches x 1024",
    ),
    "eva": (
        "EVA01-g-14",
        "laion400m_s11b_b41k",
        "timm/eva_giant_patch14_clip_224.laion400m_s11b_b41k",
        ("eva-vit-g", "eva-clip-g"),
        "EVA-CLIP ViT-g/14, 224 px (open_clip EVA01-g-14 / laion400m_s11b_b41k): BLIP-2's image tower, the same "
        "40-block 1408-wide EVA01 ViT-g with its EVA-CLIP LAION-400M weights; the default penultimate block is "
        "BLIP-2's 39-block cut. 1 CLS + 256 patches x 1408",
    ),
}
_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class OpenClipEncoder(FrozenEncoder):
    """An open_clip image tower cut after one block, returning that block's tokens (no final norm)."""

    def __init__(self, tower: nn.Module, index: int, native: bool, **geometry: Any) -> None:
        super().__init__(**geometry)
        self.tower = tower
        self.index = index
        self._native = native

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, D] of block ``index``: prefix tokens (CLS/registers, if any) then the patch grid."""
        x = self._input(pixel_values)
        if self._native:
            out = self.tower.forward_intermediates(
                x,
                indices=[self.index],
                stop_early=True,
                intermediates_only=True,
                output_fmt="NLC",
                output_extra_tokens=True,
            )
            return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
        (taken,) = self.tower.forward_intermediates(
            x,
            indices=[self.index],
            return_prefix_tokens=True,
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        if isinstance(taken, tuple):
            patches, prefix = taken
            return torch.cat([prefix, patches], dim=1)
        return taken


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as err:
        raise unavailable(
            f"open_clip encoders need the open_clip package: pip install open_clip_torch ({err})"
        ) from err
    return open_clip


def _arch_preprocess(open_clip: Any, arch: str) -> dict[str, Any] | None:
    """The preprocessing every pretrained tag of ``arch`` shares, for weights given as a file."""
    settings = []
    for tag in open_clip.list_pretrained_tags_by_model(arch):
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        settings.append({key: cfg[key] for key in _PREPROCESS_KEYS if key in cfg})
    if settings and all(s == settings[0] for s in settings):
        return settings[0] or None
    return None


def _load_visual_weights(visual: nn.Module, path: Path, arch: str) -> None:
    from blipkit.io import load_safetensors

    state = {key.removeprefix("module."): value for key, value in load_safetensors(path).items()}
    if any(key.startswith("visual.") for key in state):
        state = {key[len("visual.") :]: value for key, value in state.items() if key.startswith("visual.")}
    try:
        result = visual.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ConfigError(
            f"{path} does not fit open_clip {arch}'s image tower (shape mismatch); check the architecture"
        ) from err
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"{path} does not hold open_clip {arch} image-tower weights ({len(result.missing_keys)} missing keys, "
            f"e.g. {result.missing_keys[:1]}; {len(result.unexpected_keys)} unexpected); check the architecture"
        )


def _tower_geometry(visual: nn.Module, arch: str, layer: int) -> tuple[nn.Module, int, bool, dict[str, Any]]:
    """Cut ``visual`` after block ``layer``; return (module to run, block index, native?, token geometry)."""
    from open_clip.transformer import VisionTransformer

    image_size = int(visual.image_size[0]) if isinstance(visual.image_size, (tuple, list)) else int(visual.image_size)
    if isinstance(visual, VisionTransformer):
        depth = len(visual.transformer.resblocks)
        index = resolve_layer(layer, depth, f"open_clip {arch}")
        visual.prune_intermediate_layers(indices=[index], prune_norm=True, prune_head=True)
        geometry = {
            "feature_dim": visual.transformer.width,
            "image_size": image_size,
            "patch_grid": tuple(visual.grid_size),
            "num_prefix_tokens": 1,
        }
        return visual, index, True, geometry
    trunk = getattr(visual, "trunk", None)
    if trunk is None or not all(hasattr(trunk, a) for a in ("blocks", "patch_embed", "forward_intermediates")):
        kind = type(trunk if trunk is not None else visual).__name__
        raise ConfigError(
            f"open_clip {arch} has a {kind} image tower; blipkit takes ViT towers (native or timm ViT/EVA)"
        )
    depth = len(trunk.blocks)
    index = resolve_layer(layer, depth, f"open_clip {arch}")
    trunk.prune_intermediate_layers([index], prune_norm=True, prune_head=True)
    registers = int(getattr(trunk, "num_reg_tokens", 0) or 0)
    geometry = {
        "feature_dim": trunk.embed_dim,
        "image_size": image_size,
        "patch_grid": tuple(trunk.patch_embed.grid_size),
        "num_prefix_tokens": int(trunk.num_prefix_tokens),
        "prefix_name": "CLS/register" if registers else "CLS",
    }
    return trunk, index, False, geometry


def _checked_name(open_clip: Any, arch: str) -> str:
    """open_clip's name for ``arch``, or a one-line error with the closest known names."""
    name = arch.replace("/", "-")
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(
            f"open_clip has no model '{arch}'; {hint}list them with: "
            "python -c \"import open_clip; print(open_clip.list_models())\""
        )
    return name


def _weights_source(open_clip: Any, name: str, pretrained: str | None) -> tuple[str | None, Path | None, bool]:
    """Where ``pretrained`` points: (an open_clip tag, a local .safetensors file, whether it needs QuickGELU)."""
    if pretrained is None:
        return None, None, False
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        return pretrained, None, bool(tag_cfg.get("quick_gelu", False))
    if pretrained.endswith(".safetensors") or os.sep in pretrained or Path(pretrained).expanduser().exists():
        weights_file = Path(pretrained).expanduser()
        if not weights_file.is_file():
            raise unavailable(f"weights file {weights_file} for open_clip {name} does not exist; check the path")
        if weights_file.suffix != ".safetensors":
            raise ConfigError(
                f"{weights_file}: only .safetensors weight files are loaded (pickled checkpoints are never "
                "unpickled); convert it with safetensors.torch.save_file"
            )
        return None, weights_file, False
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise ConfigError(
        f"open_clip {name} has no pretrained tag '{pretrained}'; known tags: {', '.join(tags) or 'none'}; "
        "or give a .safetensors weights file"
    )


def _visual_tower(open_clip: Any, name: str, tag: str | None, quick_gelu: bool, seed: int) -> nn.Module:
    """The image tower of open_clip model ``name`` with the weights of ``tag`` (random with ``seed`` for None)."""
    preprocess = None if tag else _arch_preprocess(open_clip, name)
    with seeded(seed):
        try:
            model = open_clip.create_model(
                name,
                pretrained=tag,
                force_quick_gelu=quick_gelu,
                force_preprocess_cfg=preprocess,
                pretrained_image=False,
                pretrained_text=False,
                device="cpu",
            )
        except Exception as err:
            if tag is None:
                raise
            raise unavailable(
                f"open_clip weights {name}:{tag} are not in the local cache and could not be downloaded "
                f"({type(err).__name__}); give a local file as open_clip:{name}:/path/to/weights.safetensors, "
                "or run once where the Hugging Face hub is reachable so the cache fills"
            ) from err
    return model.visual


def load_open_clip(arch: str, pretrained: str | None, layer: int = -2, seed: int = 0) -> Encoder:
    """Build open_clip model ``arch`` with weights ``pretrained`` (tag, .safetensors file, or None = random)."""
    open_clip = _import_open_clip()
    name = _checked_name(open_clip, arch)
    tag, weights_file, quick_gelu = _weights_source(open_clip, name, pretrained)
    visual = _visual_tower(open_clip, name, tag, quick_gelu, seed)
    if weights_file is not None:
        _load_visual_weights(visual, weights_file, name)
    preprocess_cfg = dict(visual.preprocess_cfg)
    tower, index, native, geometry = _tower_geometry(visual, name, layer)
    transform = open_clip.image_transform(
        preprocess_cfg["size"],
        is_train=False,
        mean=preprocess_cfg["mean"],
        std=preprocess_cfg["std"],
        resize_mode=preprocess_cfg["resize_mode"],
        interpolation=preprocess_cfg["interpolation"],
        fill_color=preprocess_cfg.get("fill_color", 0),
    )
    if tag is not None:
        weights = tag
    elif weights_file is not None:
        weights = f"file-{file_fingerprint(weights_file)}"
    else:
        weights = f"random-seed{seed}"
    key = (
        f"open_clip:{name}:{weights}:block{index}:{geometry['image_size']}px:"
        f"pre-{fingerprint(preprocess_cfg)}"
    )
    encoder = OpenClipEncoder(freeze(tower), index, native, transform=transform, key=key, **geometry)
    return freeze(encoder)


def _hub_cached(repo: str) -> bool:
    """Whether open_clip's weights for ``repo`` are already in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, filename), str) for filename in _HUB_FILES)


def _named_factory(arch: str, default_tag: str) -> Callable[..., Encoder]:
    def factory(pretrained: str | None = default_tag, layer: int = -2, seed: int = 0) -> Encoder:
        """Build the encoder; ``pretrained=None`` gives random weights seeded by ``seed``."""
        return load_open_clip(arch, pretrained, layer=layer, seed=seed)

    factory.__name__ = f"open_clip_{arch.replace('-', '_')}"
    return factory


def open_clip_encoder(spec: str, pretrained: str | None = "", layer: int = -2, seed: int = 0) -> Encoder:
    """``<arch>[:<tag or weights.safetensors>]``; ``pretrained`` overrides the part after the arch.

    With neither, the architecture's first pretrained tag in open_clip's list is used;
    ``pretrained=None`` gives random weights seeded by ``seed``.
    """
    arch, _, from_spec = spec.partition(":")
    if pretrained == "":
        pretrained = from_spec or None
        if pretrained is None:
            open_clip = _import_open_clip()
            tags = open_clip.list_pretrained_tags_by_model(arch.replace("/", "-"))
            if not tags:
                raise ConfigError(
                    f"open_clip:{arch} has no pretrained tag; give weights as "
                    f"open_clip:{arch}:/path/to/weights.safetensors "
                    "or set pretrained=null for random weights"
                )
            pretrained = tags[0]
    return load_open_clip(arch, pretrained, layer=layer, seed=seed)


@hookimpl
def register_encoders(register: Callable[..., None]) -> None:
    """Register siglip, siglip-so400m, clip, eva and the ``open_clip:`` prefix."""
    for name, (arch, tag, repo, aliases, description) in NAMED_MODELS.items():
        register(
            name,
            _named_factory(arch, tag),
            aliases=list(aliases),
            description=description,
            kind="open_clip",
            available=lambda repo=repo: _hub_cached(repo),
        )
    register(
        "open_clip:",
        open_clip_encoder,
        description="any open_clip ViT: open_clip:<arch>[:<pretrained tag or /path/to/weights.safetensors>]",
        kind="open_clip",
    )
