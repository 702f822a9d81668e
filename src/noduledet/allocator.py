"""Keep freed memory in the process instead of returning it to the kernel at every free.

glibc's malloc serves each block above its mmap threshold (128 KiB at start, raised as blocks are
freed, never above 32 MiB) with fresh pages from the kernel and hands them back when the block is
freed, and it trims the heap's free top above twice that. A training or evaluation step allocates
and frees the same tens of megabytes (activations, cubes, resampled slices) over and over, so the
kernel maps and zeroes them anew each time: a demo run page-faulted 41-56 million times, 120-153 s
of system time. With blocks up to 256 MiB from the heap and up to 1 GiB of free heap kept, it
page-faults about half a million times (30-33 s of system time), every result bit for bit the
same; its memory peak grows by about 0.4 GB. ``benchmarks/bench_malloc.py`` measures training
work 1.08x faster (docs/benchmarks.md, section 8).

Only glibc has these knobs (``mallopt``); elsewhere nothing changes. A user's own ``MALLOC_*_``
environment settings win: then this module leaves malloc as the user set it.
"""

from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 256 << 20  # blocks larger than this still come from (and go back to) the kernel
TRIM_THRESHOLD = 1 << 30  # free heap kept for the next allocations before any is given back

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h parameter numbers
_M_MMAP_THRESHOLD = -3
_ENV = {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "MALLOC_TRIM_THRESHOLD_": TRIM_THRESHOLD}


def keep_freed_memory() -> bool:
    """Set glibc's thresholds for this process and, through the environment, for processes it starts.

    Returns True when they were set; False on another C library or when the user set them already.
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _ENV):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1):
        return False
    os.environ.update({name: str(value) for name, value in _ENV.items()})  # spawned workers read them at start
    return True
