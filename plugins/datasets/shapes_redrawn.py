"""``shapes-redrawn``: shapes pictures from a second, independent renderer, for evaluation only.

The same captions and questions as ``shapes`` (one or two shapes, six colour names, "left of" / "above"),
drawn by separate code with other choices: named shades that the training generator does not draw
(crimson, forest green, royal blue, gold, ivory, dark orchid, ...), backgrounds that are vertical
gradients between two dark or mid tones with a little pixel noise, size ranges wider than the training
data's at both ends, and shapes rasterised from masks on a 3x grid. Nothing trains on it: asking for
any split but ``test`` is an error. A model that learned colour names, not the training generator's
pixels, should score on it about as well as on the ``shapes`` test split.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from blipkit.data.dataset import ImageTextDataset
from blipkit.data.sample import Record
from blipkit.errors import ConfigError

from .shapes_scoring import score_captions

__all__ = ["PALETTE", "REDRAWN_IMAGES", "Drawing", "drawings", "draw", "shapes_redrawn"]

PALETTE: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((178, 34, 34), (205, 30, 50), (235, 70, 60), (200, 16, 60)),
    "green": ((34, 139, 34), (50, 205, 50), (46, 160, 87), (0, 170, 100)),
    "blue": ((65, 105, 225), (30, 110, 255), (0, 40, 205), (70, 90, 180)),
    "yellow": ((255, 215, 0), (250, 240, 60), (240, 200, 30), (255, 235, 120)),
    "white": ((245, 245, 245), (255, 250, 240), (225, 228, 232), (250, 250, 255)),
    "purple": ((140, 40, 160), (148, 0, 211), (147, 112, 219), (120, 60, 180)),
}
"""Named shades of each colour (X11-like), none of them drawn by the training generator."""
TONES: tuple[tuple[int, int, int], ...] = (
    (20, 24, 48), (54, 54, 60), (50, 56, 40), (70, 58, 50), (80, 90, 100), (10, 10, 10), (20, 50, 55), (50, 30, 50),
    (96, 96, 88), (40, 40, 70),
)
"""Background tones; a background is a vertical gradient between two of them."""
KINDS = ("circle", "square", "triangle")
REDRAWN_IMAGES = 240
_SINGLE_SIZE = (0.16, 0.66)
_PAIR_SIZE = (0.16, 0.42)
_MARGIN = 0.03
_GAP = 0.04
_SUPERSAMPLE = 3
_NOISE = 4


@dataclass(frozen=True)
class Part:
    """One shape: colour name, kind, fill, and its box as fractions of the image side (x0, y0, x1, y1)."""

    color: str
    kind: str
    rgb: tuple[int, int, int]
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Drawing:
    """One picture: its shapes (``relation`` links the first to the second), background tones and noise seed."""

    parts: tuple[Part, ...]
    relation: str | None
    top: tuple[int, int, int]
    bottom: tuple[int, int, int]
    noise_seed: int

    def caption(self) -> str:
        """The caption in the ``shapes`` grammar: "a red circle" or "a red circle left of a blue square"."""
        named = [f"a {p.color} {p.kind}" for p in self.parts]
        return named[0] if len(named) == 1 else f"{named[0]} {self.relation} {named[1]}"

    def questions(self) -> list[tuple[str, str]]:
        """(question, answer) pairs in the ``shapes`` wording, one answer each."""
        asked = [(f"what color is the {p.kind}?", p.color) for p in self.parts]
        asked += [(f"what shape is the {p.color} object?", p.kind) for p in self.parts]
        return asked + [("how many shapes are there?", str(len(self.parts)))]


def _placed_pair(rng: random.Random, relation: str) -> list[tuple[float, float, float, float]]:
    """Two square boxes: the first wholly before the second along the relation's axis, their centres within
    each other's extent across it, so exactly one of "left of" / "above" holds."""
    sizes = [rng.uniform(*_PAIR_SIZE) for _ in range(2)]
    split = rng.uniform(max(0.42, _MARGIN + sizes[0] + _GAP / 2), min(0.58, 1 - _MARGIN - sizes[1] - _GAP / 2))
    first = rng.uniform(_MARGIN, split - _GAP / 2 - sizes[0])
    second = rng.uniform(split + _GAP / 2, 1 - _MARGIN - sizes[1])
    centre = rng.uniform(_MARGIN + max(sizes) / 2, 1 - _MARGIN - max(sizes) / 2)
    jitter = min(sizes) / 4
    boxes = []
    for along, size in ((first, sizes[0]), (second, sizes[1])):
        across = min(max(0.0, centre + rng.uniform(-jitter, jitter) - size / 2), 1 - size)
        x0, y0 = (along, across) if relation == "left of" else (across, along)
        boxes.append((x0, y0, x0 + size, y0 + size))
    return boxes


def _drawing(rng: random.Random, two: bool) -> Drawing:
    top, bottom = rng.sample(TONES, 2)
    noise_seed = rng.randrange(1 << 30)
    if not two:
        size = rng.uniform(*_SINGLE_SIZE)
        x0, y0 = (rng.uniform(_MARGIN, 1 - _MARGIN - size) for _ in range(2))
        color = rng.choice(list(PALETTE))
        part = Part(color, rng.choice(KINDS), rng.choice(PALETTE[color]), (x0, y0, x0 + size, y0 + size))
        return Drawing((part,), None, top, bottom, noise_seed)
    relation = rng.choice(("left of", "above"))
    colors, kinds = rng.sample(list(PALETTE), 2), rng.sample(KINDS, 2)
    parts = tuple(
        Part(c, k, rng.choice(PALETTE[c]), box) for c, k, box in zip(colors, kinds, _placed_pair(rng, relation))
    )
    return Drawing(parts, relation, top, bottom, noise_seed)


def drawings(num_images: int, seed: int = 0, single_fraction: float = 0.5) -> list[Drawing]:
    """``num_images`` pictures, deterministic in (seed, single_fraction)."""
    rng = random.Random(f"blipkit-shapes-redrawn/{seed}")
    return [_drawing(rng, two=rng.random() >= single_fraction) for _ in range(num_images)]


def _paint(canvas: np.ndarray, part: Part) -> None:
    """Fill the pixels of ``canvas`` (sampled at their centres) that ``part`` covers with its colour."""
    side = canvas.shape[0]
    x0, y0, x1, y1 = (v * side for v in part.box)
    left, top = int(x0), int(y0)
    ys, xs = np.mgrid[top : min(side, int(np.ceil(y1))), left : min(side, int(np.ceil(x1)))] + 0.5
    inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    if part.kind == "circle":
        inside = (xs - (x0 + x1) / 2) ** 2 + (ys - (y0 + y1) / 2) ** 2 <= ((x1 - x0) / 2) ** 2
    elif part.kind == "triangle":
        # Upright: apex at the top centre, base along the bottom edge.
        inside &= np.abs(xs - (x0 + x1) / 2) <= (ys - y0) / (y1 - y0) * (x1 - x0) / 2
    canvas[top : top + inside.shape[0], left : left + inside.shape[1]][inside] = part.rgb


def draw(picture: Drawing, image_size: int = 224) -> Image.Image:
    """Render ``picture`` as an RGB image of ``image_size`` x ``image_size``."""
    side = image_size * _SUPERSAMPLE
    ramp = np.linspace(0.0, 1.0, side)[:, None, None]
    canvas = (1 - ramp) * np.array(picture.top, float) + ramp * np.array(picture.bottom, float)
    canvas = np.broadcast_to(canvas, (side, side, 3)).copy()
    for part in picture.parts:
        _paint(canvas, part)
    small = canvas.reshape(image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    noise = np.random.default_rng(picture.noise_seed).integers(-_NOISE, _NOISE + 1, small.shape)
    return Image.fromarray(np.clip(np.rint(small) + noise, 0, 255).astype(np.uint8), "RGB")


def pixel_bbox(box: tuple[float, float, float, float], image_size: int) -> list[int]:
    """A fractional box in whole pixels that contain it (x1/y1 exclusive)."""
    x0, y0, x1, y1 = (v * image_size for v in box)
    return [int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1))]


def shapes_redrawn(
    source: str = "shapes-redrawn",
    split: str = "test",
    num_images: int | None = None,
    image_size: int = 224,
    seed: int = 0,
    tasks: str | list[str] = "both",
) -> ImageTextDataset:
    """Evaluation pictures from the second renderer: per image a caption sample and 3 or 5 VQA samples.

    ``meta`` holds ``objects`` (``{"color", "shape", "bbox", "rgb"}``) and ``relation``, as ``shapes`` does.
    """
    if split != "test":
        raise ConfigError(
            f"shapes-redrawn: it is for evaluation only (split test), not split '{split}'; train on shapes"
        )
    count = REDRAWN_IMAGES if num_images is None else num_images
    if count < 1:
        raise ConfigError(f"shapes-redrawn: num_images must be at least 1, not {num_images!r}")
    if image_size < 16:
        raise ConfigError(f"shapes-redrawn: image_size must be at least 16 pixels, not {image_size!r}")
    wanted = {"caption", "vqa"} if tasks in ("both", "all") else {tasks} if isinstance(tasks, str) else set(tasks)
    if not wanted or not wanted <= {"caption", "vqa"}:
        raise ConfigError(f"shapes-redrawn: tasks must be 'caption', 'vqa' or 'both', not {tasks!r}")
    records: list[Record] = []
    for number, picture in enumerate(drawings(count, seed)):
        image = functools.partial(draw, picture, image_size)
        image_id = f"shapes-redrawn/{seed}/{number}/{image_size}"
        objects = [
            {"color": p.color, "shape": p.kind, "bbox": pixel_bbox(p.box, image_size), "rgb": list(p.rgb)}
            for p in picture.parts
        ]
        meta: dict[str, Any] = {"objects": objects, "relation": picture.relation}
        if "caption" in wanted:
            records.append(Record(image, picture.caption(), image_id=image_id, meta=meta))
        if "vqa" in wanted:
            for question, answer in picture.questions():
                records.append(Record(image, answer, question, [answer], image_id, "vqa", meta))
    return ImageTextDataset(records, name="shapes-redrawn", split=split, caption_scorer=score_captions)
