"""Caption scoring for the synthetic ``shapes`` data: are the right colours bound to the right shapes?

The ``shapes`` dataset hands ``score_captions`` to evaluation as its caption scorer, so that every caption
evaluation of shapes data reports ``shapes_accuracy``, ``shapes_single_shape`` and ``shapes_two_shapes``
(colours bound to shapes), and ``shapes_two_shapes_exact`` (bound, and the relation right too).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blipkit.errors import DataError

__all__ = [
    "COLOR_WORDS",
    "SHAPE_WORDS",
    "CheckedCaption",
    "caption_right",
    "check_captions",
    "read_metadata",
    "score_line",
    "mentions",
    "relation_correct",
    "score_captions",
    "shapes_caption_accuracy",
    "shapes_caption_correct",
]

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
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


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


def _ordered_pairs(caption: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(colour, shape) pairs in caption order, and the words between each pair and the next."""
    pairs: list[tuple[str, str]] = []
    between: list[str] = []
    words: list[str] = []
    pending: str | None = None
    for word in _WORD.findall(caption.lower()):
        shape = _shape_word(word)
        if word in COLOR_WORDS or word in _OTHER_COLORS:
            pending = word
        elif shape is not None and pending is not None:
            if pairs:
                between.append(" ".join(words))
            pairs.append((pending, shape))
            words, pending = [], None
        elif pairs:
            words.append(word)
    return pairs, between


def relation_correct(caption: str, objects: Sequence[Mapping[str, Any]], relation: str) -> bool:
    """Whether a caption of two objects states how the first of ``objects`` lies relative to the second.

    ``relation`` is "left of" or "above" (object 0 to object 1); the caption may name them in either
    order, with the inverse relation ("right of", "below") when it names object 1 first.
    """
    pairs, between = _ordered_pairs(caption)
    truth = [(str(o["color"]).lower(), str(o["shape"]).lower()) for o in objects]
    if len(pairs) != 2 or len(truth) != 2:
        return False
    stated = [phrase for phrase in _INVERSE if re.search(rf"\b{phrase}\b", between[0])]
    if len(stated) != 1:
        return False
    if pairs == truth:
        return stated[0] == relation
    return pairs == truth[::-1] and stated[0] == _INVERSE[relation]


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
    """``shapes_*`` scores of caption predictions that carry their image's ``objects`` (and ``relation``)."""
    scored = [p for p in predictions if "objects" in p]
    if not scored:
        return {}
    accuracy = shapes_caption_accuracy([p["caption"] for p in scored], [p["objects"] for p in scored])
    scores = {f"shapes_{k}": v for k, v in accuracy.items()}
    pairs = [p for p in scored if len(p["objects"]) == 2 and p.get("relation")]
    if pairs:
        exact = [caption_right(p["caption"], p["objects"], p["relation"]) for p in pairs]
        scores["shapes_two_shapes_exact"] = sum(exact) / len(exact)
    return scores


@dataclass(frozen=True)
class CheckedCaption:
    """A model's caption of one picture, its true caption, and whether the model's is right."""

    caption: str
    truth: str
    objects: int
    right: bool


def caption_right(caption: str, objects: Sequence[Mapping[str, Any]], relation: str | None) -> bool:
    """The strict check: colours and shapes right and bound (:func:`shapes_caption_correct`), and for two
    objects the relation too (:func:`relation_correct`)."""
    if not shapes_caption_correct(caption, objects):
        return False
    return len(objects) != 2 or relation is None or relation_correct(caption, objects, relation)


def read_metadata(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metadata.jsonl`` that ``blipkit shapes`` wrote, each with its ``objects``."""
    if not path.is_file():
        raise DataError(f"{path.parent}: no metadata.jsonl; write the pictures with: blipkit shapes {path.parent}")
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, ValueError):
        rows = []
    if not rows or not all(isinstance(row, dict) and row.get("objects") and "file_name" in row for row in rows):
        raise DataError(f"{path}: not written by 'blipkit shapes' (rows need file_name and objects); write it with: "
                        f"blipkit shapes {path.parent}")
    return rows


def check_captions(rows: Sequence[Mapping[str, Any]], captions: Sequence[str]) -> list[CheckedCaption]:
    """Each caption checked (:func:`caption_right`) against its metadata row (``text``, ``objects``, ``relation``)."""
    if len(rows) != len(captions):
        raise DataError(f"check_captions: {len(captions)} captions for {len(rows)} pictures; pass one per picture")
    return [
        CheckedCaption(caption, str(row.get("text", "")), len(row["objects"]),
                       caption_right(caption, row["objects"], row.get("relation")))
        for row, caption in zip(rows, captions)
    ]


def score_line(checked: Sequence[CheckedCaption]) -> str:
    """One line: how many captions are right, in all and by number of shapes."""
    parts = []
    for count, label in ((1, "single-shape"), (2, "two-shape")):
        group = [c for c in checked if c.objects == count]
        if group:
            parts.append(f"{sum(c.right for c in group)} of {len(group)} {label}")
    right = sum(c.right for c in checked)
    groups = ", ".join(parts)
    return f"{right} of {len(checked)} captions right ({groups}; two shapes need colours, shapes and relation)"
