"""Streaming data: WebDataset tar shards read shard by shard, split over processes and DataLoader workers
with no sample twice in an epoch, shuffled through a seeded buffer, and resumed exactly from a position."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from blipkit.config import load_recipe
from blipkit.data.collate import Collator
from blipkit.data.dataset import open_dataset
from blipkit.data.stream import StreamBatches
from blipkit.errors import ConfigError, DataError
from blipkit.io import load_safetensors
from blipkit.train.runner import train

SHARDS, PER_SHARD = 4, 12


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (seed * 37 % 256, seed * 91 % 256, 80)).save(buffer, format="PNG")
    return buffer.getvalue()


def _member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shards(folder: Path) -> set[str]:
    """4 shards of 12 samples: captions, a few questions, one sample without text and one corrupt image.
    Returns the ids of the usable caption samples."""
    folder.mkdir(parents=True, exist_ok=True)
    captions: set[str] = set()
    for shard in range(SHARDS):
        with tarfile.open(folder / f"{shard:03d}.tar", "w") as archive:
            for i in range(PER_SHARD):
                key = f"{shard:03d}{i:04d}"
                if i == 5:  # a corrupt image
                    _member(archive, f"{key}.jpg", b"not an image")
                    _member(archive, f"{key}.txt", b"a broken picture")
                    continue
                _member(archive, f"{key}.png", _png(shard * PER_SHARD + i))
                if i == 7:  # no text: malformed
                    continue
                if i % 4 == 3:
                    _member(archive, f"{key}.json", json.dumps({"question": "what colour?", "answers": ["red", "red", "blue"]}).encode())
                else:
                    _member(archive, f"{key}.txt", f"a shape number {i}".encode())
                    captions.add(f"{shard:03d}.tar/{key}")
    return captions


def _collate(samples):
    return Collator(lambda image: torch.zeros(1), lambda kept: {})(samples)


def _ids(dataset, rank: int, world: int, workers: int, batches: int, positions=None, seed: int = 0):
    stream = StreamBatches(dataset, ["caption"], 1, _collate, seed, rank, world, workers, buffer_size=4, positions=positions)
    loader = iter(DataLoader(stream, batch_size=None, num_workers=workers))
    ids, last = [], {}
    for _ in range(batches):
        batch = next(loader)
        last[batch["stream_slot"]] = batch["stream_position"]
        ids.extend(batch.get("image_ids", []))
    return ids, last


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, set[str]]:
    folder = tmp_path_factory.mktemp("shards")
    captions = write_shards(folder)
    return f"webdataset:{folder}/{{000..003}}.tar", captions


def test_records_of_a_shard(shards: tuple[str, set[str]]) -> None:
    dataset = open_dataset(shards[0], "train", {})
    assert dataset.streaming and dataset.source.shards[0].endswith("000.tar") and len(dataset.source.shards) == 4
    records = list(dataset.source.records(dataset.source.shards[0], None))
    assert len(records) == PER_SHARD
    assert [r is None for _, r in records].count(True) == 1  # the sample without text
    vqa = records[3][1]
    assert vqa.task == "vqa" and vqa.question == "what colour?" and vqa.text == "red" and vqa.answers == ["red", "red", "blue"]
    place, caption = records[1]
    assert caption.text == "a shape number 1" and dataset.source.record_at(dataset.source.shards[0], place).text == caption.text
    assert [p for p, _ in dataset.source.records(dataset.source.shards[0], place)] == [p for p, _ in records[2:]]


def test_two_ranks_and_two_workers_see_every_sample_once_per_epoch(shards: tuple[str, set[str]]) -> None:
    """4 readers (2 processes x 2 workers) each read one shard per epoch: 9 caption records each (the one
    with a corrupt image comes out as a dropped row), so 9 batches of 1 per reader cover the epoch."""
    dataset = open_dataset(shards[0], "train", {})
    seen = []
    for rank in range(2):
        ids, _ = _ids(dataset, rank, 2, 2, batches=2 * 9)
        seen += ids
    assert len(seen) == len(set(seen)) == len(shards[1]) == 32
    assert set(seen) == shards[1]
    assert dataset.skipped == {}  # counted by the training loop from the batches, not here


def test_a_resumed_stream_continues_the_same_sequence(shards: tuple[str, set[str]]) -> None:
    dataset = open_dataset(shards[0], "train", {})
    whole, _ = _ids(dataset, 0, 1, 2, batches=30)
    for stop in (12, 11):  # after an odd number of batches the second worker's slot is the one to go on with
        first, positions = _ids(dataset, 0, 1, 2, batches=stop)
        more, positions = _ids(dataset, 0, 1, 2, batches=7, positions=positions)
        rest, _ = _ids(dataset, 0, 1, 2, batches=30 - stop - 7, positions=positions)
        assert first + more + rest == whole, stop
    assert whole[:len(whole) // 2] != sorted(whole[:len(whole) // 2]), "the buffer shuffles"


def test_training_streams_without_the_cache_and_resumes_exactly(shards: tuple[str, set[str]], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe("tiny", [f"data.train={{name: '{shards[0]}'}}", "data.batch_size=4", "data.shuffle_buffer=8",
                                  "stage1.steps=2", "stage2.steps=4", "stage2.tasks=[caption, vqa]", "checkpoint_every=2"])
    whole = train(recipe, output=tmp_path / "whole", quiet=True)
    assert whole.completed and whole.feature_cache is None
    assert whole.skipped["corrupt image"] >= 1 and whole.skipped["malformed row"] >= 1
    train(recipe, output=tmp_path / "parts", stop_after=4, quiet=True)
    progress = json.loads((tmp_path / "parts" / "blipkit.json").read_text())["progress"]
    assert progress["stage"] == "stage2" and set(progress["stream"]) == {"0"}
    train(recipe, output=tmp_path / "parts", resume=True, quiet=True)
    for run in ("whole", "parts"):
        meta = json.loads((tmp_path / run / "blipkit.json").read_text())
        assert meta["progress"]["step"] == 4
    expected = load_safetensors(tmp_path / "whole" / "checkpoints" / "stage2-step-0000004" / "projection" / "model.safetensors")
    got = load_safetensors(tmp_path / "parts" / "checkpoints" / "stage2-step-0000004" / "projection" / "model.safetensors")
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    with pytest.raises(ConfigError, match="streams; the cache needs"):
        train(load_recipe("tiny", [f"data.train={{name: '{shards[0]}'}}", "data.feature_cache=true"]),
              output=tmp_path / "cached", quiet=True)


def test_missing_shards_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"webdataset: 2 of 2 shards do not exist \(first: .*000.tar\)"):
        open_dataset(f"webdataset:{tmp_path}/{{000..001}}.tar", "train", {})


def _saved_hf(folder: Path, rows: int, shards: int) -> Path:
    import datasets

    images = []
    for i in range(rows):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (i * 7 % 256, 40, 90)).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    table = datasets.Dataset.from_dict(
        {"image": images, "text": [f"a row number {i}" if i % 5 else "" for i in range(rows)]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    table.save_to_disk(str(folder), num_shards=shards)
    return folder


def test_hf_streaming_from_a_saved_folder_and_through_the_library(tmp_path: Path) -> None:
    """hf: with streaming: a save_to_disk folder read from its Arrow shards, and parquet through the library's
    own streaming; empty captions are skipped and counted; positions resume both exactly."""
    import datasets

    folder = _saved_hf(tmp_path / "saved", rows=40, shards=4)
    saved = open_dataset(f"hf:{folder}", "train", {"streaming": True})
    assert saved.streaming and len(saved.source.shards) == 4
    usable = {f"a row number {i}" for i in range(40) if i % 5}
    texts = [r.text for shard in saved.source.shards for _, r in saved.source.records(shard, None) if r is not None]
    assert sorted(texts) == sorted(usable)
    datasets.load_from_disk(str(folder)).to_parquet(str(tmp_path / "rows.parquet"))
    library = open_dataset(f"hf:{tmp_path / 'rows.parquet'}", "train", {"streaming": True})
    assert library.streaming and library.source.shards
    for dataset in (saved, library):
        slots = 4 if dataset is saved else 1
        whole, _ = _ids(dataset, 0, 1, min(slots, 2), batches=20)
        first, positions = _ids(dataset, 0, 1, min(slots, 2), batches=7)
        rest, _ = _ids(dataset, 0, 1, min(slots, 2), batches=13, positions=positions)
        assert first + rest == whole


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_with_two_workers_each_stream_and_resume_exactly(shards: tuple[str, set[str]], tmp_path: Path) -> None:
    """`blipkit train --processes 2` on shards with 2 DataLoader workers a process (4 readers, one shard
    each): every process's readers are saved, and a run stopped after an odd number of stage-2 batches
    resumes to the uninterrupted run's weights, bit for bit."""
    recipe = ["tiny", f"data.train={{name: '{shards[0]}'}}", "data.batch_size=4", "data.shuffle_buffer=4",
              "data.num_workers=2", "stage1.steps=2", "stage2.steps=3", "stage2.tasks=[caption, vqa]", "checkpoint_every=1"]
    env = {**os.environ, "BLIPKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    def blipkit(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "blipkit", "train", *args, "-q", "--processes", "2"], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    blipkit(*recipe, "-o", str(tmp_path / "whole"))
    blipkit(*recipe, "-o", str(tmp_path / "parts"), "--stop-after", "3")
    progress = json.loads((tmp_path / "parts" / "blipkit.json").read_text())["progress"]
    assert progress["stage"] == "stage2" and progress["step"] == 1
    assert set(progress["stream"]) == {"0", "2"}, "one batch each: every process's first reader (slots 0 and 2)"
    blipkit("--resume", str(tmp_path / "parts"))
    step = Path("checkpoints") / "stage2-step-0000003" / "projection" / "model.safetensors"
    expected, got = load_safetensors(tmp_path / "whole" / step), load_safetensors(tmp_path / "parts" / step)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
