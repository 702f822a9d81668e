"""``noduledet evaluate``: the pipeline over held-out scans, then both metric families.

The candidates are those ``predict`` would write for the same scans (the same ``Pipeline``; the
prepared cache only serves each scan's region, made with the run's margins). Then:

- slice level (the paper's metrics) on the slices that cut a nodule (the paper's test set holds
  "images of lung nodules" only) and on every lung slice (what a reader meets);
- scan level: the candidates scored with the LUNA16 FROC/CPM, with the sensitivity by nodule
  size and, where the data record them (``annotations_kinds.csv``), by location and texture,
  each beside how many of those nodules stage two's pool held.

Outputs (written to a temporary folder, renamed when complete): ``metrics.json``,
``metrics.md``, ``candidates.csv`` (LUNA16 format), ``froc.png``, ``pr.png`` and
``per_scan.json`` (what ``compare``'s paired intervals resample).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from noduledet import plots
from noduledet.data.cache import SliceCache, cache_mismatch, cache_ready, prepare
from noduledet.data.kinds import annotation_kinds
from noduledet.data.luna16 import Luna16, write_findings
from noduledet.data.slices import slice_targets
from noduledet.distributed import barrier, gather, rank_and_world, resolve_device
from noduledet.errors import UserError
from noduledet.metrics.coco import pr_curve, slice_metrics
from noduledet.metrics.paired import scan_detections
from noduledet.metrics.froc import at_thresholds, froc, limited, max_findings, plot_froc
from noduledet.pipeline import Pipeline, ScanResult, candidates_table
from noduledet.progress import track
from noduledet.records import SPLITS, read_splits
from noduledet.report import number, scan_level_lines, slice_table
from noduledet.staging import staged_dir, write_json, write_text


def choose_scans(cache: SliceCache, checkpoint: Path, subsets: list[int] | None, split: str) -> tuple[list[str], str]:
    """The scans to evaluate and how they were chosen: the LUNA16 ``subsets``, else every scan
    (``split`` "all"), else the run's ``split`` from the ``splits.json`` beside ``checkpoint``.
    Nothing else is taken in their place: a run without that file, an empty split or one whose
    scans the data lacks is refused, naming the options that choose scans explicitly."""
    choose = "choose the scans with --subset N [N ...] or --split all (every scan of --data)"
    if subsets:
        uids = [u for u in cache.uids if cache.subset(u) in subsets]
        if not uids:
            raise UserError(f"--subset {' '.join(map(str, subsets))}: no scan of the data is in these LUNA16 subsets")
        return uids, f"LUNA16 subsets {subsets}"
    if split == "all":
        return list(cache.uids), "every scan of the data"
    path = checkpoint.parent / SPLITS
    if not path.is_file():
        raise UserError(f"{path}: missing, so the run's {split} split is unknown; {choose}")
    wanted = read_splits(checkpoint.parent)[split]
    if not wanted:
        raise UserError(f"{path}: the run's {split} split is empty; {choose}")
    missing = sorted(set(wanted) - set(cache.uids))
    if missing:
        raise UserError(f"{path}: {len(missing)} of the run's {len(wanted)} {split} scans are not in the data "
                        f"(first: {missing[0]}); pass --data with the run's data, or {choose}")
    return list(wanted), f"the run's {split} split ({path})"


def run_scans(pipeline: Pipeline, cache: SliceCache, uids: list[str], progress=None) -> dict[str, ScanResult]:
    """The pipeline on each scan's cached region."""
    return {uid: pipeline.run(cache.volume(uid), cache.geometry(uid), cache.region(uid))
            for uid in track(progress, uids)}


def open_cache(pipeline: Pipeline, luna: Luna16, cache: str | Path | None, scratch: Path, progress=None,
               log=print) -> SliceCache:
    """``cache`` when it was made from ``luna`` with the run's region settings (else refused); without
    one, the run's cache when it was so made, else a cache prepared in ``scratch`` (on rank 0, the
    others wait), saying why."""
    data_cfg = pipeline.config.data
    if cache is not None:
        if not cache_ready(cache):
            raise UserError(f"{cache}: no prepared cache (noduledet prepare {luna.root} --cache {cache}); "
                            f"or leave out --cache: one is prepared for this evaluation")
        differs = cache_mismatch(cache, data_cfg, luna)
        if differs:
            raise UserError(f"{cache}: a cache made with {', '.join(differs)}, not of {luna.root} with the run's "
                            f"region settings; leave out --cache: one is prepared for this evaluation")
        return SliceCache(cache)
    cache_dir = Path(data_cfg.cache) if data_cfg.cache else None
    if cache_dir is not None and cache_ready(cache_dir) and not cache_mismatch(cache_dir, data_cfg, luna):
        return SliceCache(cache_dir)
    if rank_and_world()[0] == 0:
        if log:
            why = ("the run names none" if cache_dir is None else f"the run's {cache_dir} is not prepared"
                   if not cache_ready(cache_dir) else
                   f"the run's {cache_dir} was made with {', '.join(cache_mismatch(cache_dir, data_cfg, luna))}")
            log(f"preparing a cache of {luna.root} for this evaluation ({why}); it is removed at the end")
        prepare(luna.root, scratch, data_cfg, progress=progress)
    barrier()
    return SliceCache(scratch)


def evaluate(checkpoint: str | Path, out: str | Path, data: str | Path | None = None, cache: str | Path | None = None,
             subsets: list[int] | None = None, split: str = "test", overrides: dict | None = None,
             force: bool = False, device: str = "auto", progress=None, log=print) -> dict:
    """Evaluate ``checkpoint`` and write the report to ``out``.

    Args:
        data: LUNA16-layout folder (default: the run's ``data.root``).
        cache: prepared cache of ``data``, refused when made of other data or with other region
            settings (default: the run's when it is of ``data``, else one is prepared in
            ``out/cache``, with a line saying why, and removed at the end).
        subsets: evaluate these LUNA16 subsets; else ``split``: "all" the scans of ``data``, or
            the run's "test", "val" or "train" split (``choose_scans``).
        log: where a line about a cache prepared here goes (rank 0), or None.
        overrides: ``EvalConfig`` fields replacing the checkpoint's (score_threshold, link_mm, ...).

    Returns:
        The report (rank 0; the other ranks return an empty dict).
    """
    checkpoint, out = Path(checkpoint), Path(out)
    pipeline = Pipeline.from_checkpoint(checkpoint, resolve_device(device), **(overrides or {}))
    data_root = data or pipeline.config.data.root
    if not str(data_root):
        raise UserError("no data: pass --data (the run's config names none)")
    luna = Luna16(data_root)
    rank, world = rank_and_world()
    with staged_dir(out, force, owner=rank == 0) as tmp:
        sc = open_cache(pipeline, luna, cache, tmp / "cache", progress, log)
        uids, chosen = choose_scans(sc, checkpoint, subsets, split)
        t0 = time.perf_counter()
        parts = gather(run_scans(pipeline, sc, uids[rank::world], progress if rank == 0 else None))
        seconds = time.perf_counter() - t0
        if rank != 0:
            return {}
        results = {u: r for part in parts for u, r in part.items()}
        report = write_report(tmp, checkpoint, pipeline, luna, sc, uids, chosen, results, seconds)
        if sc.root == tmp / "cache":
            shutil.rmtree(sc.root)  # prepared for this evaluation only
    return report


def slice_level(pipeline: Pipeline, sc: SliceCache, uids: list[str], results: dict[str, ScanResult]):
    """Per-slice predictions, targets and scan of every evaluated slice, and which slices cut a nodule."""
    masks, min_section = pipeline.detector.masks, pipeline.config.data.min_section
    preds, targets, scans = [], [], []
    for uid in uids:
        g = sc.geometry(uid)
        rows, cols = slice(0, g.shape[1]), slice(0, g.shape[2])
        nodules = sc.nodules(uid)
        for d in results[uid].detections:
            targets.append(slice_targets(nodules, d.z, g.spacing, rows, cols, masks=masks, min_section=min_section))
            preds.append({"boxes": d.boxes, "scores": d.scores, **({"masks": d.masks} if d.masks is not None else {})})
            scans.append(uid)
    positive = [i for i, t in enumerate(targets) if len(t["boxes"])]
    return preds, targets, scans, positive


def per_scan(uids: list[str], outcomes, preds: list[dict], targets: list[dict], scans: list[str], positive: list[int],
             iou: float) -> dict:
    """What a paired comparison resamples (``metrics.paired``): per scan, its FROC outcome (a
    missed nodule's probability as None) and its slices with a nodule, matched once."""
    out = {}
    for uid, o in zip(uids, outcomes):
        mine = [i for i in positive if scans[i] == uid]
        m = scan_detections([preds[i] for i in mine], [targets[i] for i in mine], iou)
        out[uid] = {"nodule_probs": [float(p) if np.isfinite(p) else None for p in o.nodule_probs],
                    "fp_probs": o.fp_probs.tolist(), "slice_scores": m.scores.tolist(),
                    "slice_hits": m.hits.astype(bool).tolist(), "slice_boxes": int(m.boxes)}
    return out


def at_operating_points(points: dict, outcomes: list, listed: list[np.ndarray]) -> list[dict]:
    """False positives per scan and sensitivity at each calibrated operating point: each scan's
    candidates at or above its threshold, at most its ``max_findings`` (``froc.limited``)."""
    return [{"fp_rate_validation": rate, **at_thresholds(limited(outcomes, listed, most), [threshold])[0],
             "max_findings": most}
            for rate, threshold, most in zip(points["fp_rates"], points["thresholds"], max_findings(points))]


def write_report(tmp: Path, checkpoint: Path, pipeline: Pipeline, luna: Luna16, sc: SliceCache, uids: list[str],
                 chosen: str, results: dict[str, ScanResult], seconds: float) -> dict:
    """Both metric families from the pipeline's results; the report files written into ``tmp``."""
    e = pipeline.settings
    preds, targets, scans, pos = slice_level(pipeline, sc, uids, results)
    on_nodules = slice_metrics([preds[i] for i in pos], [targets[i] for i in pos], e.score_threshold, e.iou_threshold)
    on_lungs = slice_metrics(preds, targets, e.score_threshold, e.iou_threshold)
    table = candidates_table({u: results[u].candidates for u in uids})
    annotations, excluded = luna.annotations(), luna.excluded()
    pool = candidates_table({u: results[u].pool or results[u].candidates for u in uids})
    result = froc(annotations, excluded, table, uids, e.max_candidates, e.bootstrap, pool=pool,
                  kinds=annotation_kinds(luna))
    stages = {}
    if pipeline.classifier is not None:  # stage one alone, beside both stages
        alone = froc(annotations, excluded, candidates_table({u: results[u].stage1 for u in uids}), uids,
                     e.max_candidates, 0)
        stages = {"froc_stage1": alone.to_dict()}
    if pipeline.operating_points:  # calibrated on the validation scans, applied to these scans
        stages["operating_points"] = at_operating_points(pipeline.operating_points, result.outcomes,
                                                         [table.for_scan(u).value for u in uids])
    variant = pipeline.detector.variant
    report = {
        "checkpoint": str(checkpoint), "variant": variant, "epoch": pipeline.epoch, "data": str(luna.root),
        "scans": len(uids),
        "scans_chosen": chosen, "slices": len(preds), "seconds": seconds,
        "ms_per_slice": 1000 * seconds / max(len(preds), 1),
        "slice_metrics_nodule_slices": on_nodules, "slice_metrics_all_lung_slices": on_lungs,
        "froc": result.to_dict(), **stages, "eval": pipeline.settings.__dict__,
        "seconds_per_scan": seconds / max(len(uids), 1),
    }
    write_findings(tmp / "candidates.csv", table, "probability")
    write_json(tmp / "metrics.json", report)
    write_json(tmp / "per_scan.json", per_scan(uids, result.outcomes, preds, targets, scans, pos, e.iou_threshold))
    write_text(tmp / "metrics.md", markdown_report(report))
    plot_froc(result, tmp / "froc.png", f"FROC: {variant}")
    precision, recall = pr_curve([preds[i] for i in pos], [targets[i] for i in pos], e.iou_threshold)
    plots.precision_recall(precision, recall, tmp / "pr.png", f"PR on nodule slices: {variant}")
    return report


def markdown_report(report: dict) -> str:
    a, b, f = report["slice_metrics_nodule_slices"], report["slice_metrics_all_lung_slices"], report["froc"]
    lines = [
        f"# Evaluation: {report['variant']}",
        "",
        f"Checkpoint `{report['checkpoint']}` (epoch {report['epoch']}), data `{report['data']}`: {report['scans']} scans "
        f"({report['scans_chosen']}), {report['slices']} lung slices, {report['ms_per_slice']:.0f} ms per slice.",
        "",
        f"## Slice level (score >= {a['score_threshold']}, IoU >= {a['iou_threshold']})",
        "",
        *slice_table([("with a nodule (the paper's protocol)", a), ("all lung slices", b)]),
    ]
    if a.get("jaccard_mask") is not None and number(a["jaccard_mask"]) != "n/a":
        lines += ["", f"Mask Jaccard (matched nodules): {number(a['jaccard_mask'], 4)}."]
    lines += ["", f"## Scan level: LUNA16 FROC ({f['nodules']} nodules, {f['detected']} hit by a candidate)", "",
              *scan_level_lines(report)]
    return "\n".join(lines) + "\n"
