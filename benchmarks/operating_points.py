"""How many false positives per held-out scan the calibrated operating points give.

A run's operating points are thresholds read off its validation scans; what a reader meets is
what they give on scans the run never saw. For each checkpoint this runs both stages over its
validation scans and its held-out scans (its test split, or every scan of ``--held-out-cache``),
sets the thresholds for 1/2, 1, 2 and 4 false positives per scan from the validation scans by
two rules, and prints the false positives per held-out scan and the sensitivity each gives:

- ``calibrated``: the k-th most probable validation false positive's probability
  (``noduledet.metrics.froc.calibrated_thresholds``, what training stores);
- ``lowest``: just above the (k+1)-th, the lowest threshold passing k there (``thresholds_at``,
  what training stored before);
- ``limited``: ``calibrated``, and on each held-out scan at most as many findings as the busiest
  validation scan had at that threshold (``calibrated_max_findings``, what training stores now).

All pass k = floor(R x validation scans) validation false positives (fewer on ties); ``lowest``
expects one more per validation set on new scans; ``limited`` changes nothing on the validation
scans and shortens a held-out scan's list where far more candidates pass than on any of them.
With several checkpoints (seeds), the mean and std over them follow::

    python benchmarks/operating_points.py --checkpoint runs/s0/best.pt runs/s1/best.pt runs/s2/best.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from noduledet.data.cache import SliceCache
from noduledet.errors import UserError
from noduledet.fpr import stage_outcomes
from noduledet.metrics.froc import (OPERATING_RATES, ScanOutcome, at_thresholds, calibrated_max_findings,
                                     calibrated_thresholds, limited, thresholds_at)
from noduledet.pipeline import Pipeline
from noduledet.records import read_splits

RULES = {"calibrated": calibrated_thresholds, "lowest": thresholds_at}


def realized(validation: list[ScanOutcome], held_out: list[ScanOutcome], listed: tuple[list, list],
             rates=OPERATING_RATES) -> dict[str, list[dict]]:
    """Per rule, per rate: the threshold from ``validation`` and the false positives per scan and
    sensitivity it gives on ``held_out`` (``listed``: the validation and held-out scans'
    probabilities of the candidates each lists)."""
    thresholds = {name: rule(validation, rates) for name, rule in RULES.items()}
    rows = {name: [{"rate": r, **row} for r, row in zip(rates, at_thresholds(held_out, thresholds[name]))]
            for name in RULES}
    calibrated = thresholds["calibrated"]
    rows["limited"] = [{"rate": r, **at_thresholds(limited(held_out, listed[1], most), [t])[0],
                        "max_findings": most}
                       for r, t, most in zip(rates, calibrated, calibrated_max_findings(listed[0], calibrated))]
    return rows


def measure(checkpoint: Path, held_out_cache: Path | None) -> dict[str, list[dict]]:
    """Both stages of ``checkpoint`` on its validation and held-out scans; ``realized`` of them."""
    pipeline = Pipeline.from_checkpoint(checkpoint, "cpu")
    if pipeline.classifier is None:
        raise UserError(f"{checkpoint}: no second stage, so no operating points to calibrate")
    splits = read_splits(checkpoint.parent)
    if not splits.get("val"):
        raise UserError(f"{checkpoint}: the run has no validation scans to calibrate on")
    cache = SliceCache(pipeline.config.data.cache)
    other = SliceCache(held_out_cache) if held_out_cache else cache
    held_out = other.uids if held_out_cache else splits.get("test", [])
    if not held_out:
        raise UserError(f"{checkpoint}: the run has no test scans; give --held-out-cache")
    _, validation, val_listed = stage_outcomes(pipeline, cache, splits["val"])
    _, scored, listed = stage_outcomes(pipeline, other, held_out)
    return realized(validation, scored, (val_listed, listed))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, nargs="+", required=True,
                   help="trained runs' best.pt (several: seeds)")
    p.add_argument("--held-out-cache", type=Path,
                   help="score on every scan of this prepared cache instead of the test split")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = []
    for ckpt in args.checkpoint:
        try:
            runs.append(measure(ckpt, args.held_out_cache))
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{ckpt}: held-out {args.held_out_cache or 'test split'}")
        for name, rows in runs[-1].items():
            print(f"  {name:10s} " + "  ".join(f"{r['rate']:g} FP: {r['fp_per_scan']:.2f} at {r['sensitivity']:.3f}"
                                             + (f" (at most {r['max_findings']})" if "max_findings" in r else "")
                                             for r in rows))
    if len(runs) > 1:
        print(f"\nfalse positives per held-out scan, mean ± std over {len(runs)} runs (sensitivity)\n")
        print("| rule | " + " | ".join(f"{r:g} FP/scan" for r in OPERATING_RATES) + " |")
        print("|---|" + "---:|" * len(OPERATING_RATES))
        for name in runs[0]:
            fp = np.array([[r["fp_per_scan"] for r in run[name]] for run in runs])
            sens = np.array([[r["sensitivity"] for r in run[name]] for run in runs])
            print(f"| {name} | " + " | ".join(f"{m:.2f} ± {s:.2f} ({v:.3f})" for m, s, v in
                                              zip(fp.mean(0), fp.std(0, ddof=1), sens.mean(0))) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
