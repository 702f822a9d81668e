"""Progress of long work, one convention for every command.

A progress reporter is a callable ``progress(iterable, total=None) -> iterable`` that yields
the items of ``iterable`` while it reports; ``None`` means silent. On a terminal it is a tqdm
bar; written to a file or a pipe (a log, CI) it prints a plain line every tenth of the way
and at the end instead of the bar's redraws, or nothing for fine-grained work (the batches of
an epoch, whose end the caller reports).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator

Progress = Callable[..., Iterable]


def _lines(iterable: Iterable, total: int | None, desc: str, unit: str) -> Iterator:
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    step = max(1, (total or 10) // 10)
    start = time.perf_counter()
    done = 0
    for item in iterable:
        yield item
        done += 1
        if done % step == 0 or done == total:
            of = f"/{total}" if total else ""
            print(f"{desc}: {done}{of} {unit}s, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def reporter(desc: str, unit: str = "item", plain: bool = True) -> Progress:
    """A progress reporter labelled ``desc`` counting ``unit``s; ``plain=False``: silent off a terminal."""

    def progress(iterable: Iterable, total: int | None = None) -> Iterable:
        if sys.stderr.isatty():
            from tqdm import tqdm

            return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False)
        return _lines(iterable, total, desc, unit) if plain else iterable

    return progress


def track(progress: Progress | None, iterable: Iterable, total: int | None = None) -> Iterable:
    """``iterable`` through ``progress`` (unchanged when there is none)."""
    return progress(iterable, total=total) if progress else iterable
