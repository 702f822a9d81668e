"""Per-variant cost: parameters, GFLOPs, inference and training time per slice, peak memory.

    python benchmarks/bench_variants.py --preset tiny --sizes 256 512 [--variants res ccapm]

Each variant is measured in its own process (so that peak memory is its own), after the
machine's fp32 matrix-product rate is measured in the same process (the 2-core machine's speed
drifts from minute to minute); the table gives the achieved GFLOP/s as a fraction of that rate. The attention overhead (Table 3 variants against ``res``
of the same depth and width) is measured apart, in one process, alternating the two models
for ``--rounds`` rounds and taking the median of the per-round ratios: on a 2-core machine
timings drift by more than the effect measured, and alternating cancels the drift.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line, matmul_gflops  # noqa: E402

from noduledet.models import VARIANTS, build_detector  # noqa: E402
from noduledet.models.detector import TABLES, count_parameters  # noqa: E402
from noduledet.models.profile import count_flops, time_call  # noqa: E402


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(variant: str, preset: str, size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_detector(variant, preset).eval()
    image = [torch.rand(3, size, size)]
    flops = count_flops(model, image)
    with torch.inference_mode():
        infer = time_call(lambda: model(image), repeats)
    infer_peak = _peak_mb()
    model.train()
    images = [torch.rand(3, size, size) for _ in range(2)]
    box = torch.tensor([[size * 0.4, size * 0.4, size * 0.47, size * 0.47]])
    targets = [{"boxes": box, "labels": torch.ones(1, dtype=torch.int64)} for _ in images]
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    train = time_call(step, max(2, repeats // 2)) / len(images)
    return {"variant": variant, "preset": preset, "size": size, "params_m": count_parameters(model) / 1e6,
            "matmul_gflops": matmul_gflops(),  # beside the model's run: the machine's speed drifts
            "gflops": flops / 1e9, "infer_ms": infer * 1e3, "train_ms_per_image": train * 1e3,
            "infer_peak_mb": infer_peak, "peak_mb": _peak_mb()}


def overhead(variants: list[str], preset: str, size: int, rounds: int) -> dict[str, dict[str, tuple[float, float]]]:
    """Median (and interquartile range) of latency(variant) / latency(res), interleaved, for the
    backbone with its pyramid (where the attention lives) and for the whole detector (whose
    proposal and NMS work also varies with the untrained weights' outputs)."""
    torch.manual_seed(0)
    image = [torch.rand(3, size, size)]
    batch = image[0][None]
    base = build_detector("res", preset).eval()
    out = {}
    for v in variants:
        model = build_detector(v, preset).eval()
        ratios: dict[str, list[float]] = {"backbone": [], "detector": []}
        with torch.inference_mode():
            for _ in range(rounds):
                ratios["backbone"].append(time_call(lambda: model.backbone(batch), 3) / time_call(lambda: base.backbone(batch), 3))
                ratios["detector"].append(time_call(lambda: model(image), 3) / time_call(lambda: base(image), 3))
        out[v] = {}
        for k, r in ratios.items():
            q1, med, q3 = torch.tensor(r).quantile(torch.tensor([0.25, 0.5, 0.75])).tolist()
            out[v][k] = (med, q3 - q1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds for the attention overhead")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: one variant, JSON on stdout
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one, args.preset, args.sizes[0], args.repeats)))
        return
    print(f"machine: {machine_line()}")
    print(f"fp32 matrix product (1024^3, best of 10): {matmul_gflops():.1f} GFLOP/s at the start; each row "
          "uses the rate measured in its own process")
    rows = []
    for size in args.sizes:
        for v in args.variants:
            cmd = [sys.executable, __file__, "--one", v, "--preset", args.preset, "--sizes", str(size),
                   "--repeats", str(args.repeats)] + (["--threads", str(args.threads)] if args.threads else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  measured {v} at {size}", file=sys.stderr, flush=True)
    attention = [v for v in TABLES[3] if v in args.variants and v != "res"]
    for size in args.sizes:
        ratios = overhead(attention, args.preset, size, args.rounds) if attention else {}
        print(f"\n### preset `{args.preset}`, {size}x{size} slice, batch 1 inference, training batch of 2\n")
        print("| variant | params (M) | GFLOPs | inference ms | GFLOP/s | of matmul peak | backbone vs res "
              "| detector vs res | train ms/image | peak MB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in (r for r in rows if r["size"] == size):
            rate = r["gflops"] / (r["infer_ms"] / 1e3)
            peak = r["matmul_gflops"]
            cells = [("1.00x" if r["variant"] == "res" else
                      f"{ratios[r['variant']][k][0]:.2f}x ± {ratios[r['variant']][k][1] / 2:.2f}"
                      if r["variant"] in ratios else "") for k in ("backbone", "detector")]
            print(f"| {r['variant']} | {r['params_m']:.2f} | {r['gflops']:.2f} | {r['infer_ms']:.0f} | {rate:.1f} | "
                  f"{rate / peak:.0%} | {cells[0]} | {cells[1]} | {r['train_ms_per_image']:.0f} | {r['peak_mb']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
