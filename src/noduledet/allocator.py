"""Keep freed memory in the process instead of returning it to the kernel at every free.

glibc's malloc serves each block above its mmap threshold (128 KiB at start, raised as blocks are
freed, never above 32 MiB) with fresh pages from the kernel and hands them back when the block is
freed, and it trims the heap's free top above twice that. A training or evaluation step allocates
and frees the same tens of megabytes (activations, cubes, resampled slices) over and over, so the
kernel maps and zeroes them anew each time: a demo run page-faulted 41-56 million times, 120-153 s
of system time. With blocks up to 256 MiB from the heap and up to 1 GiB of free heap kept, it
page-faults about half a million times (30-33 s of system time), every result bit for bit the
same; its memory peak grows by 0.4-0.5 GB. ``benchmarks/bench_malloc.py`` measures training
work 1.08x faster (docs/benchmarks.md, section 8).

Only glibc has these knobs (``mallopt``); elsewhere nothing changes. glibc before 2.31 refuses an
mmap threshold above 32 MiB, which is then used instead. A user's own ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` or ``glibc.malloc`` tunables (``GLIBC_TUNABLES``) win, and
``NODULEDET_KEEP_FREED_MEMORY=0`` leaves glibc's own behaviour (less memory held, more page faults).
"""

from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLDS = (256 << 20, 32 << 20)  # the first glibc accepts; larger blocks come from (and go back to) the kernel
TRIM_THRESHOLD = 1 << 30  # free heap kept for the next allocations before any is given back
OPT_OUT = "NODULEDET_KEEP_FREED_MEMORY"

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h parameter numbers
_M_MMAP_THRESHOLD = -3
_MMAP_ENV, _TRIM_ENV = "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"


def user_settings(environ) -> list[str]:
    """The names in ``environ`` by which the user decides malloc's thresholds (or opts out)."""
    decide = {_MMAP_ENV: True, _TRIM_ENV: True, OPT_OUT: environ.get(OPT_OUT) == "0",
              "GLIBC_TUNABLES": "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")}
    return [name for name, yes in decide.items() if yes and name in environ]


def keep_freed_memory() -> bool:
    """Set glibc's thresholds for this process and, through the environment, for processes it starts.

    Returns True when they were set; False on another C library, when the user set them already or
    opted out (module docstring).
    """
    if not sys.platform.startswith("linux") or user_settings(os.environ):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mmap = next((value for value in MMAP_THRESHOLDS if mallopt(_M_MMAP_THRESHOLD, value) == 1), None)
    if mmap is None or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return False
    os.environ.update({_MMAP_ENV: str(mmap), _TRIM_ENV: str(TRIM_THRESHOLD)})  # spawned workers read them at start
    return True
