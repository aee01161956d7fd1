"""Dynamic batching: items submitted from many requests are grouped, by a key, into one call of a batch
function on a single worker thread."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from blipkit.serve.errors import RequestError

__all__ = ["Batcher"]

BatchFunction = Callable[[Hashable, list[Any]], list[Any]]


@dataclass
class _Job:
    key: Hashable
    item: Any
    arrived: float
    future: Future = field(default_factory=Future)


class Batcher:
    """Runs ``run_batch(key, items) -> results`` (one result per item, in order) on one worker thread.

    A batch holds only items of one key (say, one task with one set of generation settings). It starts
    when ``max_batch`` items of the first waiting item's key are queued, or ``max_wait_s`` after that item
    arrived, whichever is first; items of other keys keep their place for the next batch. When a batch
    raises, each of its items is run again alone, so one bad item fails only its own request.
    """

    def __init__(self, run_batch: BatchFunction, max_batch: int = 8, max_wait_s: float = 0.01, max_queue: int = 256) -> None:
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._pending: list[_Job] = []
        self._ready = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sizes: Counter[int] = Counter()
        self._failed = 0

    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="blipkit-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the batch in progress, fail the queued items, and end the worker thread."""
        with self._ready:
            self._stopping = True
            left, self._pending = self._pending, []
            self._ready.notify_all()
        for job in left:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RequestError("the server is shutting down; retry later", 503, "server_error"))
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, key: Hashable, item: Any) -> Future:
        """Queue ``item``; the future gets its result, or the exception its batch raised for it."""
        job = _Job(key, item, time.monotonic())
        with self._ready:
            if self._stopping or self._thread is None:
                raise RequestError("the server is not running its model; retry later", 503, "server_error")
            if len(self._pending) >= self.max_queue:
                raise RequestError(
                    f"the server is busy ({len(self._pending)} items queued); retry later", 503, "server_error"
                )
            self._pending.append(job)
            self._ready.notify_all()
        return job.future

    def stats(self) -> dict[str, Any]:
        """Counts so far: batches, items, the largest batch, batches per size, items queued now, failures."""
        with self._ready:
            sizes = dict(sorted(self._sizes.items()))
            queued = len(self._pending)
        return {
            "batches": sum(sizes.values()),
            "items": sum(size * count for size, count in sizes.items()),
            "largest_batch": max(sizes, default=0),
            "batch_sizes": {str(size): count for size, count in sizes.items()},
            "queued": queued,
            "failed_items": self._failed,
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait_s * 1000,
        }

    def _next_batch(self) -> list[_Job] | None:
        with self._ready:
            while not self._pending and not self._stopping:
                self._ready.wait()
            if self._stopping:
                return None
            head = self._pending[0]
            deadline = head.arrived + self.max_wait_s
            while True:
                same = [job for job in self._pending if job.key == head.key][: self.max_batch]
                left = deadline - time.monotonic()
                if len(same) >= self.max_batch or left <= 0:
                    break
                self._ready.wait(left)
                if self._stopping:
                    return None
            taken = {id(job) for job in same}
            self._pending = [job for job in self._pending if id(job) not in taken]
        return [job for job in same if job.future.set_running_or_notify_cancel()]

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            with self._ready:
                self._sizes[len(batch)] += 1
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        try:
            results = self.run_batch(batch[0].key, [job.item for job in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the batch function gave {len(results)} results for {len(batch)} items")
        except Exception as err:  # any failure: retried item by item below, or handed to the one request
            if len(batch) == 1:
                self._failed += 1
                batch[0].future.set_exception(err)
                return
            for job in batch:
                self._run([job])
            return
        for job, result in zip(batch, results):
            job.future.set_result(result)
