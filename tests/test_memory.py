"""The CPU training allocator setting: large blocks from the heap, freed memory kept, defaults restored."""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from blipkit.config import load_recipe
from blipkit.train import memory, runner

BLOCK = 64 * 2**20


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def _mallinfo() -> MallInfo2:
    libc = memory._glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("the allocator setting applies to glibc (>= 2.33 for mallinfo2) only")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


def _mapped_while_holding_a_block() -> tuple[int, int]:
    """(bytes mmap'd for a fresh 64 MiB tensor, bytes free in the heap once it is freed again)."""
    before = _mallinfo().hblkhd
    block = torch.ones(BLOCK, dtype=torch.uint8)
    mapped = _mallinfo().hblkhd - before
    del block
    return mapped, _mallinfo().fordblks


def test_large_blocks_come_from_the_heap_and_stay_there_until_the_block_ends() -> None:
    with memory.reuse_freed_memory() as applied:
        assert applied
        mapped_inside, free_inside = _mapped_while_holding_a_block()
    mapped_after, _ = _mapped_while_holding_a_block()
    assert mapped_inside == 0
    assert free_inside >= BLOCK
    assert mapped_after >= BLOCK


def test_disabled_changes_nothing() -> None:
    with memory.reuse_freed_memory(enabled=False) as applied:
        assert not applied
        mapped, _ = _mapped_while_holding_a_block()
    assert mapped >= BLOCK


def test_training_on_the_cpu_runs_inside_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))
    seen: list[bool] = []
    real = memory.reuse_freed_memory

    @contextmanager
    def spy(enabled: bool = True):
        with real(enabled) as applied:
            seen.append(enabled)
            yield applied

    monkeypatch.setattr(runner, "reuse_freed_memory", spy)
    recipe = load_recipe("tiny", ["bridge.name=mlp", "bridge.options={num_tokens: 4}", "stage2.steps=1"])
    runner.train(recipe, output=tmp_path / "run", quiet=True)
    assert seen == [not torch.cuda.is_available()]
