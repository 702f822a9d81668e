"""The GPU road, checked on the day a GPU is lent: in under 10 minutes on one H100.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--steps 50]

What only a GPU runs, through the code that ``noduledet train`` and ``predict`` run there:

1. the paper preset (``configs/luna16-paper.yaml``: ResNet-50 CCAPM, Mask R-CNN, batch 8 of
   512 px, SGD, DataLoader workers 8) trained ``--steps`` steps with AMP (bf16 autocast) by
   ``engine.train_one_epoch`` on a phantom's cache: images per second, peak memory, the losses
   finite;
2. that model's candidates on a held-out phantom scan (512x512, slices at the working 0.7 mm)
   with fp32 and with bf16 autocast (``Detector(precision=...)``; boxes decoded in fp32 either
   way): how far each fp32 candidate of the top 20 lies from its nearest bf16 one (the check: 90%
   of them within 0.5 mm), and the milliseconds per slice of each.

The numbers are printed and written to ``--out`` (JSON); the exit status is 1 when a check fails.
``--smoke`` runs the same road on the CPU with the tiny preset, 96 px phantom scans, 2 steps and
16 slices (bf16 autocast on the CPU; the candidates are reported, not checked: two steps make no
detector), which is how the test suite keeps this script working; no GPU: the script refuses in
one line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

from noduledet import engine  # noqa: E402
from noduledet.config import load_config  # noqa: E402
from noduledet.data.cache import SliceCache, prepare  # noqa: E402
from noduledet.data.dataset import collate  # noqa: E402
from noduledet.data.phantom import write_dataset  # noqa: E402
from noduledet.inference import Detector  # noqa: E402
from noduledet.merge import merge_slices  # noqa: E402

PAPER = Path(__file__).resolve().parents[1] / "configs" / "luna16-paper.yaml"
MATCH_MM = 0.5  # an fp32 candidate's nearest bf16 candidate lies at most this far
TOP = 20  # fp32 candidates compared
MATCHED = 0.9  # the check: at least this fraction of them matched
SMOKE = ["model.preset=tiny", "data.patch=64", "data.pixel_mm=4.0", "train.batch_size=2", "train.workers=2",
         "train.warmup_iters=2"]
SMOKE_SLICES = 16  # lung slices compared in --smoke (evenly spaced); on a GPU every lung slice


def train_steps(cfg, cache: SliceCache, device: torch.device, steps: int,
                amp: torch.dtype | None) -> tuple[dict, torch.nn.Module]:
    """``steps`` steps of ``engine.train_one_epoch`` on the training split of ``cache``, with
    ``amp`` autocast; the epoch's row (images per second, losses) and the model."""
    splits = engine.make_splits(cfg, cache)
    train_ds, _ = engine.make_datasets(cfg, cache, splits)
    train_ds.set_epoch(0)
    trainer = engine.make_trainer(cfg, device, steps, engine.effective_lr(cfg, 1), amp_dtype=amp)
    sampler = torch.utils.data.RandomSampler(train_ds, replacement=True, num_samples=steps * cfg.train.batch_size,
                                             generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(train_ds, cfg.train.batch_size, sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.train.workers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row = engine.train_one_epoch(trainer, trainer.model, loader, cfg.train.grad_clip)
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row, trainer.model


def compare_precisions(model: torch.nn.Module, cfg, cache: SliceCache, uid: str, device: torch.device,
                       max_slices: int = 0) -> dict:
    """The scan's candidates with fp32 and with bf16 autocast: distances of the top ``TOP`` fp32
    candidates to the nearest bf16 one (mm), their probabilities' differences, ms per slice; on
    ``max_slices`` evenly spaced lung slices (0: all)."""
    d = cfg.data
    hu, g, region = cache.volume(uid), cache.geometry(uid), cache.region(uid)
    slices = list(region.lung_slices)
    if max_slices and len(slices) > max_slices:
        slices = slices[::len(slices) // max_slices][:max_slices]
    found, ms = {}, {}
    for precision in ("fp32", "bf16"):
        detector = Detector(model, d.offsets_mm, d.window_hu, device, cfg.eval.batch_size, pixel_mm=d.pixel_mm,
                            precision=precision)
        detector.detect(hu, g, slices[:4])  # warm-up: cuDNN's algorithm search
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        detections = detector.detect(hu, g, slices)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms[precision] = 1000 * (time.perf_counter() - t) / max(len(slices), 1)
        found[precision] = merge_slices(detections, g, cfg.eval.link_mm, cfg.eval.min_score)
    ref, low = found["fp32"][:TOP], found["bf16"]
    others = np.array([c.world_xyz for c in low]).reshape(-1, 3)
    dist = [float(np.linalg.norm(others - c.world_xyz, axis=1).min()) if len(others) else float("inf") for c in ref]
    nearest = [low[int(np.argmin(np.linalg.norm(others - c.world_xyz, axis=1)))] for c in ref] if len(others) else []
    return {"scan": uid, "slices": len(slices), "candidates_fp32": len(found["fp32"]),
            "candidates_bf16": len(low), "compared": len(ref), "max_distance_mm": max(dist, default=0.0),
            "within_0_5_mm": sum(x <= MATCH_MM for x in dist),
            "max_probability_difference": max((abs(a.probability - b.probability) for a, b in zip(ref, nearest)),
                                              default=0.0),
            "fp32_ms_per_slice": ms["fp32"], "bf16_ms_per_slice": ms["bf16"]}


def run(out: Path | None, steps: int, smoke: bool, data: Path | None, cache: Path | None, log=print) -> dict:
    device = torch.device("cpu" if smoke else "cuda")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        scratch = Path(scratch)
        if data is None:
            data = scratch / "data"
            write_dataset(data, 4, seed=0, size=96 if smoke else 512, workers=1 if smoke else 8,
                          nodules=(1, 3), diameters=(5.0, 30.0))
        cfg = load_config(PAPER, [f"data.root={data}", f"data.cache={cache or scratch / 'cache'}",
                                  f"train.out={scratch / 'run'}", "data.test_fraction=0.25", "data.val_fraction=0",
                                  *(SMOKE if smoke else [])])
        if cache is None:
            prepare(data, cfg.data.cache, cfg.data, workers=1 if smoke else 8)
        sc = SliceCache(cfg.data.cache)
        t0 = time.perf_counter()
        row, model = train_steps(cfg, sc, device, steps, torch.bfloat16)
        train_s = time.perf_counter() - t0
        test = engine.make_splits(cfg, sc)["test"]
        precisions = compare_precisions(model, cfg, sc, test[0], device, SMOKE_SLICES if smoke else 0)
    report = {"machine": machine_line(), "smoke": smoke, "device": str(device), "config": str(PAPER),
              "preset": cfg.model.preset, "variant": cfg.model.variant, "masks": cfg.model.masks,
              "train": {"steps": steps, "batch_size": cfg.train.batch_size, "workers": cfg.train.workers,
                        "seconds": train_s, "images_per_s": row["images_per_s"], "loss": row["loss"],
                        "peak_memory_gib": row.get("peak_memory_gib")},
              "candidates": precisions}
    matched = precisions["within_0_5_mm"] >= MATCHED * precisions["compared"]
    report["ok"] = bool(np.isfinite(row["loss"]) and (matched or smoke))  # two steps on 64 px make no detector
    log(json.dumps(report, indent=1))
    if out:
        out.write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the numbers as JSON")
    p.add_argument("--steps", type=int, default=50, help="training steps of the paper preset (default 50)")
    p.add_argument("--smoke", action="store_true", help="the same road on the CPU, tiny preset, 96 px scans")
    p.add_argument("--data", type=Path, help="a LUNA16-layout folder (default: 4 phantom scans, generated)")
    p.add_argument("--cache", type=Path, help="its prepared cache, made with the paper config's region settings")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run "
              "(--smoke runs the road on the CPU)", file=sys.stderr)
        return 2
    report = run(args.out, args.steps, args.smoke, args.data, args.cache)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
