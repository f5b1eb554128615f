"""The CPU allocator of a training process: keep freed memory for reuse.

A training step allocates and frees the same large activation tensors every step. glibc's
malloc by default returns freed blocks above a (dynamic) size to the kernel and trims its heap,
so the next step page-faults the same memory in again, zeroed: on ResNet-18 w32 at 32x32 on
CPU, 24,000-40,000 page faults a step. With the mmap threshold at its maximum (32 MiB) and
trimming only past 1 GiB of free heap, a step reuses the last step's pages (500-1,000 faults a
step); the process keeps its peak memory resident, as a GPU caching allocator does. Measured
side by side, each rule in its own process (bench/step_time.py): rec-LRA's ResNet-18 step was
1.10-1.23x backprop's without it and 0.99-1.04x with it (1.06x in later runs, docs/results.md),
and both got faster (rec-LRA's the more: it frees and reallocates more per step).
A no-op off glibc (macOS, musl) and on GPUs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling on 64-bit: larger blocks are always mmapped
TRIM_THRESHOLD = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Set this process's malloc to keep freed memory (once); True where it took effect."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
