"""transformers vision towers: ``hf:<repo id or local dir>`` for SigLIP, CLIP (vision-only or full models)
and the vision tower of BLIP-2 (and InstructBLIP) checkpoints.

Tokens come from a block's output before ``post_layernorm``. SigLIP and CLIP default to the penultimate
block (``hidden_states[-2]``); BLIP-2 towers to their last block, because transformers' BLIP-2 checkpoints
already hold EVA cut to LAVIS's 39 blocks and their ``post_layernorm`` is LAVIS's ``ln_vision``, which
belongs to the Q-Former. SigLIP towers return the patch grid only (no CLS token); CLIP and BLIP-2 towers
return 1 CLS token, then the patch grid.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blipkit import hookimpl
from blipkit.errors import ConfigError
from blipkit.io import load_safetensors_prefixed
from blipkit.interfaces import Encoder

from blipkit.encoders import FrozenEncoder, ImageTransform, file_fingerprint, fingerprint, freeze, resolve_layer, unavailable

# model_type in config.json -> (family, whether the vision tower sits inside a full image-text model)
MODEL_TYPES: dict[str, tuple[str, bool]] = {
    "siglip_vision_model": ("siglip", False),
    "siglip": ("siglip", True),
    "clip_vision_model": ("clip", False),
    "clip": ("clip", True),
    "blip-2": ("blip2", True),
    "instructblip": ("blip2", True),
}
# The block each family's tokens come from by default (see the module docstring).
FAMILY_LAYER = {"siglip": -2, "clip": -2, "blip2": -1}
# Used when a model has no saved image processor config: each family's published processor defaults.
FAMILY_PREPROCESS: dict[str, dict[str, Any]] = {
    "siglip": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resize_mode": "squash", "resample": "bicubic"},
    "clip": {
        "mean": (0.48145466, 0.4578275, 0.40821073),
        "std": (0.26862954, 0.26130258, 0.27577711),
        "resize_mode": "shortest",
        "resample": "bicubic",
    },
    "blip2": {
        "mean": (0.48145466, 0.4578275, 0.40821073),
        "std": (0.26862954, 0.26130258, 0.27577711),
        "resize_mode": "squash",
        "resample": "bicubic",
    },
}
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class HFVisionEncoder(FrozenEncoder):
    """A SigLIP/CLIP/BLIP-2 vision tower from transformers, cut after one block, without its final norm."""

    def __init__(self, tower: nn.Module, index: int, family: str, **geometry: Any) -> None:
        super().__init__(**geometry)
        self.tower = tower
        self.index = index
        self.family = family

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, D] of block ``index`` (CLIP, BLIP-2: CLS then patches; SigLIP: patches only)."""
        hidden = self.tower.embeddings(self._input(pixel_values))
        if self.family == "clip":
            hidden = self.tower.pre_layrnorm(hidden)
        return self.tower.encoder(inputs_embeds=hidden).last_hidden_state


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def claims_directory(name: str) -> bool:
    """Whether ``name`` is a local directory holding a SigLIP, CLIP (vision) or BLIP-2 model."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return False
    config = _read_config(path)
    return config is not None and config.get("model_type") in MODEL_TYPES


def _offline(model: str, err: BaseException) -> Exception:
    return unavailable(
        f"Hugging Face model '{model}' could not be loaded ({type(err).__name__}): it is not in the local cache and "
        f"the hub is not reachable; download it where the hub is reachable (hf download {model}) or pass a local "
        "directory: --encoder /path/to/model_dir"
    )


def _processor_file(model: str, local: bool, revision: str | None) -> Path | None:
    """The image processor's saved config: ``preprocessor_config.json``, else the ``processor_config.json``
    that processors (such as Blip2Processor) write with the image processor nested inside."""
    for name in _PROCESSOR_FILES:
        if local:
            file = Path(model) / name
            if file.is_file():
                return file
            continue
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(model, name, revision=revision))
        except Exception:  # a repo without this file, or no hub: try the next one, then the family defaults
            continue
    return None


def _preprocessor_config(model: str, local: bool, revision: str | None) -> dict[str, Any] | None:
    file = _processor_file(model, local, revision)
    if file is None:
        return None
    try:
        data = json.loads(file.read_text())
    except ValueError as err:
        raise ConfigError(f"{file} is not valid JSON; fix or delete it") from err
    return data.get("image_processor", data) if isinstance(data, dict) else None


def build_transform(family: str, image_size: int, processor: dict[str, Any] | None) -> ImageTransform:
    """The image transform from a saved image-processor config, else the family's defaults at ``image_size``."""
    defaults = FAMILY_PREPROCESS[family]
    if processor is None:
        return ImageTransform(size=image_size, **defaults)
    mean, std = processor.get("image_mean", defaults["mean"]), processor.get("image_std", defaults["std"])
    if not processor.get("do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = _PIL_RESAMPLE_NAMES.get(processor.get("resample"), defaults["resample"])
    size = processor.get("size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    crop = processor.get("crop_size") or {}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if "shortest_edge" in size:
        cropped = processor.get("do_center_crop", True)
        side = int(crop.get("height", image_size)) if cropped else int(size["shortest_edge"])
        transform = ImageTransform(
            size=side,
            mean=tuple(mean),
            std=tuple(std),
            resize_mode="shortest",
            resize_to=int(size["shortest_edge"]),
            resample=resample,
        )
    else:
        height, width = int(size.get("height", image_size)), int(size.get("width", image_size))
        if height != width:
            raise ConfigError(f"image processor resizes to {height}x{width}; blipkit encoders take square images")
        transform = ImageTransform(
            size=height, mean=tuple(mean), std=tuple(std), resize_mode="squash", resample=resample
        )
    if transform.size != image_size:
        raise ConfigError(
            f"image processor output {transform.size}px does not match the vision config's image_size {image_size}px"
        )
    return transform


def _blip2_snapshot(model: str, revision: str | None) -> Path:
    """The local copy of a hub BLIP-2 checkpoint (from the cache when no hub is reachable)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=["*.json", "*.safetensors"]))
    except (OSError, ValueError) as err:
        raise _offline(model, err) from err


def _blip2_tower(directory: Path, config: Any) -> nn.Module:
    """Only the vision tower of a saved BLIP-2 model, read tensor by tensor from its safetensors files."""
    from transformers import Blip2VisionModel

    prefix = "vision_model."
    state = load_safetensors_prefixed(directory, (prefix,), strip=prefix)
    if not state:
        raise ConfigError(f"{directory} holds no BLIP-2 vision tower weights (no {prefix}* tensors)")
    tower = Blip2VisionModel.from_pretrained(None, config=config.vision_config, state_dict=state, dtype=torch.float32)
    # The Q-Former import takes post_layernorm as its ln_vision; the encoder's tokens come before it.
    tower.post_layernorm = nn.Identity()
    return tower


def _siglip_clip_tower(model: str, source: str, local: bool, config: Any, revision: str | None) -> nn.Module:
    import transformers

    family, full = MODEL_TYPES[config.model_type]
    classes = {
        ("siglip", False): "SiglipVisionModel",
        ("siglip", True): "SiglipModel",
        ("clip", False): "CLIPVisionModel",
        ("clip", True): "CLIPModel",
    }
    model_class = getattr(transformers, classes[family, full])
    try:
        loaded = model_class.from_pretrained(
            source, config=config, revision=revision, dtype=torch.float32, use_safetensors=True
        )
    except (OSError, ValueError) as err:
        if local:
            raise unavailable(
                f"{source} has no loadable model.safetensors ({type(err).__name__}); only safetensors weights are "
                "loaded: save the model with save_pretrained(dir, safe_serialization=True)"
            ) from err
        raise _offline(model, err) from err
    tower = loaded.vision_model if full else loaded
    if family == "siglip" and getattr(tower, "head", None) is not None:
        tower.head = None
    return tower


def hf_vision_encoder(model: str, layer: int | None = None, revision: str | None = None) -> Encoder:
    """Load a SigLIP/CLIP vision tower or a BLIP-2 checkpoint's vision tower from a hub id or local
    directory (safetensors weights only). ``layer`` None: the family's default block (SigLIP/CLIP: the
    penultimate, BLIP-2: the last)."""
    import transformers

    local = Path(model).expanduser().is_dir()
    source = str(Path(model).expanduser().resolve()) if local else model
    try:
        # Never a model's own code: hf: encoders take built-in families only, and left unset transformers
        # would ask on a terminal whether to run it.
        config = transformers.AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(
                f"hf:{model} needs its own Python code to load (auto_map in its config), which blipkit never runs "
                "for an encoder; hf: encoders take SigLIP, CLIP (vision) or BLIP-2 models"
            ) from None
        if local:
            raise ConfigError(f"{source} holds no readable config.json for a transformers model ({err})") from err
        raise _offline(model, err) from err
    model_type = getattr(config, "model_type", "")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"hf:{model} is a '{model_type}' model; hf: encoders take SigLIP, CLIP (vision) or BLIP-2 models"
        )
    family, full = MODEL_TYPES[model_type]
    if family == "blip2":
        tower = _blip2_tower(Path(source) if local else _blip2_snapshot(model, revision), config)
    else:
        tower = _siglip_clip_tower(model, source, local, config, revision)
    vision_config = config.vision_config if full else config
    depth = len(tower.encoder.layers)
    index = resolve_layer(FAMILY_LAYER[family] if layer is None else layer, depth, f"hf:{model}")
    tower.encoder.layers = tower.encoder.layers[: index + 1]
    image_size = int(vision_config.image_size)
    grid = image_size // int(vision_config.patch_size)
    transform = build_transform(family, image_size, _preprocessor_config(source, local, revision))
    if local:
        weights = fingerprint(sorted(file_fingerprint(f) for f in Path(source).glob("*.safetensors")))
    else:
        weights = getattr(config, "_commit_hash", None) or revision or "main"
    key = f"hf:{source}@{weights}:block{index}:{image_size}px:pre-{fingerprint(transform.describe())}"
    encoder = HFVisionEncoder(
        freeze(tower),
        index,
        family,
        transform=transform,
        feature_dim=int(vision_config.hidden_size),
        image_size=image_size,
        patch_grid=(grid, grid),
        num_prefix_tokens=0 if family == "siglip" else 1,
        key=key,
    )
    return freeze(encoder)


@hookimpl
def register_encoders(register: Callable[..., None]) -> None:
    """Register the ``hf:`` prefix, which also claims local SigLIP/CLIP/BLIP-2 model directories."""
    register(
        "hf:",
        hf_vision_encoder,
        description="a transformers SigLIP, CLIP or BLIP-2 vision tower: hf:<repo id> or a local model directory",
        kind="transformers",
        matches=claims_directory,
    )
