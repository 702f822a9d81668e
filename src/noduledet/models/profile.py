"""Size and cost of a detector per slice: parameters, GFLOPs and latency on this machine."""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from noduledet.models.detector import build_detector, count_parameters


def count_flops(model: torch.nn.Module, images: list[torch.Tensor]) -> int:
    """FLOPs (multiply and add counted apart) of one inference call, by torch.utils.flop_counter."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops()


def time_call(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_variant(variant: str, preset: str = "tiny", size: int = 512, repeats: int = 3, **options) -> dict:
    """Parameters, GFLOPs and median CPU/GPU milliseconds for one (C, size, size) slice.

    Returns:
        dict with variant, params, gflops, ms (inference, batch of one, no autograd).
    """
    model = build_detector(variant, preset, **options).eval()
    image = [torch.rand(model.spec.in_channels, size, size)]
    flops = count_flops(model, image)
    with torch.inference_mode():
        seconds = time_call(lambda: model(image), repeats=repeats)
    return {"variant": variant, "params": count_parameters(model), "gflops": flops / 1e9, "ms": seconds * 1e3}


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table; ``columns`` are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" if f == "" else "---:" for _, _, f in columns) + "|"
    body = ["| " + " | ".join(format(r[k], f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])
