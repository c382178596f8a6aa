"""Where a CPU training step's large tensors come from: memory kept by malloc, not fresh pages from the OS.

A CPU step allocates and frees the same large tensors every step (the default net's 8.4M-weight
layer: its bf16 cast under autocast, its gradient, the gradient's fp32 copy). glibc's malloc
serves a block above its mmap threshold (at most 32 MiB, its dynamic ceiling) with a fresh
``mmap`` and hands it back at ``free``, and trims the heap's free top above twice that: so every
step the kernel maps and zeroes those pages again, one page fault per 4 KiB (8,000 to 16,000 a
step at batch 32 in docs/speed.md's measurements). With both thresholds raised, freed blocks
stay in the heap and the next step reuses them (after a few steps in which the heap grows to
hold them). Nothing is computed differently.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from functools import cache

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
KEEP = 1 << 30  # blocks up to 1 GiB come from the heap, and up to 1 GiB of freed heap stays mapped
# glibc's dynamic thresholds at their ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX and twice it),
# where a training run's repeated frees of large blocks leave them: the allocator without this module.
GLIBC_CEILING = (32 << 20, 64 << 20)


@cache
def _libc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def keep_freed_memory(keep: bool = True) -> bool:
    """Make malloc keep large freed blocks for reuse (``keep``), or set its thresholds back to
    glibc's ceiling; whether it was done (False where the C library is not glibc)."""
    libc = _libc()
    if libc is None:
        return False
    mmap_threshold, trim_threshold = (KEEP, KEEP) if keep else GLIBC_CEILING
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))
