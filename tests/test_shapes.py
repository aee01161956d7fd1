"""The synthetic ``shapes`` dataset and its second renderer: determinism, disjoint splits, varied drawing,
and captions/answers that match the pixels."""

from __future__ import annotations

import colorsys
import pickle
import re
from dataclasses import replace

import numpy as np
import pytest

from blipkit.errors import ConfigError
from blipkit.plugin_manager import registries
from blipkit.plugins.datasets.shapes import COLORS, SHAPES, make_specs, shapes
from blipkit.plugins.datasets.shapes_redrawn import draw, drawings, shapes_redrawn

# Fraction of a shape's bounding box that its fill covers: the pixels tell the shape apart.
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
CAPTION = re.compile(
    r"^a (?P<c1>\w+) (?P<s1>\w+)(?: (?P<rel>left of|above) a (?P<c2>\w+) (?P<s2>\w+))?$"
)


def colour_name(rgb: tuple[int, int, int] | list[int]) -> str:
    """The colour a person would name ``rgb``, read off its hue (an independent rule, not the generator's)."""
    hue, saturation, _ = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    degrees = hue * 360
    if saturation < 0.15:
        return "white"
    for name, low, high in (("yellow", 40, 70), ("green", 90, 170), ("blue", 190, 250), ("purple", 255, 320)):
        if low <= degrees <= high:
            return name
    return "red" if degrees < 20 or degrees > 335 else "unnamed"


def _drawn(image: np.ndarray, bbox: list[int], background: np.ndarray) -> tuple[str, str]:
    """(colour, shape) read from the pixels inside ``bbox``: the commonest colour there that is not the
    background, named by its hue, and the share of the box that is not background."""
    x0, y0, x1, y1 = bbox
    patch = image[y0:y1, x0:x1].reshape(-1, 3)
    drawn = np.abs(patch.astype(int) - background[y0:y1, x0:x1].reshape(-1, 3)).max(axis=1) > 16
    colours, counts = np.unique(patch[drawn], axis=0, return_counts=True)
    fill = drawn.mean()
    shape = min(FILL, key=lambda s: abs(FILL[s] - fill))
    assert abs(FILL[shape] - fill) < 0.1, (bbox, fill)
    return colour_name(colours[counts.argmax()]), shape


def _check_pictures(dataset: object, backgrounds: list[np.ndarray]) -> dict[int, int]:
    """Every caption names the shapes drawn on ``backgrounds`` (the pictures without their shapes), in
    caption order, with the relation their boxes have."""
    counts = {1: 0, 2: 0}
    for i, background in enumerate(backgrounds):
        sample = dataset[i]
        image = np.asarray(sample.image).astype(int)
        objects = sample.meta["objects"]
        counts[len(objects)] += 1
        found = CAPTION.match(sample.text)
        assert found, sample.text
        named = [(found["c1"], found["s1"])] + ([(found["c2"], found["s2"])] if found["rel"] else [])
        outside = np.ones(image.shape[:2], dtype=bool)
        for o in objects:
            x0, y0, x1, y1 = o["bbox"]
            outside[y0:y1, x0:x1] = False
        assert np.all(image[outside] == background[outside])
        assert named == [_drawn(image, o["bbox"], background) for o in objects]
        assert [colour_name(o["rgb"]) for o in objects] == [c for c, _ in named]
        if found["rel"]:
            first, second = (o["bbox"] for o in objects)
            axis = 0 if found["rel"] == "left of" else 1
            assert first[axis + 2] <= second[axis]
            # overlap across the other axis: the other relation does not also hold
            assert first[1 - axis] < second[3 - axis] and second[1 - axis] < first[3 - axis]
    return counts


def test_captions_name_the_drawn_shapes_and_relation() -> None:
    dataset = shapes(split="validation", num_images=60, image_size=128, tasks="caption")
    assert len(dataset) == 60 and dataset.tasks == {"caption"}
    assert all(dataset[i].image.size == (128, 128) for i in range(3))
    flat = [np.full((128, 128, 3), dataset.records[i].meta["background"]) for i in range(len(dataset))]
    counts = _check_pictures(dataset, flat)
    assert counts[1] > 10 and counts[2] > 10


def test_each_colour_name_is_drawn_in_many_shades_on_varied_backgrounds() -> None:
    records = shapes(num_images=300, tasks="caption").records
    shades: dict[str, set[tuple[int, ...]]] = {}
    for record in records:
        for o in record.meta["objects"]:
            shades.setdefault(o["color"], set()).add(tuple(o["rgb"]))
    assert set(shades) == set(COLORS) and all(len(found) > 20 for found in shades.values())
    assert all(colour_name(rgb) == name for name, found in shades.items() for rgb in found)
    backgrounds = [tuple(r.meta["background"]) for r in records]
    levels = [sum(b) / 3 for b in backgrounds]
    assert len(set(backgrounds)) > 100 and min(levels) < 20 and max(levels) > 80
    sides = [o["bbox"][2] - o["bbox"][0] for r in records for o in r.meta["objects"]]
    assert min(sides) < 50 and max(sides) > 120
    specs = make_specs("train", 100)
    assert 20 < sum(s.antialias for s in specs) < 80
    assert 0 < sum(bool(shape.outline) for s in specs for shape in s.shapes) < 100


def test_redrawn_pictures_match_their_captions_and_differ_from_training() -> None:
    dataset = shapes_redrawn(num_images=60, image_size=128, tasks="caption")
    bare = [np.asarray(draw(replace(picture, parts=()), 128)).astype(int) for picture in drawings(60)]
    counts = _check_pictures(dataset, bare)
    assert counts[1] > 10 and counts[2] > 10
    again = shapes_redrawn(num_images=60, image_size=128, tasks="caption")
    assert np.array_equal(np.asarray(dataset[7].image), np.asarray(again[7].image))
    trained = {tuple(o["rgb"]) for r in shapes(tasks="caption").records for o in r.meta["objects"]}
    redrawn = {tuple(o["rgb"]) for r in shapes_redrawn(tasks="caption").records for o in r.meta["objects"]}
    assert not trained & redrawn
    objects = [o for r in shapes_redrawn(tasks="caption").records for o in r.meta["objects"]]
    sides = [(o["bbox"][2] - o["bbox"][0]) / 224 for o in objects]
    assert min(sides) < 0.2 and max(sides) > 0.6, "sizes the training data never has, at both ends"


@pytest.mark.parametrize("options", [{"split": "train"}, {"split": "validation"}, {"num_images": 0}, {"tasks": "ocr"}])
def test_redrawn_is_for_evaluation_only(options: dict) -> None:
    with pytest.raises(ConfigError) as excinfo:
        registries().datasets.create("shapes-redrawn", **{"split": "test", **options})
    assert "\n" not in str(excinfo.value) and "shapes-redrawn:" in str(excinfo.value)


def test_answers_match_meta_and_are_unambiguous() -> None:
    dataset = shapes(split="test", num_images=40, image_size=64, tasks="vqa")
    assert dataset.tasks == {"vqa"}
    per_image: dict[str, int] = {}
    for record in dataset.records:
        objects = record.meta["objects"]
        per_image[record.image_id] = per_image.get(record.image_id, 0) + 1
        assert record.answers == [record.text]
        question = record.question
        if question == "how many shapes are there?":
            assert record.text == str(len(objects))
            continue
        by_shape = re.fullmatch(r"what color is the (\w+)\?", question)
        by_color = re.fullmatch(r"what shape is the (\w+) object\?", question)
        if by_shape:
            matching = [o for o in objects if o["shape"] == by_shape[1]]
            assert len(matching) == 1 and record.text == matching[0]["color"]
        else:
            assert by_color, question
            matching = [o for o in objects if o["color"] == by_color[1]]
            assert len(matching) == 1 and record.text == matching[0]["shape"]
    images = {r.image_id: len(r.meta["objects"]) for r in dataset.records}
    assert all(per_image[i] == 2 * n + 1 for i, n in images.items())


def test_same_seed_same_data_other_seed_different() -> None:
    first = shapes(num_images=12, image_size=48, seed=3)
    again = shapes(num_images=12, image_size=48, seed=3)
    other = shapes(num_images=12, image_size=48, seed=4)
    assert [r.text for r in first.records] == [r.text for r in again.records]
    for i in range(0, len(first), 5):
        assert np.array_equal(np.asarray(first[i].image), np.asarray(again[i].image))
    assert [r.image_id for r in first.records] != [r.image_id for r in other.records]
    assert any(
        not np.array_equal(np.asarray(first[i].image), np.asarray(other[i].image)) for i in range(len(first))
    )


def test_splits_are_disjoint_and_sized() -> None:
    ids = {}
    for split, expected in (("train", 1200), ("validation", 120), ("test", 240)):
        dataset = shapes(split=split, tasks="caption")
        ids[split] = {r.image_id for r in dataset.records}
        assert len(ids[split]) == len(dataset) == expected
    assert not ids["train"] & ids["validation"]
    assert not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    other_seed = {s.digest for s in make_specs("test", 500, seed=1)}
    train_specs = {s.digest for s in make_specs("train", 3000, seed=0)}
    assert not other_seed & train_specs
    assert {r.image_id for r in shapes(split="val", tasks="caption").records} == ids["validation"]


def test_dataset_pickles_for_spawned_workers() -> None:
    dataset = shapes(num_images=3, image_size=32)
    clone = pickle.loads(pickle.dumps(dataset))
    assert [r.text for r in clone.records] == [r.text for r in dataset.records]
    assert np.array_equal(np.asarray(clone[-1].image), np.asarray(dataset[len(dataset) - 1].image))


def test_options_shape_the_data() -> None:
    single = shapes(num_images=30, single_fraction=1.0, tasks="caption")
    assert all(len(r.meta["objects"]) == 1 for r in single.records)
    assert all(len(r.meta["objects"]) == 1 for r in shapes(num_images=30, max_shapes=1).records)
    pairs = shapes(num_images=30, single_fraction=0.0, tasks=["caption"])
    assert all(len(r.meta["objects"]) == 2 for r in pairs.records)
    both = shapes(num_images=10)
    assert both.tasks == {"caption", "vqa"}
    assert sum(r.task == "caption" for r in both.records) == 10
    seen = {(o["color"], o["shape"]) for r in shapes(num_images=300, tasks="caption").records for o in r.meta["objects"]}
    assert seen == {(c, s) for c in COLORS for s in SHAPES}
    big, small = shapes(num_images=5, image_size=256), shapes(num_images=5, image_size=128)
    for a, b in zip(big.records, small.records):
        for oa, ob in zip(a.meta["objects"], b.meta["objects"]):
            assert np.allclose(np.array(oa["bbox"]) / 2, ob["bbox"], atol=0.51)


@pytest.mark.parametrize(
    "options",
    [{"split": "holdout"}, {"max_shapes": 3}, {"single_fraction": 1.5}, {"tasks": "retrieval"}, {"num_images": 0}],
)
def test_bad_options_raise_config_error(options: dict) -> None:
    with pytest.raises(ConfigError) as excinfo:
        shapes(**options)
    assert "\n" not in str(excinfo.value) and "shapes:" in str(excinfo.value)


def test_registered_as_synthetic() -> None:
    entry = registries().datasets.resolve("shapes").entry
    assert (entry.kind, entry.usable_offline(), entry.plugin) == ("synthetic", True, "blipkit.plugins.datasets.shapes")
    dataset = registries().datasets.create("shapes", split="validation", num_images=4, image_size=32)
    per_image = [2 * len(r.meta["objects"]) + 2 for r in dataset.records if r.task == "caption"]
    assert len(per_image) == 4
    assert (dataset.name, dataset.split) == ("shapes", "validation")
    assert dataset.report() == f"skipped 0 of {sum(per_image)} samples"
