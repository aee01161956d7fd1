"""``shapes``: the built-in synthetic dataset of coloured shapes, with captions and question-answer pairs.

Each image shows one or two shapes (circle, square, triangle; red, green, blue, yellow, white or purple) on a
dark or mid-tone background. Captions name colour and shape ("a red circle"), and for two shapes their
relative position ("a red circle left of a blue square", "... above ..."). Questions ask the colour of each
shape, the shape of each colour, and how many shapes there are; the two shapes of an image always differ in
both colour and kind, so every question has one answer.

A colour name is a range of shades around its hue, not one RGB value; the background's tone and tint, the
sizes and places, a darker outline and anti-aliased edges vary too, so that a model learns the names rather
than the pixels. Images are generated from a seed and drawn lazily. Every layout (colour names, shapes,
boxes, relation) belongs to exactly one split (a hash of it picks the split), so train, validation and test
never share a layout, whatever the seeds, shades and sizes.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from blipkit import hookimpl
from blipkit.data.dataset import ImageTextDataset
from blipkit.data.sample import Record
from blipkit.errors import ConfigError

from .shapes_redrawn import shapes_redrawn
from .shapes_scoring import CheckedCaption, check_captions, read_metadata, score_captions, score_line

__all__ = [
    "COLORS",
    "SHADES",
    "SHAPES",
    "ImageSpec",
    "ShapeSpec",
    "export_shapes",
    "make_specs",
    "register_datasets",
    "render",
    "shade",
    "shapes",
    "try_model",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "white": (240, 240, 240),
    "purple": (150, 60, 200),
}
"""Each colour's typical shade; drawn shades vary around it (``SHADES``)."""
SHADES: dict[str, tuple[float, float, tuple[float, float], tuple[float, float]]] = {
    "red": (0.0, 8.0, (0.70, 0.95), (0.75, 0.98)),
    "green": (130.0, 14.0, (0.60, 0.90), (0.60, 0.85)),
    "blue": (222.0, 10.0, (0.65, 0.90), (0.80, 0.98)),
    "yellow": (53.0, 4.0, (0.75, 0.95), (0.88, 0.98)),
    "white": (0.0, 180.0, (0.00, 0.06), (0.88, 1.00)),
    "purple": (278.0, 10.0, (0.55, 0.80), (0.65, 0.88)),
}
"""Per colour name: hue in degrees, its +- range, and the saturation and value ranges (HSV) it is drawn in."""
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "above")
SPLITS: dict[str, int] = {"train": 1200, "validation": 120, "test": 240}
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}

GRID = 256
"""Layouts are drawn on a GRID x GRID lattice and scaled to the requested image size."""
_MARGIN = 8
_GAP = 8
_BUCKETS = {"train": range(0, 8), "validation": range(8, 9), "test": range(9, 10)}
_SUPERSAMPLE = 4
"""Anti-aliased images are drawn at this many times their size and reduced by block averages."""


@dataclass(frozen=True)
class ShapeSpec:
    """One drawn shape: colour name, shape name, box (x0, y0, x1, y1) in GRID units (x1/y1 exclusive), its
    shade ``rgb`` (None: the colour's typical one) and the width of its darker outline in GRID units (0: none)."""

    color: str
    shape: str
    box: tuple[int, int, int, int]
    rgb: tuple[int, int, int] | None = None
    outline: int = 0

    @property
    def fill(self) -> tuple[int, int, int]:
        """The RGB the shape is filled with."""
        return self.rgb or COLORS[self.color]


@dataclass(frozen=True)
class ImageSpec:
    """Everything that determines an image's pixels at a given size; ``relation`` links shape 0 to shape 1."""

    background: tuple[int, int, int]
    shapes: tuple[ShapeSpec, ...]
    relation: str | None = None
    antialias: bool = False

    @functools.cached_property
    def digest(self) -> str:
        """A stable hex digest of the layout: colour names, shapes, boxes and relation (not shades or style)."""
        layout = (tuple((s.color, s.shape, s.box) for s in self.shapes), self.relation)
        return hashlib.blake2b(repr(layout).encode(), digest_size=8).hexdigest()

    def bucket(self) -> int:
        """0-9: which split owns this layout (train 0-7, validation 8, test 9)."""
        return int(self.digest, 16) % 10

    def caption(self) -> str:
        """The caption naming colours, shapes and, for two shapes, their relative position."""
        first = f"a {self.shapes[0].color} {self.shapes[0].shape}"
        if len(self.shapes) == 1:
            return first
        second = self.shapes[1]
        return f"{first} {self.relation} a {second.color} {second.shape}"

    def questions(self) -> list[tuple[str, str]]:
        """(question, answer) pairs, each with a single correct answer."""
        pairs: list[tuple[str, str]] = []
        for item in self.shapes:
            pairs.append((f"what color is the {item.shape}?", item.color))
            pairs.append((f"what shape is the {item.color} object?", item.shape))
        pairs.append(("how many shapes are there?", str(len(self.shapes))))
        return pairs


def _pair_boxes(rng: random.Random, relation: str) -> list[tuple[int, int, int, int]]:
    """Two boxes, the first strictly before the second along the relation's axis and overlapping across it.

    The overlap keeps the relation unique: a shape "left of" another is never also "above" it.
    """
    sizes = [rng.randint(GRID // 5, GRID * 38 // 100) for _ in range(2)]
    first_along = rng.randint(_MARGIN, GRID // 2 - _GAP // 2 - sizes[0])
    second_along = rng.randint(GRID // 2 + _GAP // 2, GRID - _MARGIN - sizes[1])
    first_across = rng.randint(_MARGIN, GRID - _MARGIN - sizes[0])
    # The second shape's centre lies within the first shape's extent across the axis.
    low = max(_MARGIN, first_across - sizes[1] // 2)
    high = min(GRID - _MARGIN - sizes[1], first_across + sizes[0] - sizes[1] // 2)
    second_across = rng.randint(low, high)
    boxes = []
    for along, across, size in ((first_along, first_across, sizes[0]), (second_along, second_across, sizes[1])):
        x0, y0 = (along, across) if relation == "left of" else (across, along)
        boxes.append((x0, y0, x0 + size, y0 + size))
    return boxes


def shade(rng: random.Random, color: str) -> tuple[int, int, int]:
    """A random shade of the colour named ``color``, within its ``SHADES`` ranges."""
    hue, spread, saturation, value = SHADES[color]
    h = (hue + rng.uniform(-spread, spread)) % 360 / 360
    rgb = colorsys.hsv_to_rgb(h, rng.uniform(*saturation), rng.uniform(*value))
    return tuple(round(c * 255) for c in rgb)  # type: ignore[return-value]


def _background(rng: random.Random) -> tuple[int, int, int]:
    """A dark to mid grey (0-110), slightly tinted."""
    level = rng.randint(0, 110)
    return tuple(min(255, max(0, level + rng.randint(-12, 12))) for _ in range(3))  # type: ignore[return-value]


def _shape(rng: random.Random, color: str, kind: str, box: tuple[int, int, int, int]) -> ShapeSpec:
    return ShapeSpec(color, kind, box, shade(rng, color), rng.choice((0, 0, 2, 4)))


def _random_spec(rng: random.Random, two: bool) -> ImageSpec:
    background, antialias = _background(rng), rng.random() < 0.5
    if not two:
        size = rng.randint(GRID * 22 // 100, GRID * 58 // 100)
        x0, y0 = (rng.randint(_MARGIN, GRID - _MARGIN - size) for _ in range(2))
        single = _shape(rng, rng.choice(list(COLORS)), rng.choice(SHAPES), (x0, y0, x0 + size, y0 + size))
        return ImageSpec(background, (single,), antialias=antialias)
    colors = rng.sample(list(COLORS), 2)
    kinds = rng.sample(SHAPES, 2)
    relation = rng.choice(RELATIONS)
    boxes = _pair_boxes(rng, relation)
    drawn = tuple(_shape(rng, c, k, b) for c, k, b in zip(colors, kinds, boxes))
    return ImageSpec(background, drawn, relation, antialias)


def make_specs(split: str, num_images: int, seed: int = 0, max_shapes: int = 2, single_fraction: float = 0.5) -> list[ImageSpec]:
    """``num_images`` distinct layouts for ``split``, deterministic in (split, seed, max_shapes, single_fraction)."""
    rng = random.Random(f"blipkit-shapes/{seed}/{split}")
    owned = _BUCKETS[split]
    seen: set[str] = set()
    specs: list[ImageSpec] = []
    while len(specs) < num_images:
        spec = _random_spec(rng, two=max_shapes >= 2 and rng.random() >= single_fraction)
        if spec.bucket() in owned and spec.digest not in seen:
            seen.add(spec.digest)
            specs.append(spec)
    return specs


def pixel_box(box: tuple[int, int, int, int], image_size: int) -> tuple[int, int, int, int]:
    """A GRID-unit box in pixels at ``image_size`` (x1/y1 exclusive)."""
    return tuple(round(v * image_size / GRID) for v in box)  # type: ignore[return-value]


def render(spec: ImageSpec, image_size: int = 224) -> Image.Image:
    """Draw ``spec`` as an RGB image of ``image_size`` x ``image_size``."""
    scale = _SUPERSAMPLE if spec.antialias else 1
    image = Image.new("RGB", (image_size * scale, image_size * scale), spec.background)
    draw = ImageDraw.Draw(image)
    for item in spec.shapes:
        x0, y0, x1, y1 = (v * scale for v in pixel_box(item.box, image_size))
        outline = tuple(c * 3 // 5 for c in item.fill) if item.outline else None
        width = max(1, round(item.outline * image_size * scale / GRID)) if item.outline else 0
        style = {"fill": item.fill, "outline": outline, "width": width}
        if item.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), **style)
        elif item.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), **style)
        else:
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], **style)
    return image.reduce(scale) if scale > 1 else image


def _tasks(tasks: str | list[str] | tuple[str, ...]) -> set[str]:
    chosen = {"caption", "vqa"} if tasks in ("both", "all") else {tasks} if isinstance(tasks, str) else set(tasks)
    if not chosen or not chosen <= {"caption", "vqa"}:
        raise ConfigError(f"shapes: tasks must be 'caption', 'vqa' or 'both', not {tasks!r}")
    return chosen


def shapes(
    source: str = "shapes",
    split: str = "train",
    num_images: int | None = None,
    image_size: int = 224,
    seed: int = 0,
    max_shapes: int = 2,
    single_fraction: float = 0.5,
    tasks: str | list[str] = "both",
) -> ImageTextDataset:
    """Synthetic coloured shapes: per image one caption sample and 3 (one shape) or 5 (two shapes) VQA samples.

    ``num_images`` defaults to 1200 / 120 / 240 for train / validation / test. ``meta`` of every sample holds
    ``objects`` (a list of ``{"color", "shape", "bbox"}``, bbox in pixels, x1/y1 exclusive) and ``relation``.
    """
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ConfigError(f"shapes: unknown split '{split}'; use one of {', '.join(SPLITS)}")
    if max_shapes not in (1, 2):
        raise ConfigError(f"shapes: max_shapes must be 1 or 2, not {max_shapes!r}")
    if not 0.0 <= single_fraction <= 1.0:
        raise ConfigError(f"shapes: single_fraction must be between 0 and 1, not {single_fraction!r}")
    if image_size < 16:
        raise ConfigError(f"shapes: image_size must be at least 16 pixels, not {image_size!r}")
    count = SPLITS[split] if num_images is None else num_images
    if count < 1:
        raise ConfigError(f"shapes: num_images must be at least 1, not {num_images!r}")
    wanted = _tasks(tasks)
    records: list[Record] = []
    for spec in make_specs(split, count, seed, max_shapes, single_fraction):
        image = functools.partial(render, spec, image_size)
        image_id = f"shapes/{spec.digest}/{image_size}"
        meta: dict[str, Any] = {
            "objects": [
                {"color": s.color, "shape": s.shape, "bbox": list(pixel_box(s.box, image_size)), "rgb": list(s.fill)}
                for s in spec.shapes
            ],
            "relation": spec.relation,
            "background": list(spec.background),
        }
        if "caption" in wanted:
            records.append(Record(image, spec.caption(), image_id=image_id, meta=meta))
        if "vqa" in wanted:
            for question, answer in spec.questions():
                records.append(Record(image, answer, question, [answer], image_id, "vqa", meta))
    return ImageTextDataset(records, name="shapes", split=split, caption_scorer=score_captions)


@hookimpl
def register_datasets(register: Any) -> None:
    """Register ``shapes`` and ``shapes-redrawn`` (its independent, evaluation-only second renderer)."""
    register(
        "shapes",
        shapes,
        description="synthetic coloured shapes with captions and questions (offline, deterministic from a seed)",
        kind="synthetic",
        available=True,
        matches=lambda name: name == "shapes",
    )
    register(
        "shapes-redrawn",
        shapes_redrawn,
        description="shapes drawn by a second, independent renderer; split test only, for evaluation",
        kind="synthetic",
        available=True,
        matches=lambda name: name == "shapes-redrawn",
    )


def export_shapes(out_dir: str, split: str = "test", num_images: int = 8, image_size: int = 224, seed: int = 0) -> int:
    """Write ``num_images`` shapes images of ``split`` as PNG files plus ``metadata.jsonl`` (imagefolder format,
    each row with the image's ``objects`` and ``relation`` beside its caption)."""
    import json
    from pathlib import Path

    from blipkit.io import atomic_path, atomic_write_text

    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ConfigError(f"shapes: unknown split '{split}'; use one of {', '.join(SPLITS)}")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for number, spec in enumerate(make_specs(split, num_images, seed)):
        name = f"{split}-{number:04d}.png"
        with atomic_path(folder / name) as tmp:
            render(spec, image_size).save(tmp, format="PNG")
        objects = [
            {"color": s.color, "shape": s.shape, "bbox": list(pixel_box(s.box, image_size))} for s in spec.shapes
        ]
        row = {"file_name": name, "text": spec.caption(), "objects": objects, "relation": spec.relation}
        lines.append(json.dumps(row))
    atomic_write_text(folder / "metadata.jsonl", "".join(f"{line}\n" for line in lines))
    return len(lines)


def try_model(folder: str, model: str | None = None, batch_size: int = 16) -> tuple[str, list[CheckedCaption]]:
    """Caption the pictures of a folder that :func:`export_shapes` wrote with a trained model (default: the
    last ``blipkit train`` run) and check each caption against the truth; returns the model used and the checks."""
    from pathlib import Path

    import blipkit
    from blipkit.model.persistence import last_run

    rows = read_metadata(Path(folder) / "metadata.jsonl")
    run = model or str(last_run())
    vlm = blipkit.load(run)
    paths = [Path(folder) / row["file_name"] for row in rows]
    captions = [
        text for start in range(0, len(paths), batch_size) for text in vlm.caption(paths[start : start + batch_size])
    ]
    return run, check_captions(rows, captions)


@hookimpl
def register_commands(cli: Any) -> None:
    """Add ``blipkit shapes``: write synthetic shapes images to a folder, and optionally try a model on them."""
    import click

    @cli.command("shapes")
    @click.argument("out_dir", type=click.Path(file_okay=False))
    @click.option("--split", default="test", show_default=True, help="train, validation or test.")
    @click.option("--num-images", "-n", default=8, show_default=True, type=click.IntRange(min=1))
    @click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=16))
    @click.option("--seed", default=0, show_default=True)
    @click.option("--caption", "caption", is_flag=True,
                  help="Then caption them with a trained model and print each caption beside the truth, and the score.")
    @click.option("--model", "-m", default=None,
                  help="With --caption: run directory (default: the last 'blipkit train' run).")
    def shapes_command(out_dir: str, split: str, num_images: int, image_size: int, seed: int, caption: bool,
                       model: str | None) -> None:
        """Write synthetic shapes images and their captions (metadata.jsonl) to OUT_DIR.

        The folder is an imagefolder dataset (blipkit train --data OUT_DIR) and a set of pictures to try a
        trained model on (blipkit caption OUT_DIR, or --caption here to see how many it gets right).
        """
        if model is not None and not caption:
            raise click.UsageError("--model goes with --caption")
        count = export_shapes(out_dir, split, num_images, image_size, seed)
        click.echo(f"Wrote {count} {split} images and metadata.jsonl to {out_dir}")
        if caption:
            run, checked = try_model(out_dir, model)
            click.echo(f"Captions by {run}, beside the truth:")
            width = max(len(item.caption) for item in checked)
            for item in checked:
                click.echo(f"  {'right' if item.right else 'WRONG'}  {item.caption:{width}}  (truth: {item.truth})")
            click.echo(score_line(checked))
