"""Whole-scan prediction by stage, each speed change with its quality, and the cache's throughput.

    python benchmarks/bench_scan.py [--checkpoint runs/phantom-ccapm/best.pt] [--slices 300] [--size 512]

1. A phantom scan of SIZE x SIZE x SLICES through the pipeline's stages (read, lung mask, slice
   preparation, detector, 3D merge, the 3D proposer, the blob filter and the second stage when the checkpoint has them), for each step from the naive path (every whole slice,
   batch 1) to the default (lung slices of the scan region, batches of 4, channels_last) and
   the ONNX Runtime engine; malloc's thresholds as the CLI sets them (``noduledet.allocator``).
2. Quality before and after, on the held-out scans of the checkpoint's run (``data/phantom``
   with ``configs/phantom-cpu.yaml``): CPM of the naive and the cropped path, and slice mAP and
   CPM of the torch and ONNX engines through ``noduledet evaluate``.
3. ``prepare``'s throughput on ``--cache-scans`` scans with 1 and 2 workers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import add_glibc_malloc_option, machine_line, malloc_line  # noqa: E402

from noduledet import checkpoint as ckpt_io  # noqa: E402
from noduledet.data.cache import prepare  # noqa: E402
from noduledet.data.ct import CTVolume, read_ct, write_ct  # noqa: E402
from noduledet.data.luna16 import Findings, Luna16, write_findings  # noqa: E402
from noduledet.data.lung import ScanRegion  # noqa: E402
from noduledet.data.phantom import make_scan, shape_library  # noqa: E402
from noduledet.evaluate import evaluate  # noqa: E402
from noduledet.inference import Detector  # noqa: E402
from noduledet.metrics.froc import froc  # noqa: E402
from noduledet.pipeline import Pipeline, ScanResult, candidates_table  # noqa: E402
from noduledet.records import read_splits  # noqa: E402

PATHS = {  # name: (crop to lungs, batch, channels_last, engine)
    "naive: every whole slice, batch 1": (False, 1, False, "torch"),
    "+ lung slices only, of the scan region": (True, 1, False, "torch"),
    "+ batches of 4, channels_last (default)": (True, 4, True, "torch"),
    "+ ONNX Runtime for the convolutions": (True, 4, False, "onnx"),
}


def make_pipeline(checkpoint: Path, batch: int, engine: str, channels_last: bool) -> Pipeline:
    """The checkpoint's pipeline (with its second stage, if it has one) on one path's settings."""
    pipeline = Pipeline.from_checkpoint(checkpoint, "cpu", batch_size=batch, engine=engine)
    pipeline.detector = Detector.from_checkpoint(ckpt_io.load(checkpoint), "cpu", batch, engine, channels_last)
    return pipeline


def run_scan(pipeline: Pipeline, path: Path, crop: bool) -> tuple[ScanResult, float]:
    """The pipeline on one scan file (the naive path: every whole slice); and the read's seconds."""
    t = time.perf_counter()
    volume: CTVolume = read_ct(path)
    read_s = time.perf_counter() - t
    if crop:
        return pipeline.run_volume(volume), read_s
    whole = ScanRegion((0, 0, 0), volume.hu.shape, tuple(range(volume.hu.shape[0])))
    return pipeline.run(volume.hu, volume.geometry, whole), read_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("runs/phantom-ccapm/best.pt"))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--cache-scans", type=int, default=4)
    p.add_argument("--no-quality", action="store_true", help="skip part 2")
    add_glibc_malloc_option(p)
    args = p.parse_args()
    if not args.checkpoint.is_file():
        sys.exit(f"{args.checkpoint}: train it first (noduledet train configs/phantom-cpu.yaml)")
    print(f"machine: {machine_line()}\nmodel: {args.checkpoint}\n{malloc_line(args.glibc_malloc)}")  # as predict runs
    shapes = shape_library()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        scan = make_scan(1, 0, args.size, shapes, slices=args.slices)
        print(f"phantom scan {scan.volume.hu.shape} generated in {time.perf_counter() - t:.1f} s")
        write_ct(scan.volume, tmp / "scan.mhd")
        rows = []
        for name, (crop, batch, cl, engine) in PATHS.items():
            pipeline = make_pipeline(args.checkpoint, batch, engine, cl)
            run_scan(pipeline, tmp / "scan.mhd", crop)  # warm-up
            result, read_s = run_scan(pipeline, tmp / "scan.mhd", crop)
            rows.append((name, {"read_s": read_s, **result.timings}, len(result.region.lung_slices)))
        print(f"\n### the pipeline on one {args.size}x{args.size}x{args.slices} scan (seconds)\n")
        keys = ("read_s", "lung_mask_s", "slice_preparation_s", "detector_s", "merge_3d_s", "proposer_s", "blobs_s",
                "stage2_s")
        print("| path | slices | " + " | ".join(k[:-2].replace("_", " ") for k in keys) + " | total | ms per slice |")
        print("|---|---:|" + "---:|" * (len(keys) + 2))
        for name, tm, n in rows:
            total = sum(tm.get(k, 0) for k in ("read_s", "lung_mask_s", "slices_and_detector_s", "merge_3d_s",
                                                "proposer_s", "blobs_s", "stage2_s"))
            print(f"| {name} | {n} | " + " | ".join(f"{tm.get(k, 0):.2f}" for k in keys)
                  + f" | **{total:.1f}** | {1000 * tm['detector_s'] / n:.0f} |")

        if not args.no_quality:
            quality(args.checkpoint, tmp)

        root = tmp / "luna"
        for i in range(args.cache_scans):
            s = make_scan(2, i, args.size, shapes)
            write_ct(s.volume, root / "subset0" / f"{s.uid}.mhd")
        write_findings(root / "annotations.csv", Findings.empty())
        print(f"\n### prepare: {args.cache_scans} scans of {args.size}x{args.size}\n")
        print("| workers | seconds | scans per minute |\n|---:|---:|---:|")
        for workers in (1, 2):
            t = time.perf_counter()
            prepare(root, tmp / f"cache{workers}", workers=workers)
            dt = time.perf_counter() - t
            print(f"| {workers} | {dt:.1f} | {60 * args.cache_scans / dt:.1f} |")


def quality(checkpoint: Path, tmp: Path) -> None:
    """CPM of the naive and cropped paths; mAP and CPM of both engines, on the run's test scans."""
    run = checkpoint.parent
    data = Luna16(ckpt_io.load(checkpoint).config.data.root)
    test = read_splits(run)["test"]
    print(f"\n### quality on the {len(test)} held-out phantom scans of {run}\n")
    print("| path | slice mAP (nodule slices) | CPM | detector seconds |\n|---|---:|---:|---:|")
    for name in list(PATHS)[:2]:
        crop, batch, cl, engine = PATHS[name]
        pipeline = make_pipeline(checkpoint, batch, engine, cl)
        cands, seconds = {}, 0.0
        for uid in test:
            result, _ = run_scan(pipeline, data.scan_path(uid), crop)
            cands[uid] = result.candidates
            seconds += result.timings.get("detector_s", 0)
        r = froc(data.annotations(), data.excluded(), candidates_table(cands), test, bootstrap=0)
        print(f"| {name} | | {r.cpm:.3f} | {seconds:.0f} |")
    for name in list(PATHS)[2:]:
        _, batch, _, engine = PATHS[name]
        t = time.perf_counter()
        rep = evaluate(checkpoint, tmp / f"eval-{engine}", overrides={"batch_size": batch, "engine": engine,
                                                                       "bootstrap": 0}, force=True)
        print(f"| {name} (noduledet evaluate) | {rep['slice_metrics_nodule_slices']['ap50']:.4f} | "
              f"{rep['froc']['cpm']:.3f} | {time.perf_counter() - t:.0f} (whole evaluation) |")


if __name__ == "__main__":
    main()
