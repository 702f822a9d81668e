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
3. Stage two's augmented cubes (``fpr.augment_cube`` -> ``zoom_shift``): a 24^3 cube zoomed
   and shifted out of a 32^3 one, by ``ndimage.affine_transform`` (order 1) against the same
   linear weights one axis at a time.
4. The blob filter's peaks (``blobs._maximum_3x3x3``), which runs over every training scan when
   stage two mines its candidates: scipy's ``maximum_filter(size=3)`` against shifted
   ``np.maximum``, on a 200x180x290 grid.
5. Stage two's max pooling without gradients (calibration, evaluation, prediction): torch's
   ``max_pool3d`` against the maximum of strided halves, on the first stage's output for 32 cubes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torchvision.ops import MultiScaleRoIAlign

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

from noduledet.blobs import _maximum_3x3x3  # noqa: E402
from noduledet.data import patches  # noqa: E402
from noduledet.fpr import zoom_shift  # noqa: E402
from noduledet.geometry import Geometry  # noqa: E402
from noduledet.models import build_detector  # noqa: E402
from noduledet.models.classifier3d import _HalvingMaxPool  # noqa: E402


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


def timed(work, repeats: int) -> tuple[float, object]:
    """Seconds per call of ``work()`` (after one warm-up call), and its last result."""
    out = work()
    t = time.perf_counter()
    for _ in range(repeats):
        out = work()
    return (time.perf_counter() - t) / repeats, out


def compare(before, after, repeats: int) -> dict:
    """Both callables timed alternately over three rounds; medians, ratio and largest difference."""
    times, outputs = {"before": [], "after": []}, {}
    for _ in range(3):
        for name, work in (("before", before), ("after", after)):
            seconds, outputs[name] = timed(work, repeats)
            times[name].append(seconds)
    a, b = statistics.median(times["before"]), statistics.median(times["after"])
    diff = np.abs(np.asarray(outputs["before"], dtype=np.float64) - np.asarray(outputs["after"], dtype=np.float64))
    return {"before": a, "after": b, "ratio": a / b, "max_diff": float(diff.max())}


def bench_augment(count: int) -> dict:
    rng = np.random.default_rng(0)
    cubes = rng.normal(-600, 300, (count, 32, 32, 32)).astype(np.float32)
    draws = []
    for cube in cubes:
        zoom = float(np.exp(rng.uniform(-np.log1p(0.15), np.log1p(0.15))))  # stage two's defaults
        start = 15.5 - zoom * 11.5 + rng.uniform(-2, 2, 3)
        draws.append((cube, zoom, start))

    def scipy_way():
        return np.stack([ndimage.affine_transform(c, np.full(3, z), s, (24,) * 3, order=1, mode="nearest")
                         for c, z, s in draws])

    r = compare(scipy_way, lambda: np.stack([zoom_shift(c, z, s, 24) for c, z, s in draws]), 1)
    return {k: v / count if k in ("before", "after") else v for k, v in r.items()}


def bench_maxima(shape: tuple[int, int, int] = (200, 180, 290)) -> dict:
    volume = ndimage.gaussian_filter(np.random.default_rng(0).normal(0, 50, shape).astype(np.float32), 1.5)
    return compare(lambda: ndimage.maximum_filter(volume, size=3), lambda: _maximum_3x3x3(volume), 3)


def bench_pool(cubes: int = 32) -> dict:
    x = torch.relu(torch.randn(cubes, 16, 24, 24, 24, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        return compare(lambda: torch.nn.functional.max_pool3d(x, 2), lambda: _HalvingMaxPool()(x), 10)


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
    a = bench_augment(args.cubes)
    print(f"stage-two augmented cubes, 24^3 from 32^3: affine_transform {a['before'] * 1000:.2f} ms, "
          f"one axis at a time {a['after'] * 1000:.2f} ms per cube; {a['ratio']:.1f}x; "
          f"largest difference {a['max_diff']:.1e} HU")
    m = bench_maxima()
    print(f"blob filter peaks, 3x3x3 maximum of 200x180x290: scipy {m['before'] * 1000:.0f} ms, "
          f"shifted np.maximum {m['after'] * 1000:.0f} ms; {m['ratio']:.1f}x; largest difference {m['max_diff']:g}")
    q = bench_pool()
    print(f"stage-two max pooling without gradients, 32 x 16 x 24^3: max_pool3d {q['before'] * 1000:.1f} ms, "
          f"strided halves {q['after'] * 1000:.1f} ms; {q['ratio']:.1f}x; largest difference {q['max_diff']:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
