"""Robustness: the same scans under the scanner changes another site or generator brings.

A detector trained on one phantom meets other scanners: more noise (a lower dose), another HU
calibration, a softer or sharper reconstruction kernel, thicker slices. Each change is applied to
every scan of a LUNA16-layout folder, the trained pipeline (both stages) runs on the changed scan
as ``predict`` would, and the FROC is scored against the folder's annotations. A change that
costs more CPM than the seed-to-seed spread is a weakness a new dataset may find::

    python benchmarks/robustness.py --checkpoint demo-s0/run/best.pt --data data/foreign --scans 15

The changes (``CHANGES``; fixed strengths, noise drawn from each scan's index):

- ``noise``: Gaussian noise, 30 HU smoothed in-plane (sigma 0.7 px) and doubled back up: about 25 HU of
  correlated noise added, as a lower dose brings;
- ``offset``: every voxel 50 HU brighter (a calibration error);
- ``gain``: HU times 0.9 (contrast scaled about water);
- ``smooth``: an in-plane Gaussian of 1 px (a soft kernel);
- ``sharp``: an unsharp mask, the scan plus its difference from a 1.5 px Gaussian (an edge-enhancing
  lung kernel, which also raises the noise);
- ``thick``: pairs of slices averaged into slices twice as thick (scans of at most 1.25 mm; thicker
  ones are left as they are, LUNA16's thickest being 2.5 mm), the geometry following.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from common import machine_line
from noduledet.data.ct import CTVolume, read_ct
from noduledet.data.luna16 import Luna16
from noduledet.errors import UserError
from noduledet.geometry import Geometry
from noduledet.metrics.froc import froc
from noduledet.pipeline import Pipeline, candidates_table

THICK_UP_TO_MM = 1.25


def noise(hu: np.ndarray, g: Geometry, rng: np.random.Generator) -> tuple[np.ndarray, Geometry]:
    return hu + 2.0 * ndimage.gaussian_filter(rng.normal(0, 30, hu.shape).astype(np.float32), (0, 0.7, 0.7)), g


def offset(hu: np.ndarray, g: Geometry, rng: np.random.Generator) -> tuple[np.ndarray, Geometry]:
    return hu + 50.0, g


def gain(hu: np.ndarray, g: Geometry, rng: np.random.Generator) -> tuple[np.ndarray, Geometry]:
    return hu * 0.9, g


def smooth(hu: np.ndarray, g: Geometry, rng: np.random.Generator) -> tuple[np.ndarray, Geometry]:
    return ndimage.gaussian_filter(hu, (0, 1.0, 1.0)), g


def sharp(hu: np.ndarray, g: Geometry, rng: np.random.Generator) -> tuple[np.ndarray, Geometry]:
    return 2.0 * hu - ndimage.gaussian_filter(hu, (0, 1.5, 1.5)), g


def thick(hu: np.ndarray, g: Geometry, rng: np.random.Generator) -> tuple[np.ndarray, Geometry]:
    """Slice pairs averaged; the new slice k sits midway between old slices 2k and 2k + 1."""
    if g.spacing[2] > THICK_UP_TO_MM or hu.shape[0] < 2:
        return hu, g
    n = hu.shape[0] // 2 * 2
    out = (hu[0:n:2] + hu[1:n:2]) / 2
    origin = tuple(float(v) for v in g.voxel_to_world([0.5, 0.0, 0.0]))
    return out, Geometry((g.spacing[0], g.spacing[1], 2 * g.spacing[2]), origin, g.direction, out.shape)


CHANGES = {"none": lambda hu, g, rng: (hu, g), "noise": noise, "offset": offset, "gain": gain,
           "smooth": smooth, "sharp": sharp, "thick": thick}


def changed(volume: CTVolume, name: str, index: int) -> CTVolume:
    """``volume`` under the change ``name`` (int16 HU, rounded), its noise drawn from ``index``."""
    hu, g = CHANGES[name](volume.hu.astype(np.float32), volume.geometry, np.random.default_rng(index))
    return CTVolume(np.clip(np.rint(hu), -32768, 32767).astype(np.int16), g, volume.source)


def measure(pipeline: Pipeline, data: Luna16, uids: list[str], names: list[str], log=print) -> list[dict]:
    """Per change: CPM, nodules hit by a kept candidate, sensitivity at 1 FP/scan, seconds. Each
    scan is read once and run under every change, so one scan at a time is held in memory."""
    annotations, excluded = data.annotations(), data.excluded()
    found: dict[str, dict] = {name: {} for name in names}
    seconds = dict.fromkeys(names, 0.0)
    for k, uid in enumerate(uids):
        volume = read_ct(data.scan_path(uid))
        for name in names:
            t = time.perf_counter()
            found[name][uid] = pipeline.run_volume(changed(volume, name, k)).candidates
            seconds[name] += time.perf_counter() - t
        log(f"{k + 1}/{len(uids)} scans")
    rows = []
    for name in names:
        r = froc(annotations, excluded, candidates_table(found[name]), uids, pipeline.settings.max_candidates, bootstrap=0)
        rows.append({"change": name, "cpm": r.cpm, "found": r.detected, "nodules": r.nodules,
                     "sens_1fp": float(r.sensitivities[3]), "seconds": seconds[name]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a trained run's best.pt")
    p.add_argument("--data", type=Path, required=True, help="a LUNA16-layout folder with annotations.csv")
    p.add_argument("--scans", type=int, default=15, help="the first this many scans with nodules (sorted by uid)")
    p.add_argument("--changes", default=",".join(CHANGES), help=f"comma-separated, of {', '.join(CHANGES)}")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n for n in args.changes.split(",") if n]
    unknown = [n for n in names if n not in CHANGES]
    try:
        if unknown or not names:
            raise UserError(f"--changes {args.changes!r}: choose from {', '.join(CHANGES)}")
        pipeline = Pipeline.from_checkpoint(args.checkpoint)
        data = Luna16(args.data)
        uids = sorted(set(data.annotations().uids))[: args.scans]
        if not uids:
            raise UserError(f"{args.data}: annotations.csv names no scan")
        rows = measure(pipeline, data, uids, names, log=lambda line: print(line, file=sys.stderr, flush=True))
    except UserError as err:  # a scan missing or unreadable is found while measuring: no table then
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(machine_line())
    print(f"{args.checkpoint} on {len(uids)} scans of {args.data}\n")
    base = next((r["cpm"] for r in rows if r["change"] == "none"), None)
    print("| change | CPM | against none | nodules found | sens. at 1 FP/scan | seconds |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        delta = "" if base is None else f"{r['cpm'] - base:+.3f}"
        print(f"| {r['change']} | {r['cpm']:.3f} | {delta} | {r['found']}/{r['nodules']} | {r['sens_1fp']:.3f} | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
