"""The CPU training allocator setting: large blocks from the heap, freed memory kept, defaults restored."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from blipkit.config import load_recipe
from blipkit.train import memory, runner

BLOCK = 64 * 2**20


# Run in a fresh interpreter: in a long-lived process, free chunks left in the heap by earlier tests can
# serve a large block without any mmap, whatever the setting.
PROBE = f"""
import ctypes, json
import torch
from blipkit.train import memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = memory._glibc()
libc.mallinfo2.restype = MallInfo2

def probe():
    before = libc.mallinfo2().hblkhd
    block = torch.ones({BLOCK}, dtype=torch.uint8)
    mapped = libc.mallinfo2().hblkhd - before
    del block
    return {{"mapped": mapped, "free": libc.mallinfo2().fordblks}}

result = {{}}
with memory.reuse_freed_memory() as applied:
    result["inside"] = dict(probe(), applied=applied)
result["after"] = probe()
with memory.reuse_freed_memory(enabled=False) as applied:
    result["disabled"] = dict(probe(), applied=applied)
print(json.dumps(result))
"""


def test_large_blocks_come_from_the_heap_and_stay_there_until_the_block_ends() -> None:
    libc = memory._glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("the allocator setting applies to glibc (>= 2.33 for mallinfo2) only")
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    assert result["inside"]["applied"]
    assert result["inside"]["mapped"] == 0
    assert result["inside"]["free"] >= BLOCK
    assert result["after"]["mapped"] >= BLOCK
    assert not result["disabled"]["applied"]
    assert result["disabled"]["mapped"] >= BLOCK


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
