"""Allocator settings for training on the CPU.

A training step frees and reallocates the same large tensors every step: vocabulary-sized gradients,
attention gradients, feed-forward activations. glibc's malloc serves allocations above a threshold (at
most 32 MiB) with fresh ``mmap`` regions and returns trimmed heap memory to the system, so each step
pays the kernel's page faults again on tens of megabytes: on 2 cores that was about 6% of a Q-Former
stage-1 step. While ``reuse_freed_memory`` is open, every allocation comes from the heap and freed
memory stays there for the next step, as the caching allocators of GPU frameworks do.
"""

from __future__ import annotations

import ctypes
import logging
import platform
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

# mallopt parameters and their documented glibc defaults (mallopt(3)).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
TRIM_ONLY_ABOVE = 2**31 - 1  # the largest value mallopt takes: trimming all but stops


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Keep freed memory in the process for reuse while the block runs, then give it back and restore
    glibc's defaults. Yields whether the setting took effect (False off glibc or when not ``enabled``)."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_ONLY_ABOVE))
    if not applied:
        logger.debug("mallopt refused the training allocator settings; keeping the defaults")
    try:
        yield applied
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
