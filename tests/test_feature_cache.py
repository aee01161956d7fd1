"""The feature cache fills a shard at a time, resumes after a kill, is shared by the processes of a run,
and refuses a fill that the disk cannot hold."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from blipkit.data import feature_cache
from blipkit.data.feature_cache import FeatureCache
from blipkit.data.sample import Record
from blipkit.errors import DataError
from blipkit.locks import HOST

CACHE_KEY = "tiny-linear-encoder"
# Integer weights and integer pixels make every token exact, whatever the batch an image is encoded in.
WEIGHTS = torch.randint(-3, 4, (48, 6), generator=torch.Generator().manual_seed(0))
TOKEN_BYTES = 4 * 6 * 2


def encode(images: list[Image.Image]) -> torch.Tensor:
    """A fixed random linear map of each 8x8 image's pixels to 4 tokens of 6 features."""
    pixels = np.stack([np.asarray(image.convert("RGB"), dtype=np.int64) for image in images])
    return (torch.from_numpy(pixels).reshape(len(images), 4, 48) @ WEIGHTS).float() / 1000


def write_images(directory: Path, count: int) -> None:
    """``count`` random 8x8 PNGs, a copy of the first (same content, another name) and a corrupt file."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(directory / f"{index:03d}.png")
    shutil.copy(directory / "000.png", directory / "000-copy.png")
    (directory / f"{count // 2:03d}-corrupt.png").write_bytes(b"not a png")


def records_in(directory: Path) -> list[Record]:
    """A record per file in ``directory``, in name order, with one more for a file that does not exist."""
    records = [Record(image=str(path), text="") for path in sorted(directory.iterdir())]
    records.insert(3, Record(image=str(directory / "missing.png"), text=""))
    return records


def shard_dirs(cache: FeatureCache) -> list[Path]:
    return sorted(cache.path.glob("shard-*"))


def staging_dirs(cache: FeatureCache) -> list[Path]:
    return sorted(cache.path.glob(".shard-*"))


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    write_images(tmp_path / "images", 20)
    return tmp_path / "images"


@pytest.fixture()
def reference(tmp_path: Path, images: Path) -> tuple[FeatureCache, list[str | None]]:
    """An uninterrupted one-process fill in one shard, and its keys."""
    cache = FeatureCache(CACHE_KEY, root=tmp_path / "reference")
    return cache, cache.fill(records_in(images), encode, shard_size=1000)


def test_reference_fill_keys_every_readable_image(images: Path, reference: tuple[FeatureCache, list[str | None]]) -> None:
    cache, keys = reference
    names = [Path(record.image).name for record in records_in(images)]
    assert [name for name, key in zip(names, keys) if key is None] == ["missing.png", "010-corrupt.png"]
    assert keys[names.index("000-copy.png")] == keys[names.index("000.png")]
    assert len(cache) == 20 and len(shard_dirs(cache)) == 1
    readable = [key for key in keys if key is not None]
    pixels = [Image.open(images / name) for name, key in zip(names, keys) if key is not None]
    assert torch.equal(cache.get(readable), encode(pixels).half().float())


def test_shards_are_written_as_the_fill_goes(
    tmp_path: Path, images: Path, reference: tuple[FeatureCache, list[str | None]]
) -> None:
    whole, whole_keys = reference
    cache = FeatureCache(CACHE_KEY, root=tmp_path / "sharded")
    before_batch: list[tuple[int, int]] = []
    plans: list[tuple[int, int]] = []

    def watched(batch: list[Image.Image]) -> torch.Tensor:
        done = sum(size for size, _ in before_batch)
        before_batch.append((len(batch), len(shard_dirs(cache))))
        assert before_batch[-1][1] == done // 4, f"{done} images encoded but {before_batch[-1][1]} shards on disk"
        return encode(batch)

    keys = cache.fill(records_in(images), watched, 3, shard_size=4, on_plan=lambda *plan: plans.append(plan))
    assert keys == whole_keys
    # 21 images to encode in batches of 3, one of them corrupt; every full shard of 4 went to disk before the
    # next batch was encoded, so no more than a shard and a batch were ever held.
    assert [size for size, _ in before_batch] == [3, 3, 3, 2, 3, 3, 3]
    assert len(shard_dirs(cache)) == 5 and not staging_dirs(cache)
    assert plans == [(21, 21 * TOKEN_BYTES)]  # the corrupt file counts until it fails to decode
    assert cache.estimate_bytes(10) == 10 * TOKEN_BYTES

    reopened = FeatureCache(CACHE_KEY, root=tmp_path / "sharded")
    readable = [key for key in keys if key is not None]
    assert len(reopened) == len(whole) and torch.equal(reopened.get(readable), whole.get(readable))
    assert json.loads((reopened.path / "meta.json").read_text())["shape"] == [4, 6]


def test_shards_are_bounded_by_bytes_too(tmp_path: Path, images: Path) -> None:
    cache = FeatureCache(CACHE_KEY, root=tmp_path / "small")
    cache.fill(records_in(images), encode, 8, shard_size=1000, shard_bytes=2 * TOKEN_BYTES + 1)
    from datasets import load_from_disk

    assert [len(load_from_disk(str(shard))) for shard in shard_dirs(cache)] == [2] * 10


def test_a_cache_of_earlier_fills_is_read_and_extended(
    tmp_path: Path, images: Path, reference: tuple[FeatureCache, list[str | None]]
) -> None:
    whole, keys = reference
    from datasets import Array2D, Dataset, Features, Value

    old = FeatureCache(CACHE_KEY, root=tmp_path / "old")
    readable = [key for key in keys if key is not None]
    features = Features({"key": Value("string"), "tokens": Array2D(shape=(4, 6), dtype="float16")})
    unique = list(dict.fromkeys(readable))
    first = {"key": unique[:5], "tokens": list(whole.get(unique[:5]).half().numpy())}
    Dataset.from_dict(first, features=features).save_to_disk(str(old.path / "shard-00000-0a1b2c3d"))
    (old.path / "meta.json").write_text(json.dumps({"cache_key": CACHE_KEY, "shape": [4, 6]}))

    encoded: list[int] = []
    cache = FeatureCache(CACHE_KEY, root=tmp_path / "old")
    assert len(cache) == 5
    assert cache.fill(records_in(images), lambda batch: encoded.append(len(batch)) or encode(batch)) == keys
    assert sum(encoded) == 15 and torch.equal(cache.get(readable), whole.get(readable))


KILLED_FILL = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_feature_cache import CACHE_KEY, encode, records_in
from blipkit.data.feature_cache import FeatureCache

def slow(batch):
    time.sleep(0.2)
    return encode(batch)

FeatureCache(CACHE_KEY, root=Path({root!r})).fill(records_in(Path({images!r})), slow, 2, shard_size=4)
"""


def test_a_killed_fill_resumes_where_it_stopped(
    tmp_path: Path, images: Path, reference: tuple[FeatureCache, list[str | None]]
) -> None:
    whole, whole_keys = reference
    root = tmp_path / "killed"
    script = KILLED_FILL.format(tests=str(Path(__file__).parent), root=str(root), images=str(images))
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    cache_path = FeatureCache(CACHE_KEY, root=root).path
    deadline = time.monotonic() + 60
    while not any(cache_path.glob("shard-*")):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the fill wrote no shard within a minute"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()

    # A complete shard of wrong tokens, left in staging by the dead process: it must never be read.
    from datasets import Array2D, Dataset, Features, Value

    readable = [key for key in whole_keys if key is not None]
    features = Features({"key": Value("string"), "tokens": Array2D(shape=(4, 6), dtype="float16")})
    zeros = Dataset.from_dict({"key": readable, "tokens": [np.zeros((4, 6), np.float16)] * len(readable)}, features=features)
    zeros.save_to_disk(str(cache_path / f".shard-r000-0123456789ab.{HOST}-{process.pid}.tmp"))

    cache = FeatureCache(CACHE_KEY, root=root)
    cached = len(cache)
    assert 4 <= cached < 20
    encoded: list[int] = []
    keys = cache.fill(records_in(images), lambda batch: encoded.append(len(batch)) or encode(batch), 2, shard_size=4)
    assert keys == whole_keys
    assert sum(encoded) == 20 - cached
    assert torch.equal(cache.get(readable), whole.get(readable))
    assert not staging_dirs(cache)


def _fill_on_rank(rank: int, directory: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from blipkit.distributed import current

    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=2)
    torch.set_num_threads(1)
    encoded: list[int] = []
    cache = FeatureCache(CACHE_KEY, root=Path(directory) / "shared")
    records = records_in(Path(directory) / "images")
    keys = cache.fill(records, lambda batch: encoded.append(len(batch)) or encode(batch), 2, ranks=current(), shard_size=3)
    save_file({"tokens": cache.get([key for key in keys if key is not None])}, f"{directory}/rank{rank}.safetensors")
    result = {"keys": keys, "encoded": sum(encoded), "cached": len(cache)}
    (Path(directory) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_fill_one_cache(tmp_path: Path, images: Path, reference: tuple[FeatureCache, list[str | None]]) -> None:
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    whole, whole_keys = reference
    mp.spawn(_fill_on_rank, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    readable = [key for key in whole_keys if key is not None]
    for rank, result in enumerate(ranks):
        assert result["keys"] == whole_keys
        assert result["cached"] == 20
        assert torch.equal(load_file(str(tmp_path / f"rank{rank}.safetensors"))["tokens"], whole.get(readable))
    # 21 unique images to encode (the corrupt one fails to decode), split 10 and 11.
    assert sorted(result["encoded"] for result in ranks) == [10, 10]
    shared = FeatureCache(CACHE_KEY, root=tmp_path / "shared")
    assert len(shared) == 20 and all(key in shared for key in readable)
    assert {path.name[: len("shard-r000")] for path in shard_dirs(shared)} == {"shard-r000", "shard-r001"}
    assert torch.equal(shared.get(readable), whole.get(readable))


def test_a_fill_the_disk_cannot_hold_is_refused(
    tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = records_in(images)
    encoded: list[int] = []

    def counted(batch: list[Image.Image]) -> torch.Tensor:
        encoded.append(len(batch))
        return encode(batch)

    known = FeatureCache(CACHE_KEY, root=tmp_path / "known")
    known.fill(records[:2], counted)
    assert encoded == [1] and len(shard_dirs(known)) == 1
    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**6, used=10**6 - 100, free=100))

    fresh = FeatureCache(CACHE_KEY, root=tmp_path / "fresh")
    encoded.clear()
    with pytest.raises(DataError) as refusal:
        fresh.fill(records, counted, 4)
    message = str(refusal.value)
    assert "\n" not in message
    assert f"needs {21 * TOKEN_BYTES} B for 21 images" in message and "only 100 B is free" in message
    assert str(fresh.path) in message and "BLIPKIT_CACHE=" in message and "data.feature_cache=false" in message
    # The token shape was unknown, so one batch was encoded to learn it; nothing reached the disk.
    assert encoded == [4]
    assert not shard_dirs(fresh) and not staging_dirs(fresh) and not (fresh.path / "meta.json").exists()

    # With the shape known from meta.json, the refusal comes before any encoding.
    encoded.clear()
    with pytest.raises(DataError, match=f"needs {20 * TOKEN_BYTES} B for 20 images"):
        FeatureCache(CACHE_KEY, root=tmp_path / "known").fill(records, counted, 4)
    assert encoded == [] and len(shard_dirs(known)) == 1
