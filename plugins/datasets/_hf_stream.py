"""``hf:`` with ``streaming: true``: a datasets-library dataset read shard by shard instead of loaded.

A ``save_to_disk`` folder is read from its Arrow files, memory-mapped, a row found again by its number,
so a resumed run seeks straight back. Anything else (a hub id, parquet or json files) goes through the
library's own streaming (``load_dataset(..., streaming=True)``, an IterableDataset) split into its shards;
a resumed run re-reads a shard up to its position there, as the library cannot seek.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from blipkit.data.images import load_image, load_image_bytes
from blipkit.data.sample import Record
from blipkit.data.stream import StreamingDataset
from blipkit.errors import DataError
from blipkit.plugins.datasets._common import LOCAL_BUILDERS

ROW_STRIDE = 1024
"""A row gives at most this many records (several captions); a record's place is row x stride + its number."""

RowRecords = Callable[[dict[str, Any], Any, str], list[Record]]


def _image(value: Any, label: str) -> Any:
    """The PIL image behind an undecoded ``datasets.Image`` cell (bytes or a path)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return load_image_bytes(value["bytes"], label)
        value = value.get("path")
    if isinstance(value, str) and value:
        return load_image(value)
    raise DataError(f"{label}: no image in the row")


def _usable(record: Record) -> Record | None:
    if not record.text.strip() or (record.task == "vqa" and not (record.question or "").strip()):
        return None
    return record


class _RowShards:
    """Records of tables given shard by shard; ``open(shard)`` gives an iterable of row dicts."""

    def __init__(self, shards: list[str], open_rows: Callable[[str], Any], image_column: str, to_records: RowRecords,
                 label: str, seekable: bool) -> None:
        self.shards = shards
        self.open_rows = open_rows
        self.image_column = image_column
        self.to_records = to_records
        self.label = label
        self.seekable = seekable

    def _rows(self, shard: str, first: int) -> Iterator[tuple[int, dict[str, Any]]]:
        rows = self.open_rows(shard)
        if self.seekable:
            for number in range(first, len(rows)):
                yield number, rows[number]
        else:
            yield from islice(enumerate(rows), first, None)

    def _records(self, shard: str, number: int, row: dict[str, Any]) -> list[tuple[int, Record | None]]:
        label = f"{self.label} {Path(shard).name} row {number}"
        image = functools.partial(_image, row.pop(self.image_column, None), label)
        made = self.to_records(row, image, str(row.get("image_id") or f"{Path(shard).name}/{number}"))[:ROW_STRIDE]
        return [(number * ROW_STRIDE + k, _usable(record)) for k, record in enumerate(made)]

    def records(self, shard: str, after: int | None) -> Iterator[tuple[int, Record | None]]:
        """The shard's records after place ``after`` (None: all)."""
        first = 0 if after is None else after // ROW_STRIDE
        for number, row in self._rows(shard, first):
            for place, record in self._records(shard, number, dict(row)):
                if after is None or place > after:
                    yield place, record

    def record_at(self, shard: str, place: int) -> Record:
        """The record at ``place``."""
        number, k = divmod(place, ROW_STRIDE)
        _, row = next(self._rows(shard, number))
        record = self._records(shard, number, dict(row))[k][1]
        if record is None:
            raise DataError(f"{self.label}: row {number} of {shard} is no longer usable; the data changed since it was read")
        return record


def _arrow_files(folder: Path, split: str) -> list[str]:
    """The Arrow files of a ``save_to_disk`` folder (of the split, for a DatasetDict)."""
    import json

    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise DataError(f"hf:{folder}: no split '{split}'; it has: {', '.join(splits)}")
        folder = folder / split
    state = json.loads((folder / "state.json").read_text())
    return [str(folder / entry["filename"]) for entry in state.get("_data_files", [])]


def streaming_hf(source: str, split: str, image_column: str, config: str | None, to_records: RowRecords) -> StreamingDataset:
    """A streaming ``hf:`` dataset; ``to_records`` turns a row (its image a callable) into records."""
    import datasets

    folder = Path(source).expanduser()
    label = f"hf:{source}"
    if folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
        def open_arrow(shard: str) -> Any:
            table = datasets.Dataset.from_file(shard)
            if isinstance(table.features.get(image_column), datasets.Image):
                table = table.cast_column(image_column, datasets.Image(decode=False))
            return table

        source_shards = _RowShards(_arrow_files(folder, split), functools.lru_cache(maxsize=2)(open_arrow), image_column,
                                   to_records, label, seekable=True)
        return StreamingDataset(source_shards, name=label, split=split, tasks={"caption", "vqa"})
    try:
        if folder.is_file():
            builder = LOCAL_BUILDERS.get(folder.suffix.lower())
            if builder is None:
                raise DataError(f"{label}: cannot read {folder.suffix} files; use parquet, csv, json(l) or arrow")
            stream = datasets.load_dataset(builder, data_files={split: str(folder)}, split=split, streaming=True)
        else:
            stream = datasets.load_dataset(str(folder) if folder.exists() else source, config, split=split, streaming=True)
    except DataError:
        raise
    except Exception as err:  # the datasets library raises many types for "not found" and "offline"
        raise DataError(
            f"{label}: cannot stream it here ({type(err).__name__}); where the hub is reachable run "
            "datasets.load_dataset(...).save_to_disk(DIR), then pass hf:DIR"
        ) from None
    if image_column in (stream.features or {}) and isinstance(stream.features[image_column], datasets.Image):
        stream = stream.cast_column(image_column, datasets.Image(decode=False))
    shards = [str(index) for index in range(stream.num_shards)]

    def open_shard(shard: str) -> Any:
        return stream.shard(num_shards=stream.num_shards, index=int(shard), contiguous=True)

    return StreamingDataset(_RowShards(shards, open_shard, image_column, to_records, label, seekable=False),
                            name=label, split=split, tasks={"caption", "vqa"})
