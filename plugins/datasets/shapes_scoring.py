"""Caption scoring for the synthetic ``shapes`` data: are the right colours bound to the right shapes?

The ``shapes`` dataset hands ``score_captions`` to evaluation as its caption scorer, so that every caption
evaluation of shapes data reports ``shapes_accuracy``, ``shapes_single_shape`` and ``shapes_two_shapes``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from blipkit.errors import DataError

__all__ = ["COLOR_WORDS", "SHAPE_WORDS", "mentions", "score_captions", "shapes_caption_accuracy", "shapes_caption_correct"]

# The words the generator (shapes.py, which imports this module) draws with.
COLOR_WORDS = frozenset({"red", "green", "blue", "yellow", "white", "purple"})
SHAPE_WORDS = frozenset({"circle", "square", "triangle"})
# Colour and shape words the data never uses: naming one is naming something that is not there.
_OTHER_COLORS = frozenset(
    {"black", "grey", "gray", "orange", "pink", "brown", "cyan", "magenta", "violet", "gold", "silver", "teal"}
)
_OTHER_SHAPES = frozenset(
    {"rectangle", "oval", "ellipse", "star", "diamond", "pentagon", "hexagon", "heart", "cross", "polygon"}
)
_WORD = re.compile(r"[a-z]+")


def _shape_word(word: str) -> str | None:
    """The singular shape a word names ("circles" -> "circle"), or None for a word that names no shape."""
    for stem in (word, word[:-1] if word.endswith("s") else None):
        if stem in SHAPE_WORDS or stem in _OTHER_SHAPES:
            return stem
    return None


def mentions(caption: str) -> tuple[list[str], list[str], set[tuple[str, str]]]:
    """Colour words, shape words and (colour, shape) pairs where a colour word directly precedes a shape word."""
    colors: list[str] = []
    shapes: list[str] = []
    pairs: set[tuple[str, str]] = set()
    pending: str | None = None
    for word in _WORD.findall(caption.lower()):
        shape = _shape_word(word)
        if word in COLOR_WORDS or word in _OTHER_COLORS:
            colors.append(word)
            pending = word
        elif shape is not None:
            shapes.append(shape)
            if pending is not None:
                pairs.add((pending, shape))
            pending = None
    return colors, shapes, pairs


def _ground_truth(objects: Sequence[Mapping[str, Any]]) -> set[tuple[str, str]]:
    if not objects:
        raise DataError("shapes_caption_correct: an image needs at least one object ({'color', 'shape'})")
    try:
        return {(str(item["color"]).lower(), str(item["shape"]).lower()) for item in objects}
    except KeyError as missing:
        raise DataError(f"shapes_caption_correct: each object needs 'color' and 'shape', one lacks {missing}") from None


def shapes_caption_correct(caption: str, objects: Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``caption`` names exactly the colours and shapes of ``objects`` (a sample's ``meta["objects"]``).

    The caption must name every object's colour and shape and no other colour or shape word (plurals count as
    the shape; colours the data never uses, such as "black", "grey" or "orange", and shapes such as
    "rectangle", count as wrong). With two or more objects each colour must also be bound to its shape: every
    object appears as "<colour> <shape>" with nothing but non-colour, non-shape words between them, and no
    other such pair appears, so "a blue circle left of a red square" is wrong for a red circle and a blue
    square. The spatial relation is not checked.
    """
    truth = _ground_truth(objects)
    colors, shapes, pairs = mentions(caption)
    if set(colors) != {color for color, _ in truth} or set(shapes) != {shape for _, shape in truth}:
        return False
    return len(truth) == 1 or pairs == truth


def shapes_caption_accuracy(
    captions: Sequence[str], objects_list: Sequence[Sequence[Mapping[str, Any]]]
) -> dict[str, Any]:
    """The fraction of correct captions (see :func:`shapes_caption_correct`), overall and by object count.

    Returns ``accuracy`` and ``count`` over all images, ``single_shape`` / ``single_count`` over one-object
    images and ``two_shapes`` / ``two_count`` over two-object images; an accuracy is None when its group is
    empty.
    """
    if len(captions) != len(objects_list):
        raise DataError(
            f"shapes_caption_accuracy: {len(captions)} captions but {len(objects_list)} object lists; "
            "pass one per image"
        )
    if not captions:
        raise DataError("shapes_caption_accuracy: no captions to score; pass at least one")
    groups: dict[int, list[bool]] = {}
    for caption, objects in zip(captions, objects_list):
        groups.setdefault(len(objects), []).append(shapes_caption_correct(caption, objects))
    every = [flag for flags in groups.values() for flag in flags]

    def share(flags: list[bool]) -> float | None:
        return sum(flags) / len(flags) if flags else None

    single, two = groups.get(1, []), groups.get(2, [])
    return {
        "accuracy": share(every),
        "count": len(every),
        "single_shape": share(single),
        "single_count": len(single),
        "two_shapes": share(two),
        "two_count": len(two),
    }


def score_captions(predictions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``shapes_*`` scores of caption predictions that carry their image's ``objects``."""
    scored = [p for p in predictions if "objects" in p]
    if not scored:
        return {}
    accuracy = shapes_caption_accuracy([p["caption"] for p in scored], [p["objects"] for p in scored])
    return {f"shapes_{k}": v for k, v in accuracy.items()}
