"""``webdataset:`` streams tar shards in img2dataset's layout: each sample is the run of members that share a
key (``000123.jpg`` with ``000123.txt`` and/or ``000123.json``).

Shard patterns (``data/{000000..000999}.tar``) are expanded by the webdataset library. The shards are read
with Python's tarfile at byte offsets, so that a resumed run seeks straight to where it stopped (the
webdataset library's own readers cannot resume inside a shard). A sample is a caption (``txt``, or
``caption``/``text`` in its json) or a question (``question`` with ``answers`` or ``answer`` in its json).
"""

from __future__ import annotations

import functools
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from blipkit import hookimpl
from blipkit.data.images import load_image_bytes
from blipkit.data.sample import Record, most_frequent_answer
from blipkit.data.stream import StreamingDataset
from blipkit.errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _split_name(name: str) -> tuple[str, str]:
    """A member's sample key and extension: ``dir/000123.seg.png`` -> (``dir/000123``, ``seg.png``)."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


class TarShards:
    """The samples of tar shards, each found again by the byte offset of its first member."""

    def __init__(self, shards: list[str]) -> None:
        self.shards = shards

    def _samples(self, shard: str, start: int) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        """(offset, key, {extension: bytes}) of each sample from byte ``start`` on."""
        with open(shard, "rb") as handle:
            handle.seek(start)
            try:
                archive = tarfile.open(fileobj=handle, mode="r|")
                current: tuple[int, str, dict[str, bytes]] | None = None
                for member in archive:
                    if not member.isfile():
                        continue
                    key, extension = _split_name(member.name)
                    if current is None or current[1] != key:
                        if current is not None:
                            yield current
                        current = (start + member.offset, key, {})
                    current[2][extension] = archive.extractfile(member).read()
                if current is not None:
                    yield current
            except (tarfile.TarError, EOFError) as err:
                raise DataError(f"{shard}: not a readable tar shard ({err}); check or re-create it") from None

    def records(self, shard: str, after: int | None) -> Iterator[tuple[int, Record | None]]:
        """The shard's records after byte offset ``after`` (None: all), with their offsets."""
        for offset, key, parts in self._samples(shard, 0 if after is None else after):
            if offset == after:
                continue
            yield offset, _record(shard, key, parts)

    def record_at(self, shard: str, place: int) -> Record:
        """The record whose first member starts at byte ``place``."""
        offset, key, parts = next(self._samples(shard, place))
        record = _record(shard, key, parts)
        if record is None:
            raise DataError(f"{shard}: the sample at byte {offset} is malformed; the shard changed since it was read")
        return record


def _record(shard: str, key: str, parts: dict[str, bytes]) -> Record | None:
    """A caption or question record from a sample's members, or None when it lacks an image or a text."""
    image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
    if image is None:
        return None
    try:
        meta: dict[str, Any] = json.loads(parts["json"]) if "json" in parts else {}
        text = parts["txt"].decode("utf-8").strip() if "txt" in parts else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    source = functools.partial(load_image_bytes, image, f"{shard}:{key}")
    image_id = f"{Path(shard).name}/{key}"
    if isinstance(meta.get("question"), str):
        answers = meta.get("answers") or ([meta["answer"]] if isinstance(meta.get("answer"), str) else [])
        answers = [a for a in answers if isinstance(a, str) and a.strip()]
        if not answers:
            return None
        return Record(source, most_frequent_answer(answers), meta["question"], answers, image_id, "vqa", meta)
    text = text or next((meta[k] for k in ("caption", "text") if isinstance(meta.get(k), str)), None)
    if not text or not text.strip():
        return None
    return Record(source, text.strip(), image_id=image_id, meta=meta)


def webdataset(source: str, split: str = "train") -> StreamingDataset:
    """Stream the tar shards ``source`` names: a brace pattern, a comma-separated list, or one file."""
    try:
        from webdataset.shardlists import expand_urls
    except ImportError:
        raise DataError("webdataset: the webdataset package is not installed; pip install 'blipkit[data]'") from None

    shards = [url for part in source.split(",") for url in expand_urls(part.strip())]
    missing = [shard for shard in shards if not Path(shard).is_file()]
    if missing:
        raise DataError(
            f"webdataset: {len(missing)} of {len(shards)} shards do not exist (first: {missing[0]}); check the pattern"
        )
    return StreamingDataset(TarShards(shards), name="webdataset", split=split, tasks={"caption", "vqa"})


@hookimpl
def register_datasets(register: Any) -> None:
    """Register ``webdataset:`` (also claims bare ``.tar`` paths and patterns)."""
    register(
        "webdataset:",
        webdataset,
        description="tar shards as img2dataset writes them (data/{000000..000099}.tar): image + txt/json; streamed",
        kind="streaming",
        matches=lambda value: value.endswith(".tar") or ".tar," in value,
    )
