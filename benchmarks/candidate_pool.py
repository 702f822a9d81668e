"""Which nodules reach stage two: stage one's candidates and the blob filter's spots, by count.

Stage two can only rescore what it is shown. For every annotated nodule of a prepared cache this
says whether one of stage one's ``--candidates`` most probable candidates hits it (the FROC's
test: within its radius), and otherwise where the first of the blob filter's spots on it ranks; the table then
gives how many nodules the pool holds with 0, 50, 100, ... spots. When the pool holds most
nodules and the CPM is still low, the ranking of stage two is what to improve, not the pool::

    python benchmarks/candidate_pool.py --checkpoint runs/x/best.pt --cache data/foreign-cache
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from noduledet.blobs import find_blobs
from noduledet.data.cache import SliceCache
from noduledet.errors import UserError
from noduledet.fpr import scan_findings
from noduledet.metrics.froc import hits
from noduledet.pipeline import Pipeline

SPOTS = (0, 50, 100, 200, 300)
SMALL_MM = 6.0


def nodule_rows(pipeline: Pipeline, cache: SliceCache, uids: list[str], candidates: int,
                spots: int) -> list[tuple[float, bool, int | None]]:
    """(diameter mm, among stage one's candidates, rank of the first blob spot on it or None) per nodule."""
    stage1 = Pipeline(pipeline.detector, replace(pipeline.settings, max_candidates=candidates), pipeline.config)
    rows = []
    for uid in uids:
        hu, g = cache.volume(uid), cache.geometry(uid)
        found = stage1.run(hu, g, cache.region(uid)).candidates
        blobs = find_blobs(hu, g, spots, found)
        nodules, _ = scan_findings(cache, uid)
        in_stage1 = hits([c.world_xyz for c in found], nodules).any(axis=0)
        on_blob = hits([c.world_xyz for c in blobs], nodules)  # (spots, nodules), strongest spot first
        for j, d in enumerate(nodules.value):
            ranks = np.nonzero(on_blob[:, j])[0]
            rows.append((float(d), bool(in_stage1[j]), int(ranks[0]) if len(ranks) else None))
    return rows


def pool_table(rows: list[tuple[float, bool, int | None]], counts=SPOTS) -> list[dict]:
    """How many nodules (and of them < 6 mm) the pool holds with each count of blob spots."""
    out = []
    for k in counts:
        held = [one or (rank is not None and rank < k) for _, one, rank in rows]
        small = [h for (d, _, _), h in zip(rows, held) if d < SMALL_MM]
        out.append({"spots": k, "held": sum(held), "nodules": len(rows), "small_held": sum(small), "small": len(small)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a trained run's best.pt")
    p.add_argument("--cache", type=Path, required=True, help="a prepared cache (noduledet prepare, or evaluate's --cache)")
    p.add_argument("--candidates", type=int, default=300, help="stage one's most probable candidates (stage2.candidates)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        pipeline = Pipeline.from_checkpoint(args.checkpoint, "cpu", stage2=False)
        cache = SliceCache(args.cache)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = nodule_rows(pipeline, cache, cache.uids, args.candidates, max(SPOTS))
    print(f"{args.checkpoint}, {len(cache.uids)} scans of {args.cache}, stage one's {args.candidates} candidates\n")
    print("| blob spots | nodules held | of them < 6 mm |\n|---:|---:|---:|")
    for r in pool_table(rows):
        print(f"| {r['spots']} | {r['held']}/{r['nodules']} | {r['small_held']}/{r['small']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
