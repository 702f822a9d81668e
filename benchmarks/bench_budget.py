"""Where the demo's training time goes: each trained part's rate against this machine's matrix-product rate.

    python benchmarks/bench_budget.py [--steps 10] [--threads 2]

The demo trains three networks on the CPU, one after the other: stage one (tiny CCAPM, batches of
8 patches of 128 px), the 3D proposer (batches of 8 cubes of 48^3 at 1.25 mm) and stage two's
classifier (batches of 32 cubes of 24^3 at 0.8 mm). For each, a training step of the default
config on random data (one box or one nodule per sample, as training has) is counted in FLOPs
(forward and backward, ``torch.utils.flop_counter``) and timed (median of ``--steps`` steps after
two), and its achieved GFLOP/s is set beside the fp32 matrix-product rate measured in the same
process just before it (the 2-core machine's speed drifts from minute to minute). A part far
below the matrix-product rate would be worth making faster; one near it can only be given more
or less time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))

from common import machine_line, matmul_gflops  # noqa: E402
from noduledet.config import load_config  # noqa: E402
from noduledet.fpr import classifier_spec  # noqa: E402
from noduledet.models.classifier3d import NoduleClassifier3D  # noqa: E402
from noduledet.models.detector import build_detector  # noqa: E402
from noduledet.models.proposer3d import NoduleProposer3D  # noqa: E402
from noduledet.models.profile import time_call  # noqa: E402
from noduledet.proposer import proposer_loss, proposer_spec, targets  # noqa: E402


def stage_one_step(cfg):
    model = build_detector(cfg.model.variant, cfg.model.preset).train()
    size, batch = cfg.data.patch, cfg.train.batch_size
    images = [torch.rand(3, size, size) for _ in range(batch)]
    box = torch.tensor([[size * 0.4, size * 0.4, size * 0.47, size * 0.47]])
    labels = [{"boxes": box, "labels": torch.ones(1, dtype=torch.int64)} for _ in images]
    return model, lambda: sum(model(images, labels).values()), batch, f"{batch} patches of {size} px"


def proposer_step(cfg):
    p = cfg.proposer
    model = NoduleProposer3D(proposer_spec(cfg)).train()
    x = torch.rand(p.batch_size, 1, p.patch, p.patch, p.patch)
    centre = (p.patch - 1) / 2
    t = [targets(np.array([[centre, centre, centre, 8.0]]), np.zeros((0, 4)), p.patch, p.spacing_mm)
         for _ in range(p.batch_size)]
    t = {k: torch.from_numpy(np.stack([item[k] for item in t])) for k in t[0]}
    return model, lambda: proposer_loss(model(x), t), p.batch_size, f"{p.batch_size} cubes of {p.patch}^3"


def stage_two_step(cfg):
    s = cfg.stage2
    model = NoduleClassifier3D(classifier_spec(cfg)).train()
    x = model.window(torch.rand(s.batch_size, s.size, s.size, s.size) * 1400 - 1000)
    y = (torch.arange(s.batch_size) % 2).float()
    return (model, lambda: torch.nn.functional.binary_cross_entropy_with_logits(model(x), y), s.batch_size,
            f"{s.batch_size} cubes of {s.size}^3")


PARTS = {"stage one": stage_one_step, "3D proposer": proposer_step, "stage two": stage_two_step}


def measure(make, cfg, steps: int) -> dict:
    torch.manual_seed(0)
    model, loss_of, samples, what = make(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = loss_of()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    peak = matmul_gflops()
    seconds = time_call(step, steps, warmup=2)
    return {"what": what, "samples_per_s": samples / seconds, "step_ms": seconds * 1e3, "gflop": flops / 1e9,
            "gflops": flops / 1e9 / seconds, "matmul": peak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per part (after two)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(None)
    print(machine_line())
    print("| part | batch | step ms | samples/s | GFLOP per step (fwd+bwd) | GFLOP/s | matmul GFLOP/s | of matmul |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, make in PARTS.items():
        r = measure(make, cfg, args.steps)
        print(f"| {name} | {r['what']} | {r['step_ms']:.0f} | {r['samples_per_s']:.1f} | {r['gflop']:.1f} | "
              f"{r['gflops']:.1f} | {r['matmul']:.1f} | {r['gflops'] / r['matmul']:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
