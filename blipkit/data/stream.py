"""Streaming datasets: records read shard by shard, never all in memory, split over the processes of a run
and their DataLoader workers, shuffled through a seeded buffer, and resumable from a saved position.

A format plugin builds a ``StreamingDataset`` over a ``ShardSource`` (tar shards, Arrow files, ...). Each
epoch the shards are put in a seeded order and dealt to *slots*, one per (process, DataLoader worker): a
slot reads its shards in turn, passes the records through a shuffle buffer of its own and collates batches.
Each batch carries the slot's position after it: the epoch, the shard and the place in it of the last
record read, the places of the records waiting in the buffer, and the buffer's random state. A
checkpoint keeps every slot's last position; a resumed run seeks to it (re-reading the buffered records by
their places) instead of replaying the epoch, and draws exactly the batches the uninterrupted run would.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch.utils.data import IterableDataset, get_worker_info

from blipkit.data.sample import Record, Sample
from blipkit.errors import DataError

__all__ = ["ShardSource", "SlotPosition", "StreamingDataset", "StreamBatches"]

Place = int
"""Where a record sits in its shard (a byte offset, a row number: the source decides)."""


class ShardSource(Protocol):
    """Where a streaming dataset's records come from."""

    shards: list[str]

    def records(self, shard: str, after: Place | None) -> Iterator[tuple[Place, Record | None]]:
        """The records of ``shard`` that come after place ``after`` (None: all of them) with their places;
        None for a malformed one (it is skipped and counted)."""

    def record_at(self, shard: str, place: Place) -> Record:
        """The record at ``place`` in ``shard``."""


@dataclass
class SlotPosition:
    """Where one slot stands: JSON-able, saved in checkpoints."""

    epoch: int = 0
    shard: int = 0
    after: Place | None = None
    buffer: list[tuple[int, Place]] = field(default_factory=list)
    rng: list[Any] | None = None
    batches: int = 0
    """Batches the slot has given since the run began, across epochs."""

    def to_json(self) -> dict[str, Any]:
        """A dict for trainer_state/state.json."""
        return {"epoch": self.epoch, "shard": self.shard, "after": self.after, "buffer": [list(b) for b in self.buffer],
                "rng": self.rng, "batches": self.batches}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SlotPosition:
        """The position ``to_json`` wrote."""
        return cls(data["epoch"], data["shard"], data["after"], [tuple(b) for b in data["buffer"]], data["rng"],
                   data.get("batches", 0))


def _rng_state(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _restore(rng: random.Random, state: list[Any]) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


class StreamingDataset:
    """An image-text dataset read in shards, for data larger than memory.

    ``tasks`` are the tasks its records may carry (what a stage may ask for); skipped records are counted
    by reason in ``skipped`` as batches report them.
    """

    streaming = True

    def __init__(self, source: ShardSource, name: str, split: str, tasks: set[str]) -> None:
        if not source.shards:
            raise DataError(f"dataset '{name}' ({split}) has no shards; check the file pattern")
        self.source = source
        self.name = name
        self.split = split
        self.tasks = set(tasks)
        self.skipped: Counter[str] = Counter()
        self.caption_scorer = None

    def slot_shards(self, epoch: int, seed: int, slot: int, slots: int) -> list[str]:
        """The shards slot ``slot`` of ``slots`` reads in ``epoch``: a seeded order of all shards, dealt round."""
        order = list(self.source.shards)
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        if len(order) < slots:
            raise DataError(
                f"dataset '{self.name}' has {len(order)} shards for {slots} readers (processes x DataLoader workers); "
                "use fewer workers or processes, or split the data into more shards"
            )
        return order[slot::slots]


class _SlotReader:
    """One slot's records, through its shuffle buffer, from a position on; keeps the position current."""

    def __init__(self, dataset: StreamingDataset, tasks: set[str], seed: int, slot: int, slots: int, buffer_size: int,
                 position: SlotPosition) -> None:
        self.dataset = dataset
        self.tasks = tasks
        self.seed = seed
        self.slot = slot
        self.slots = slots
        self.buffer_size = buffer_size
        self.position = position
        self.skipped: Counter[str] = Counter()
        self.rng = random.Random(f"{seed}/{slot}/{position.epoch}")
        if position.rng is not None:
            _restore(self.rng, position.rng)
        shards = self._shards()
        self.buffer = [(index, place, dataset.source.record_at(shards[index], place)) for index, place in position.buffer]

    def _shards(self) -> list[str]:
        return self.dataset.slot_shards(self.position.epoch, self.seed, self.slot, self.slots)

    def __iter__(self) -> Iterator[Record]:
        while True:
            shards = self._shards()
            while self.position.shard < len(shards):
                index = self.position.shard
                for place, record in self.dataset.source.records(shards[index], self.position.after):
                    self.position.after = place
                    if record is None:
                        self.skipped["malformed row"] += 1
                        continue
                    if record.task not in self.tasks:
                        continue
                    self.buffer.append((index, place, record))
                    if len(self.buffer) >= self.buffer_size:
                        yield self._draw()
                self.position.shard, self.position.after = index + 1, None
            while self.buffer:
                yield self._draw()
            self.position = SlotPosition(epoch=self.position.epoch + 1, batches=self.position.batches)
            self.rng = random.Random(f"{self.seed}/{self.slot}/{self.position.epoch}")

    def _draw(self) -> Record:
        index = self.rng.randrange(len(self.buffer))
        self.buffer[index], self.buffer[-1] = self.buffer[-1], self.buffer[index]
        return self.buffer.pop()[2]

    def snapshot(self) -> SlotPosition:
        """The position after the records drawn so far: the last record read, those still buffered."""
        return SlotPosition(self.position.epoch, self.position.shard, self.position.after,
                            [(index, place) for index, place, _ in self.buffer], _rng_state(self.rng), self.position.batches)


class StreamBatches(IterableDataset):
    """Batches of one process's share of a streaming dataset, collated in the DataLoader's workers.

    Each batch carries ``stream_slot``, ``stream_position`` (the slot's position after it) and
    ``stream_skipped`` (records skipped since the slot's previous batch).
    """

    def __init__(self, dataset: StreamingDataset, tasks: Sequence[str], batch_size: int, collate: Callable[[list[Sample | None]], dict[str, Any]],
                 seed: int, rank: int, world: int, workers: int, buffer_size: int, positions: dict[int, dict[str, Any]] | None = None) -> None:
        self.dataset = dataset
        self.tasks = set(tasks)
        self.batch_size = batch_size
        self.collate = collate
        self.seed = seed
        self.rank = rank
        self.world = world
        self.workers = max(1, workers)
        self.buffer_size = buffer_size
        self.positions = positions or {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        slot = self.rank * self.workers + ((info.id if info is not None else 0) + self._first_worker()) % self.workers
        saved = self.positions.get(slot)
        position = SlotPosition.from_json(saved) if saved is not None else SlotPosition()
        reader = _SlotReader(self.dataset, self.tasks, self.seed, slot, self.world * self.workers, self.buffer_size, position)
        records = iter(reader)
        while True:
            chunk = [next(records) for _ in range(self.batch_size)]
            batch = self.collate([_sample(record, reader.skipped) for record in chunk])
            reader.position.batches += 1
            batch.update(stream_slot=slot, stream_position=reader.snapshot().to_json(), stream_skipped=dict(reader.skipped))
            reader.skipped.clear()
            yield batch

    def _first_worker(self) -> int:
        """Which slot of this process gives the next batch: the DataLoader takes its workers in turn from the
        first, so a run resumed after a number of batches that is not a multiple of the workers turns them."""
        mine = range(self.rank * self.workers, (self.rank + 1) * self.workers)
        return sum(self.positions[slot].get("batches", 0) for slot in mine if slot in self.positions) % self.workers


def _sample(record: Record, skipped: Counter[str]) -> Sample | None:
    """The record with its image loaded, or None (counted) when the image cannot be read."""
    from blipkit.data.dataset import materialise_image

    try:
        return record.to_sample(image=materialise_image(record.image))
    except DataError:
        skipped["corrupt image"] += 1
        return None
