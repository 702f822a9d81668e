"""GPU benchmark, sized to finish in well under 10 minutes on one H100/H200.

    python benchmarks/bench_gpu.py [--variant ccapm] [--out gpu.json]

Per-slice latency (batch 1) and throughput (batched) of the paper-size detector at 512x512,
fp32 against bf16 autocast; training images per second of the paper-size model; and the same
for ``res`` so that the attention overhead is a ratio measured in the same run. Only CUDA
events time the GPU (``torch.cuda.synchronize`` around every measured block).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

from noduledet.models import build_detector  # noqa: E402
from noduledet.models.profile import count_flops  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() on the GPU."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def bench(variant: str, size: int, batch: int, repeats: int) -> dict:
    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # else a row's peak_gb is the largest of every row so far
    model = build_detector(variant, "paper").to(dev).to(memory_format=torch.channels_last).eval()
    one = [torch.rand(3, size, size, device=dev)]
    many = [torch.rand(3, size, size, device=dev) for _ in range(batch)]
    row = {"variant": variant, "size": size, "batch": batch,
           "gflops": count_flops(model, one) / 1e9}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        def run(x):
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                model(x)
        row[f"{name}_latency_ms"] = 1e3 * timed(lambda: run(one), repeats)
        row[f"{name}_slices_per_s"] = batch / timed(lambda: run(many), repeats)
    model.train()
    box = torch.tensor([[200.0, 200, 230, 230]], device=dev)
    targets = [{"boxes": box, "labels": torch.ones(1, dtype=torch.int64, device=dev)} for _ in many]
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sum(model(many, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    row["train_images_per_s"] = batch / timed(step, max(5, repeats // 2))
    row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="ccapm")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    print(f"machine: {machine_line()}")
    t0 = time.perf_counter()
    rows = [bench(v, args.size, args.batch, args.repeats) for v in dict.fromkeys(["res", args.variant])]
    print(f"\n| variant | GFLOPs | fp32 ms (b=1) | bf16 ms (b=1) | fp32 slices/s (b={args.batch}) | "
          f"bf16 slices/s | train img/s (bf16) | peak GB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['gflops']:.1f} | {r['fp32_latency_ms']:.1f} | {r['bf16_latency_ms']:.1f} | "
              f"{r['fp32_slices_per_s']:.0f} | {r['bf16_slices_per_s']:.0f} | {r['train_images_per_s']:.1f} | "
              f"{r['peak_gb']:.1f} |")
    if len(rows) == 2:
        print(f"\n{args.variant} / res latency (bf16, batch 1): {rows[1]['bf16_latency_ms'] / rows[0]['bf16_latency_ms']:.2f}x")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"machine": machine_line(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
