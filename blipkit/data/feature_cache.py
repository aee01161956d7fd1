"""Frozen-encoder features cached on disk as Arrow (fp16), keyed by the encoder's cache_key and image content.

Layout under ``$BLIPKIT_CACHE/features/<hash of cache_key>/``: ``meta.json`` (the full cache_key and token
shape), one Arrow dataset per fill (``shard-*``: columns ``key``, ``tokens``), and ``files.json`` (file path,
size and mtime -> content hash, so unchanged files are not re-read to find their key).
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from blipkit.data.dataset import CORRUPT_IMAGE, ImageTextDataset, materialise_image
from blipkit.data.sample import Record, Sample
from blipkit.errors import DataError
from blipkit.io import atomic_write_json, cache_dir, read_json

__all__ = ["CachedFeatureDataset", "FeatureCache", "cache_size", "clear_cache"]


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
        files_file = self.path / "files.json"
        self._files: dict[str, str] = read_json(files_file) if files_file.exists() else {}
        self._shards: list[Any] = []
        self._index: dict[str, tuple[int, int]] = {}
        for shard_dir in sorted(self.path.glob("shard-*")):
            self._add_shard(shard_dir)

    def _add_shard(self, shard_dir: Path) -> None:
        from datasets import load_from_disk

        shard = load_from_disk(str(shard_dir))
        number = len(self._shards)
        for row, key in enumerate(shard["key"]):
            self._index[key] = (number, row)
        self._shards.append(shard.with_format("torch", columns=["tokens"]))

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

    def fill(
        self,
        records: Sequence[Record],
        encode: Callable[[list[Image.Image]], torch.Tensor],
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
    ) -> list[str | None]:
        """Encode every record's image not yet cached; returns each record's key (None: unreadable image)."""
        keys: list[str | None] = []
        todo: dict[str, Record] = {}
        for record in records:
            try:
                key = self.key_of(record)
            except (OSError, DataError):
                keys.append(None)
                continue
            keys.append(key)
            if key not in self._index and key not in todo:
                todo[key] = record
        unreadable = self._encode_missing(todo, encode, batch_size, progress) if todo else set()
        atomic_write_json(self.path / "files.json", self._files)
        return [None if key in unreadable else key for key in keys]

    def _encode_missing(
        self,
        todo: dict[str, Record],
        encode: Callable[[list[Image.Image]], torch.Tensor],
        batch_size: int,
        progress: Callable[[int], None] | None,
    ) -> set[str]:
        import numpy as np
        from datasets import Array2D, Dataset as ArrowDataset, Features, Value
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()

        items = list(todo.items())
        done_keys: list[str] = []
        done_tokens: list[np.ndarray] = []
        unreadable: set[str] = set()
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            images, chunk_keys = [], []
            for key, record in chunk:
                try:
                    images.append(materialise_image(record.image))
                    chunk_keys.append(key)
                except DataError:
                    unreadable.add(key)
            if images:
                tokens = encode(images).detach().to("cpu", torch.float16)
                self.shape = list(tokens.shape[1:])
                done_keys += chunk_keys
                done_tokens += list(tokens.numpy())
            if progress is not None:
                progress(len(chunk))
        if not done_keys:
            return unreadable
        features = Features({"key": Value("string"), "tokens": Array2D(shape=tuple(self.shape), dtype="float16")})
        shard = ArrowDataset.from_dict({"key": done_keys, "tokens": done_tokens}, features=features)
        name = f"shard-{len(self._shards):05d}-{uuid.uuid4().hex[:8]}"
        staging = self.path / f".{name}.tmp"
        shard.save_to_disk(str(staging))
        staging.rename(self.path / name)
        atomic_write_json(self.path / "meta.json", {"cache_key": self.cache_key, "shape": self.shape})
        self._add_shard(self.path / name)
        return unreadable

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        """Tokens for ``keys`` as one float32 tensor [B, N, D]."""
        rows = [self._shards[shard][row]["tokens"] for shard, row in (self._index[k] for k in keys)]
        return torch.stack(rows).float()


class CachedFeatureDataset(Dataset):
    """A dataset view whose samples carry cached encoder tokens instead of images."""

    def __init__(self, dataset: ImageTextDataset, cache: FeatureCache, keys: list[str | None]) -> None:
        self.dataset = dataset
        self.cache = cache
        self.keys = keys
        self.records = dataset.records
        self.name = dataset.name
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
