"""Which nodules reach stage two, and through which source: stage one, the 3D proposer, the blob filter.

Stage two can only rank what its pool holds (``Pipeline.pool``). For every annotated nodule of a
prepared cache this says which sources' candidates hit it (the FROC's test: within its radius);
the table gives, for all nodules, each size and, where the data record them (``--data`` holding
``annotations_kinds.csv``), each location and texture, how many the pool holds and how many each
source alone would, with the pool's size per scan. When the pool holds most nodules and the CPM
is still low, the ranking of stage two is what to improve, not the pool::

    python benchmarks/candidate_pool.py --checkpoint runs/x/best.pt --cache data/foreign-cache --data data/foreign
    python benchmarks/candidate_pool.py --checkpoint runs/x/best.pt --cache data/phantom-cache --split test --candidates 150
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from noduledet.data.cache import SliceCache
from noduledet.data.kinds import KINDS_CSV, kinds_of, read_kinds
from noduledet.data.luna16 import Findings, Luna16
from noduledet.errors import UserError
from noduledet.fpr import scan_findings
from noduledet.metrics.froc import hits, kind_groups, size_groups
from noduledet.pipeline import SOURCES, Pipeline


def nodule_rows(pipeline: Pipeline, cache: SliceCache, uids: list[str]) -> tuple[list[dict], list[int]]:
    """Per nodule {"uid", "xyz", "diameter", "sources": the sources whose candidates hit it}, and
    the pool's size per scan."""
    stage1 = Pipeline(pipeline.detector, replace(pipeline.settings, max_candidates=pipeline.config.stage2.candidates),
                      pipeline.config, proposer=pipeline.proposer)
    rows, sizes = [], []
    for uid in uids:
        hu, g, region = cache.volume(uid), cache.geometry(uid), cache.region(uid)
        pool = stage1.pool(hu, g, region, stage1.run(hu, g, region).candidates) if region.lung_slices else []
        sizes.append(len(pool))
        nodules, _ = scan_findings(cache, uid)
        on = hits([c.world_xyz for c in pool], nodules)  # (pool, nodules)
        for j in range(len(nodules)):
            found = {s for i in np.nonzero(on[:, j])[0] for s in pool[i].sources}
            rows.append({"uid": uid, "xyz": nodules.xyz[j], "diameter": float(nodules.value[j]), "sources": found})
    return rows, sizes


def pool_table(rows: list[dict], groups: dict[str, np.ndarray]) -> list[dict]:
    """Per group of nodules (label -> bool over ``rows``): how many, how many the pool holds, and
    how many each source's candidates hit."""
    out = []
    for label, inside in groups.items():
        members = [r for r, keep in zip(rows, inside) if keep]
        out.append({"group": label, "nodules": len(members), "pool": sum(bool(r["sources"]) for r in members),
                    **{s: sum(s in r["sources"] for r in members) for s in SOURCES}})
    return out


def row_groups(rows: list[dict], kinds: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """All nodules, each size bin and, with ``kinds`` (per row), each location and texture."""
    groups = {"all": np.ones(len(rows), dtype=bool), **size_groups(np.array([r["diameter"] for r in rows]))}
    return {**groups, **(kind_groups(kinds) if kinds is not None else {})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a trained run's best.pt")
    p.add_argument("--cache", type=Path, required=True, help="a prepared cache (noduledet prepare, or evaluate's --cache)")
    p.add_argument("--data", type=Path, help="the cache's data folder: its annotations_kinds.csv gives the table by kind")
    p.add_argument("--split", choices=["all", "train", "val", "test"], default="all",
                   help="the scans: all of the cache, or a split of the run (splits.json beside the checkpoint)")
    p.add_argument("--candidates", type=int, help="stage one's candidates in the pool (default: the run's stage2.candidates)")
    p.add_argument("--peaks", type=int, help="the proposer's peaks in the pool (default: the run's proposer.candidates)")
    p.add_argument("--blobs", type=int, help="the blob filter's spots in the pool (default: the run's stage2.blobs)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        pipeline = Pipeline.from_checkpoint(args.checkpoint, "cpu", stage2=False)
        c = pipeline.config
        c.stage2 = replace(c.stage2, candidates=c.stage2.candidates if args.candidates is None else args.candidates,
                           blobs=c.stage2.blobs if args.blobs is None else args.blobs)
        c.proposer = replace(c.proposer, candidates=c.proposer.candidates if args.peaks is None else args.peaks)
        cache = SliceCache(args.cache)
        uids = cache.uids
        if args.split != "all":
            splits_path = args.checkpoint.parent / "splits.json"
            if not splits_path.is_file():
                raise UserError(f"{splits_path}: no such file, so no {args.split} split (use --split all)")
            uids = [u for u in json.loads(splits_path.read_text())[args.split] if u in set(cache.uids)]
        kinds_path = Luna16(args.data).csv_path(KINDS_CSV, required=False) if args.data else None
        rows, sizes = nodule_rows(pipeline, cache, uids)
        kinds = None
        if kinds_path is not None:
            found = [(r["uid"], r["xyz"], r["diameter"]) for r in rows]
            table = Findings(np.array([u for u, _, _ in found], dtype=str), np.array([x for _, x, _ in found]).reshape(-1, 3),
                             np.array([d for _, _, d in found]), "the cache's nodules")
            kinds = kinds_of(table, read_kinds(kinds_path))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    c = pipeline.config
    proposer = f"{c.proposer.candidates} proposer peaks" if pipeline.proposer is not None else "no proposer"
    print(f"{args.checkpoint}, {len(uids)} scans of {args.cache} ({args.split}): stage one's {c.stage2.candidates} "
          f"candidates, {proposer}, {c.stage2.blobs} blob spots; pool per scan {np.mean(sizes):.0f} on average, "
          f"{max(sizes, default=0)} at most\n")
    print("| nodules | n | in the pool | " + " | ".join(f"by {s}" for s in SOURCES) + " |\n|---|---:|---:|"
          + "---:|" * len(SOURCES))
    for r in pool_table(rows, row_groups(rows, kinds)):
        print(f"| {r['group']} | {r['nodules']} | {r['pool']} | " + " | ".join(str(r[s]) for s in SOURCES) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
