"""Training's CPU hot spots, each against the code it replaced, measured in the same process.

    python benchmarks/bench_training.py [--rounds 5] [--cubes 400]

1. A stage-one training step (tiny CCAPM, a batch of 8 patches of 128 px with one to three
   small boxes each, as ``noduledet train`` on the CPU): RoIAlign's backward by torchvision's
   loop (``torchvision.ops.MultiScaleRoIAlign``) against the matrix products of
   ``noduledet.models.roi_align``. The two models alternate for ``--rounds`` rounds of 5 steps
   and the median of the per-round ratios is given: the 2-core machine drifts by more than the
   effect within a minute.
2. Stage two's training cubes (``fpr.cut`` -> ``extract_patches``): 32^3 cubes of 1.25 mm from a
   generated 160x300x300 region at 0.7 x 0.7 x 1.25 mm, interpolated voxel by voxel
   (``map_coordinates``) against the three matrix products along the axes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import MultiScaleRoIAlign

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

from noduledet.data import patches  # noqa: E402
from noduledet.geometry import Geometry  # noqa: E402
from noduledet.models import build_detector  # noqa: E402


def batch(seed: int, size: int = 128, images: int = 8) -> tuple[list[torch.Tensor], list[dict]]:
    """Patches with one to three nodule-sized boxes (4-30 px)."""
    g = torch.Generator().manual_seed(seed)
    xs, targets = [], []
    for _ in range(images):
        n = int(torch.randint(1, 4, (1,), generator=g))
        side = 4 + 26 * torch.rand(n, 1, generator=g)
        corner = torch.rand(n, 2, generator=g) * (size - side)
        targets.append({"boxes": torch.cat([corner, corner + side], 1), "labels": torch.ones(n, dtype=torch.int64)})
        xs.append(torch.rand(3, size, size, generator=g))
    return xs, targets


def with_torchvision_pool(model: torch.nn.Module) -> torch.nn.Module:
    """The same model with torchvision's own pooler (same levels and scales)."""
    ours = model.roi_heads.box_roi_pool
    theirs = MultiScaleRoIAlign(ours.featmap_names, ours.output_size, ours.sampling_ratio)
    theirs.scales, theirs.map_levels = ours.scales, ours.map_levels
    model.roi_heads.box_roi_pool = theirs
    return model


def step_seconds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data, steps: int) -> float:
    t = time.perf_counter()
    for images, targets in data[:steps]:
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - t) / steps


def bench_step(rounds: int) -> dict:
    models = {}
    for name in ("torchvision", "matrix products"):
        torch.manual_seed(0)
        model = build_detector("ccapm", "tiny").train()
        model = with_torchvision_pool(model) if name == "torchvision" else model
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    data = [batch(k) for k in range(5)]
    for model, opt in models.values():
        step_seconds(model, opt, data, 2)  # warm-up
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, (model, opt) in models.items():
            times[name].append(step_seconds(model, opt, data, 5))
    ratios = [a / b for a, b in zip(times["torchvision"], times["matrix products"])]
    return {name: statistics.median(t) for name, t in times.items()} | {"ratio": statistics.median(ratios)}


def bench_cubes(count: int) -> dict:
    rng = np.random.default_rng(0)
    hu = rng.normal(-600, 300, (160, 300, 300)).astype(np.float32)
    g = Geometry((0.7, 0.7, 1.25), (-100.0, -100.0, -300.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), hu.shape)
    centres = g.voxel_to_world(rng.uniform([10, 20, 20], [150, 280, 280], (count, 3)))
    off = patches.patch_offsets(32, 1.25)
    t = time.perf_counter()
    slow = np.stack([patches._interpolate(hu, g, c, off) for c in centres])
    t_slow = time.perf_counter() - t
    t = time.perf_counter()
    fast = patches.extract_patches(hu, g, centres, 32, 1.25)
    t_fast = time.perf_counter() - t
    return {"voxel by voxel": t_slow / count, "matrix products": t_fast / count, "ratio": t_slow / t_fast,
            "max_diff_hu": float(np.abs(slow - fast).max())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cubes", type=int, default=400)
    args = ap.parse_args(argv)
    print(machine_line())
    s = bench_step(args.rounds)
    print(f"stage-one training step, batch of 8 x 128 px: torchvision's RoIAlign backward "
          f"{s['torchvision'] * 1000:.0f} ms, matrix products {s['matrix products'] * 1000:.0f} ms; "
          f"median ratio over {args.rounds} rounds {s['ratio']:.2f}x")
    c = bench_cubes(args.cubes)
    print(f"stage-two cubes, 32^3 at 1.25 mm: voxel by voxel {c['voxel by voxel'] * 1000:.2f} ms, "
          f"matrix products {c['matrix products'] * 1000:.2f} ms per cube; {c['ratio']:.1f}x; "
          f"largest difference {c['max_diff_hu']:.1e} HU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
