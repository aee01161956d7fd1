"""Frozen-encoder features cached on disk as Arrow (fp16), keyed by the encoder's cache_key and image content.

Layout under ``$BLIPKIT_CACHE/features/<hash of cache_key>/``: ``meta.json`` (the full cache_key and token
shape), Arrow datasets ``shard-*`` (columns ``key``, ``tokens``) and ``files.json`` (file path, size and
mtime -> content hash, so unchanged files are not re-read to find their key). A fill writes a shard every
``shard_size`` images (fewer if they exceed ``shard_bytes``), named ``shard-r<rank>-<random>`` (older fills
wrote one ``shard-<n>-<random>`` per fill); each is saved as ``.shard-*.<host>-<pid>.tmp`` and renamed when complete, so only whole shards are
ever read, and a later fill deletes the staging directories that dead processes on its host left behind.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from blipkit.data.dataset import CORRUPT_IMAGE, ImageTextDataset, materialise_image
from blipkit.data.sample import Record, Sample
from blipkit.distributed import Ranks
from blipkit.errors import DataError
from blipkit.io import atomic_write_json, cache_dir, read_json
from blipkit.locks import HOST, process_alive

__all__ = ["CachedFeatureDataset", "FeatureCache", "cache_size", "clear_cache"]

_STAGING = re.compile(r"\.shard-[^.]+\.(?P<host>.+)-(?P<pid>\d+)\.tmp")


def _digest(*parts: bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part)
    return hasher.hexdigest()[:32]


def image_digest(image: Image.Image) -> str:
    """A content hash of decoded pixels (mode, size and bytes)."""
    return _digest(image.mode.encode(), repr(image.size).encode(), image.tobytes())


def features_root() -> Path:
    """Where every encoder's feature cache lives."""
    return cache_dir() / "features"


def cache_size(path: Path | None = None) -> int:
    """Bytes used under ``path`` (default: the whole feature cache)."""
    root = path or features_root()
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.exists() else 0


def clear_cache() -> int:
    """Delete every cached feature; returns the bytes freed."""
    size = cache_size()
    shutil.rmtree(features_root(), ignore_errors=True)
    return size


def _share(count: int, ranks: Ranks) -> range:
    """The indices of this process's part of ``count`` items: rank r of w takes the r-th of w near-equal runs."""
    return range(count * ranks.rank // ranks.world, count * (ranks.rank + 1) // ranks.world)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value /= 1024
    else:
        unit = "TiB"
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"


class FeatureCache:
    """Encoder tokens for images, stored once and read back as float32 tensors."""

    def __init__(self, cache_key: str, root: Path | None = None) -> None:
        self.cache_key = cache_key
        self.path = (root or features_root()) / _digest(cache_key.encode())
        self.path.mkdir(parents=True, exist_ok=True)
        meta_file = self.path / "meta.json"
        self.shape: list[int] | None = None
        if meta_file.exists():
            meta = read_json(meta_file)
            if meta.get("cache_key") != cache_key:
                raise DataError(f"feature cache {self.path} belongs to another encoder; clear it with: blipkit cache --clear")
            self.shape = meta.get("shape")
        self._stored_shape = self.shape
        files_file = self.path / "files.json"
        self._files: dict[str, str] = read_json(files_file) if files_file.exists() else {}
        self._shards: list[Any] = []
        self._loaded: set[str] = set()
        self._index: dict[str, tuple[int, int]] = {}
        self._load_shards(sorted(p.name for p in self.path.glob("shard-*") if p.is_dir()))

    def _load_shards(self, names: Sequence[str]) -> None:
        from datasets import load_from_disk

        for name in names:
            if name in self._loaded:
                continue
            if not (self.path / name).is_dir():
                raise DataError(
                    f"feature cache shard {self.path / name}, written by another process of this run, is not visible here; "
                    "put BLIPKIT_CACHE on a file system that every process shares"
                )
            shard = load_from_disk(str(self.path / name))
            number = len(self._shards)
            for row, key in enumerate(shard["key"]):
                self._index[key] = (number, row)
            if self.shape is None:
                self.shape = list(shard.features["tokens"].shape)
            self._shards.append(shard.with_format("torch", columns=["tokens"]))
            self._loaded.add(name)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def key_of(self, record: Record) -> str:
        """The content key of a record's image (file bytes for paths, decoded pixels otherwise)."""
        if isinstance(record.image, (str, Path)):
            path = Path(record.image)
            stat = path.stat()
            file_id = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
            if file_id not in self._files:
                self._files[file_id] = _digest(path.read_bytes())
            return self._files[file_id]
        return image_digest(materialise_image(record.image))

    def estimate_bytes(self, n_images: int) -> int | None:
        """Disk space that ``n_images`` more images take in this cache (their fp16 tokens); None while the
        token shape is unknown (no meta.json and nothing encoded yet)."""
        return None if self.shape is None else n_images * 2 * math.prod(self.shape)

    def fill(
        self,
        records: Sequence[Record],
        encode: Callable[[list[Image.Image]], torch.Tensor],
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
        *,
        ranks: Ranks | None = None,
        shard_size: int = 1024,
        shard_bytes: int = 512 * 2**20,
        on_plan: Callable[[int, int], None] | None = None,
    ) -> list[str | None]:
        """Encode every record's image not yet cached; returns each record's key in record order (None: unreadable image).

        Tokens go to disk a shard at a time (``shard_size`` images or ``shard_bytes`` of tokens, whichever is
        fewer), so memory holds about one shard and a killed fill, run again, encodes only what is missing.

        ``ranks`` are the processes that fill together (default: this process alone, with no collectives). Each
        of them must call ``fill`` with the same records: each hashes and encodes its share of them, and each
        returns the same keys and can then read every image's tokens. Only the main process writes meta.json
        and files.json. ``progress(n)`` is called as this process finishes ``n`` images. ``on_plan(images,
        bytes)`` is called once on every process before the bulk of the encoding, with the number of images
        the whole fill encodes and the disk space they need (0 when none is readable).

        Raises DataError, before writing any tokens, when that space exceeds the free space at the cache.
        """
        ranks = ranks or Ranks()
        self._remove_dead_staging()
        self._load_shards(sorted(p.name for p in self.path.glob("shard-*") if p.is_dir()))
        keys: list[str | None] = []
        missing: set[str] = set()
        for share_keys, share_missing, share_files in ranks.gather_objects(self._hash_share(records, ranks)):
            keys += share_keys
            missing.update(share_missing)
            self._files.update(share_files)
        if ranks.is_main:
            atomic_write_json(self.path / "files.json", self._files)
        todo: dict[str, Record] = {}
        for record, key in zip(records, keys):
            if key in missing and key not in todo:
                todo[key] = record
        if not todo:
            return keys
        items = list(todo.items())
        mine = [items[i] for i in _share(len(items), ranks)]
        unreadable, written = self._encode_share(
            mine, len(items), encode, batch_size, progress, ranks, shard_size, shard_bytes, on_plan
        )
        unreadable_everywhere: set[str] = set()
        # Each process renames its last shard into place before it contributes here, so past this gather
        # every shard of the fill is complete.
        for share_unreadable, share_written in ranks.gather_objects((unreadable, written)):
            unreadable_everywhere |= share_unreadable
            self._load_shards(share_written)
        return [None if key in unreadable_everywhere else key for key in keys]

    def _hash_share(self, records: Sequence[Record], ranks: Ranks) -> tuple[list[str | None], list[str], dict[str, str]]:
        """This process's share of the records: their keys, those not cached, and the new files.json entries."""
        known = len(self._files)
        keys: list[str | None] = []
        missing: list[str] = []
        for index in _share(len(records), ranks):
            try:
                key = self.key_of(records[index])
            except (OSError, DataError):
                keys.append(None)
                continue
            keys.append(key)
            if key not in self._index:
                missing.append(key)
        # key_of only ever adds entries, and a dict keeps them in insertion order.
        return keys, missing, dict(itertools.islice(self._files.items(), known, None))

    def _encode_share(
        self,
        items: list[tuple[str, Record]],
        total: int,
        encode: Callable[[list[Image.Image]], torch.Tensor],
        batch_size: int,
        progress: Callable[[int], None] | None,
        ranks: Ranks,
        shard_size: int,
        shard_bytes: int,
        on_plan: Callable[[int, int], None] | None,
    ) -> tuple[set[str], list[str]]:
        """Encode and store this process's ``items`` once the ``total`` of the fill fits on disk; returns the
        keys of unreadable images and the names of the shards written."""
        unreadable: set[str] = set()
        batches = self._encoded_batches(items, encode, batch_size, progress, unreadable)
        first: list[tuple[list[str], np.ndarray]] = []
        while self.shape is None and (batch := next(batches, None)) is not None:
            first.append(batch)
        self.shape = next((shape for shape in ranks.gather_objects(self.shape) if shape is not None), None)
        self._check_space(total, ranks, on_plan)
        if ranks.is_main and self.shape is not None and self.shape != self._stored_shape:
            atomic_write_json(self.path / "meta.json", {"cache_key": self.cache_key, "shape": self.shape})
            self._stored_shape = self.shape
        writer = _ShardWriter(self.path, ranks.rank, shard_size, shard_bytes)
        for keys, tokens in itertools.chain(first, batches):
            writer.add(keys, tokens)
        return unreadable, writer.close()

    def _encoded_batches(
        self,
        items: list[tuple[str, Record]],
        encode: Callable[[list[Image.Image]], torch.Tensor],
        batch_size: int,
        progress: Callable[[int], None] | None,
        unreadable: set[str],
    ) -> Iterator[tuple[list[str], np.ndarray]]:
        """(keys, fp16 tokens) for each batch of ``items`` with a readable image; the others go to ``unreadable``."""
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            images, keys = [], []
            for key, record in chunk:
                try:
                    images.append(materialise_image(record.image))
                    keys.append(key)
                except DataError:
                    unreadable.add(key)
            tokens = encode(images).detach().to("cpu", torch.float16).numpy() if images else None
            if progress is not None:
                progress(len(chunk))
            if tokens is None:
                continue
            if self.shape is not None and list(tokens.shape[1:]) != self.shape:
                raise DataError(
                    f"the encoder gave tokens of shape {list(tokens.shape[1:])} but {self.path} holds {self.shape}; "
                    "an encoder's cache_key must change whenever its features do"
                )
            self.shape = list(tokens.shape[1:])
            yield keys, tokens

    def _check_space(self, n_images: int, ranks: Ranks, on_plan: Callable[[int, int], None] | None) -> None:
        """Refuse, on every process alike, a fill of ``n_images`` that the main process's disk cannot hold."""
        needed = self.estimate_bytes(n_images) or 0
        refusal = None
        if ranks.is_main:
            free = shutil.disk_usage(self.path).free
            if needed > free:
                refusal = (
                    f"the feature cache needs {_human(needed)} for {n_images} images but only {_human(free)} is free at {self.path}; "
                    "free some space, move the cache with BLIPKIT_CACHE=/a/bigger/disk, or turn it off with data.feature_cache=false"
                )
        refusal = ranks.broadcast_object(refusal)
        if refusal:
            raise DataError(refusal)
        if on_plan is not None:
            on_plan(n_images, needed)

    def _remove_dead_staging(self) -> None:
        """Delete the half-written shards of killed fills; only this host can tell whether their writer is alive."""
        for staging in self.path.glob(".shard-*.tmp"):
            match = _STAGING.fullmatch(staging.name)
            if match and match["host"] == HOST and not process_alive(int(match["pid"])):
                shutil.rmtree(staging, ignore_errors=True)

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        """Tokens for ``keys`` as one float32 tensor [B, N, D]."""
        rows = [self._shards[shard][row]["tokens"] for shard, row in (self._index[k] for k in keys)]
        return torch.stack(rows).float()


class _ShardWriter:
    """Saves encoded tokens as Arrow shards of at most ``shard_size`` images and ``shard_bytes`` of tokens."""

    def __init__(self, directory: Path, rank: int, shard_size: int, shard_bytes: int) -> None:
        self.directory = directory
        self.rank = rank
        self.shard_size = shard_size
        self.shard_bytes = shard_bytes
        self.keys: list[str] = []
        self.tokens: list[np.ndarray] = []
        self.written: list[str] = []

    def add(self, keys: list[str], tokens: np.ndarray) -> None:
        """Queue one batch; every full shard goes to disk."""
        self.keys += keys
        self.tokens += list(tokens)
        rows = max(1, min(self.shard_size, self.shard_bytes // tokens[0].nbytes))
        while len(self.keys) >= rows:
            self._save(rows)

    def close(self) -> list[str]:
        """Save what is queued; returns the names of the shards written."""
        if self.keys:
            self._save(len(self.keys))
        return self.written

    def _save(self, rows: int) -> None:
        from datasets import Array2D, Dataset as ArrowDataset, Features, Value
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
        features = Features({"key": Value("string"), "tokens": Array2D(shape=self.tokens[0].shape, dtype="float16")})
        shard = ArrowDataset.from_dict({"key": self.keys[:rows], "tokens": self.tokens[:rows]}, features=features)
        del self.keys[:rows], self.tokens[:rows]
        name = f"shard-r{self.rank:03d}-{uuid.uuid4().hex[:12]}"
        staging = self.directory / f".{name}.{HOST}-{os.getpid()}.tmp"
        shard.save_to_disk(str(staging))
        staging.rename(self.directory / name)
        self.written.append(name)


class CachedFeatureDataset(Dataset):
    """A dataset view whose samples carry cached encoder tokens instead of images."""

    def __init__(self, dataset: ImageTextDataset, cache: FeatureCache, keys: list[str | None]) -> None:
        self.dataset = dataset
        self.cache = cache
        self.keys = keys
        self.records = dataset.records
        self.name = dataset.name
        self.split = dataset.split
        self.caption_scorer = getattr(dataset, "caption_scorer", None)
        self.tasks = dataset.tasks
        self.skipped = dataset.skipped
        if None in keys:
            self.skipped[CORRUPT_IMAGE] += keys.count(None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample | None:
        key = self.keys[index]
        if key is None or key not in self.cache:
            return None
        return self.records[index].to_sample(image_tokens=self.cache.get([key])[0])
