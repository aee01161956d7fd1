"""``ImageTextDataset``: a map-style dataset of image-text samples that skips and counts bad ones.

Every dataset format plugin builds one from a list of ``Record``s::

    factory(source: str, split: str = "train", **options) -> ImageTextDataset

Records are checked when the dataset is built (missing image file, empty text, empty question); the
format adds rows it could not parse as ``skipped={"malformed row": n}``. An image that turns out
unreadable only when loaded makes ``__getitem__`` return None (collators drop Nones) and is counted as
``"corrupt image"``. ``report()`` sums it all up in one line.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from blipkit.data.images import load_image
from blipkit.data.sample import Record, Sample
from blipkit.errors import DataError, UnknownNameError

__all__ = ["CORRUPT_IMAGE", "MALFORMED_ROW", "NOT_UTF8", "ImageTextDataset", "materialise_image", "open_dataset"]

logger = logging.getLogger(__name__)

MISSING_IMAGE = "missing image"
EMPTY_TEXT = "empty text"
EMPTY_QUESTION = "empty question"
CORRUPT_IMAGE = "corrupt image"
MALFORMED_ROW = "malformed row"
NOT_UTF8 = "row not UTF-8"


class ImageTextDataset(Dataset):
    """Samples of one split of one dataset; ``__getitem__`` returns a ``Sample`` or None (unreadable image).

    ``caption_scorer`` (optional): scores of the dataset's own that caption evaluation adds, from the
    prediction rows (``caption``, ``references`` and the sample's ``meta``), e.g. the shapes data's check
    that each caption names the drawn colours and shapes. Raises DataError when more than half of all rows
    are unusable, or when none is left.
    """

    def __init__(
        self,
        records: Sequence[Record],
        name: str,
        split: str = "train",
        skipped: Mapping[str, int] | None = None,
        caption_scorer: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    ) -> None:
        self.name = name
        self.split = split
        self.caption_scorer = caption_scorer
        self.skipped: Counter[str] = Counter({k: v for k, v in (skipped or {}).items() if v})
        self._lock = threading.Lock()
        self._unreadable: set[int] = set()
        file_ok: dict[Path, bool] = {}
        kept: list[Record] = []
        for record in records:
            reason = _problem(record, file_ok)
            if reason is None:
                kept.append(record)
            else:
                self.skipped[reason] += 1
        self.records: list[Record] = kept
        self.total = len(kept) + sum(self.skipped.values())
        self.tasks: set[str] = {r.task for r in kept}
        bad = sum(self.skipped.values())
        if not kept:
            detail = f" ({self._reasons()})" if bad else ""
            raise DataError(f"dataset '{name}' ({split}) has no usable samples{detail}; check its files and columns")
        if bad * 2 > self.total:
            raise DataError(
                f"dataset '{name}' ({split}): {bad} of {self.total} samples are unusable ({self._reasons()}); "
                "check the image paths and the annotation file"
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample | None:
        index = range(len(self.records))[index]
        record = self.records[index]
        if index in self._unreadable:
            return None
        try:
            image = materialise_image(record.image)
        except DataError as err:
            with self._lock:
                if index not in self._unreadable:
                    self._unreadable.add(index)
                    self.skipped[CORRUPT_IMAGE] += 1
            logger.warning("skipping sample %d of dataset '%s': %s", index, self.name, err)
            return None
        return record.to_sample(image=image)

    def __getstate__(self) -> dict[str, object]:
        # DataLoader workers started with "spawn" pickle the dataset; a lock cannot be pickled.
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def unreadable(self) -> frozenset[int]:
        """Indices of the samples whose image turned out unreadable when loaded (counted in ``skipped``)."""
        with self._lock:
            return frozenset(self._unreadable)

    def _reasons(self) -> str:
        return ", ".join(f"{count} {reason}" for reason, count in self.skipped.most_common())

    def report(self) -> str:
        """One line: how many samples were skipped and why, e.g. ``skipped 3 of 120 samples: 2 missing image, 1 empty text``."""
        with self._lock:
            bad = sum(self.skipped.values())
            line = f"skipped {bad} of {self.total} samples"
            return f"{line}: {self._reasons()}" if bad else line

    def __repr__(self) -> str:
        return f"ImageTextDataset(name={self.name!r}, split={self.split!r}, samples={len(self)}, tasks={sorted(self.tasks)})"


def _problem(record: Record, file_ok: dict[Path, bool]) -> str | None:
    """Why ``record`` cannot be used, or None; ``file_ok`` caches file checks for images shared by records."""
    if not isinstance(record.task, str) or not record.task:
        return MALFORMED_ROW
    if not isinstance(record.text, str) or not record.text.strip():
        return EMPTY_TEXT
    if record.task == "vqa" and (not isinstance(record.question, str) or not record.question.strip()):
        return EMPTY_QUESTION
    if isinstance(record.image, (str, Path)):
        path = Path(record.image)
        if path not in file_ok:
            file_ok[path] = path.is_file()
        if not file_ok[path]:
            return MISSING_IMAGE
    elif not (isinstance(record.image, Image.Image) or callable(record.image)):
        return MALFORMED_ROW
    return None


def materialise_image(source: object) -> Image.Image:
    """The PIL image behind an image source (raises DataError when it cannot be read)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, Path)):
        return load_image(source)
    image = source()  # type: ignore[operator]
    if not isinstance(image, Image.Image):
        raise DataError(f"image source {source!r} returned {type(image).__name__}, not a PIL image")
    return image


def open_dataset(name: str, split: str, options: dict[str, Any]) -> ImageTextDataset:
    """Build a dataset through the dataset registry (a format name, ``prefix:source`` or a path).

    A path that exists but that no format recognises (a damaged JSON file, a folder without metadata) is a
    DataError that says so and how to name its format.
    """
    from blipkit.plugin_manager import registries

    try:
        resolved = registries().datasets.resolve(name)
    except UnknownNameError:
        if not Path(name).expanduser().exists():
            raise
        raise DataError(
            f"{name}: no dataset format recognises it (a damaged or empty file, or a folder without metadata?); "
            f"name its format to see what is wrong, e.g. coco:{name} (blipkit datasets lists the formats)"
        ) from None
    return resolved.create(split=split, **options)
