"""Shared pieces of the benchmarks: the machine's matrix-product rate and a header line."""

from __future__ import annotations

import os
import platform
import time

import torch


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    """Measured fp32 matrix-product rate (GFLOP/s) of this process's threads: the ceiling."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"{cpu}; {os.cpu_count()} logical CPUs; torch {torch.__version__}; threads {torch.get_num_threads()}; "
            f"GPU {gpu}")


def add_glibc_malloc_option(parser) -> None:
    parser.add_argument("--glibc-malloc", action="store_true",
                        help="leave malloc's thresholds as glibc started (the CLI sets its own: noduledet.allocator)")


def malloc_line(glibc_malloc: bool) -> str:
    """Set malloc's thresholds as the CLI does, unless ``glibc_malloc``; say which are in force."""
    from noduledet.allocator import keep_freed_memory

    tuned = False if glibc_malloc else keep_freed_memory()
    return f"malloc: {'the CLI thresholds' if tuned else 'glibc as started'}"
