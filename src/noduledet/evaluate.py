"""``noduledet evaluate``: a checkpoint over held-out scans, both metric families.

Slice level (the paper's metrics) on two slice sets: the slices that cut a nodule (the paper's
test set holds "images of lung nodules" only) and every lung slice (what a reader meets).
Scan level: per-slice detections merged into 3D candidates, scored with the LUNA16 FROC/CPM.

Outputs (written to a temporary folder, renamed when complete): ``metrics.json``,
``metrics.md``, ``candidates.csv`` (LUNA16 format), ``froc.png``, ``pr.png``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from noduledet.config import Config, config_from_dict
from noduledet.data.cache import CacheSettings, SliceCache, cache_ready, prepare
from noduledet.data.luna16 import Findings, Luna16, write_findings
from noduledet.data.slices import slice_targets
from noduledet.errors import UserError
from noduledet.inference import Detector, load_checkpoint
from noduledet.merge import Candidate, merge_slices
from noduledet.metrics.coco import pr_curve, slice_metrics
from noduledet.metrics.froc import FP_RATES, FrocResult, froc, plot_froc
from noduledet.staging import staged_dir


def choose_scans(cache: SliceCache, checkpoint: Path, subsets: list[int] | None, split: str | None) -> tuple[list[str], str]:
    """The scans to evaluate and how they were chosen."""
    if subsets:
        uids = [u for u in cache.uids if cache.subset(u) in subsets]
        return uids, f"LUNA16 subsets {subsets}"
    splits_path = checkpoint.parent / "splits.json"
    if split and split != "all" and splits_path.is_file():
        splits = json.loads(splits_path.read_text())
        uids = [u for u in splits.get(split, []) if u in set(cache.uids)]
        if uids:
            return uids, f"the run's {split} split ({splits_path})"
    return list(cache.uids), "every scan of the cache"


def detect_scans(detector: Detector, cache: SliceCache, uids: list[str], progress=None) -> dict[str, list]:
    """Per-slice detections on every lung slice of each scan (crop frame)."""
    out = {}
    for uid in progress(uids) if progress else uids:
        out[uid] = detector.detect(cache.volume(uid), cache.geometry(uid), cache.meta(uid)["lung_slices"])
    return out


def candidates_table(candidates: dict[str, list[Candidate]], max_per_scan: int = 100) -> Findings:
    """All scans' candidates as LUNA16 rows (seriesuid, world x, y, z, probability)."""
    rows = [(u, c) for u, cs in candidates.items() for c in cs[:max_per_scan]]
    return Findings(np.array([u for u, _ in rows], dtype=str), np.array([c.world_xyz for _, c in rows]).reshape(-1, 3),
                    np.array([c.probability for _, c in rows]))


def evaluate(checkpoint: str | Path, out: str | Path, data: str | Path | None = None, cache: str | Path | None = None,
             subsets: list[int] | None = None, split: str | None = "test", overrides: dict | None = None,
             force: bool = False, device: str = "auto", progress=None) -> dict:
    """Evaluate ``checkpoint`` and write the report to ``out``.

    Args:
        data: LUNA16-layout folder (default: the run's ``data.root``).
        cache: prepared cache of ``data`` (default: the run's; prepared under ``out`` when it
            belongs to other data).
        subsets: evaluate these LUNA16 subsets; else the run's ``split`` ("test", "val",
            "train" or "all").
        overrides: ``EvalConfig`` fields (score_threshold, iou_threshold, link_mm, ...).
    """
    from noduledet import engine

    checkpoint, out = Path(checkpoint), Path(out)
    ckpt = load_checkpoint(checkpoint)
    cfg: Config = config_from_dict(ckpt["config"], f"{checkpoint} (its config)")
    for k, v in (overrides or {}).items():
        if not hasattr(cfg.eval, k):
            raise UserError(f"unknown evaluation option {k!r}")
        setattr(cfg.eval, k, v)
    e = cfg.eval
    data_root = Path(data or cfg.data.root)
    if not str(data_root):
        raise UserError("no data: pass --data (the run's config names none)")
    luna = Luna16(data_root)
    detector = Detector.from_checkpoint(checkpoint, device, e.batch_size, e.engine)
    engine.init_distributed(detector.device)
    rank, world = engine.dist_info()
    with staged_dir(out, force, owner=rank == 0) as tmp:
        cache_dir = Path(cache or cfg.data.cache or tmp / "cache")
        manifest = cache_dir / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text()).get("data_root") != str(data_root.resolve()):
            cache_dir = tmp / "cache"  # the run's cache belongs to other data
        if rank == 0 and not cache_ready(cache_dir):
            prepare(data_root, cache_dir, CacheSettings(), progress=progress)
        if world > 1:
            engine.dist.barrier()
        sc = SliceCache(cache_dir)
        uids, chosen = choose_scans(sc, checkpoint, subsets, split)
        if not uids:
            raise UserError(f"no scans to evaluate ({chosen})")
        t0 = time.perf_counter()
        parts = engine.gather(detect_scans(detector, sc, uids[rank::world], progress if rank == 0 else None))
        seconds = time.perf_counter() - t0
        if rank != 0:
            return {}
        dets = {u: d for part in parts for u, d in part.items()}
        report = _report(tmp, checkpoint, ckpt, cfg, luna, sc, uids, chosen, dets, seconds, detector.masks)
        shutil.rmtree(tmp / "cache", ignore_errors=True)  # a cache made just for this evaluation
    return report


def _report(tmp: Path, checkpoint: Path, ckpt: dict, cfg: Config, luna: Luna16, sc: SliceCache, uids: list[str],
            chosen: str, dets: dict, seconds: float, masks: bool) -> dict:
    """Both metric families from the detections; the report files written into ``tmp``."""
    e = cfg.eval
    n_slices = sum(len(d) for d in dets.values())
    preds, targets, positive = [], [], []
    for uid in uids:
        g, vol = sc.geometry(uid), sc.volume(uid)
        rows, cols = slice(0, vol.shape[1]), slice(0, vol.shape[2])
        nodules = sc.nodules(uid)
        for d in dets[uid]:
            t = slice_targets(nodules, d.z, g.spacing, rows, cols, masks=masks, min_section=cfg.data.min_section)
            p = {"boxes": d.boxes, "scores": d.scores}
            if d.masks is not None:
                p["masks"] = d.masks
            preds.append(p)
            targets.append(t)
            positive.append(len(t["boxes"]) > 0)
    pos = [i for i, ok in enumerate(positive) if ok]
    on_nodules = slice_metrics([preds[i] for i in pos], [targets[i] for i in pos], e.score_threshold, e.iou_threshold)
    on_lungs = slice_metrics(preds, targets, e.score_threshold, e.iou_threshold)
    candidates = {u: merge_slices(dets[u], sc.geometry(u), e.link_mm, e.min_score) for u in uids}
    table = candidates_table(candidates, e.max_candidates)
    result = froc(luna.annotations(), luna.excluded(), table, uids, e.max_candidates, e.bootstrap)
    report = {
        "checkpoint": str(checkpoint), "variant": ckpt["variant"], "epoch": ckpt.get("epoch"),
        "data": str(luna.root), "scans": len(uids), "scans_chosen": chosen,
        "slices": n_slices, "seconds": seconds, "ms_per_slice": 1000 * seconds / max(n_slices, 1),
        "slice_metrics_nodule_slices": on_nodules, "slice_metrics_all_lung_slices": on_lungs,
        "froc": result.to_dict(), "eval": cfg.eval.__dict__,
    }
    write_findings(tmp / "candidates.csv", table, "probability")
    (tmp / "metrics.json").write_text(json.dumps(report, indent=1, default=float))
    (tmp / "metrics.md").write_text(markdown_report(report, result))
    plot_froc(result, tmp / "froc.png", f"FROC: {ckpt['variant']}")
    plot_pr([preds[i] for i in pos], [targets[i] for i in pos], tmp / "pr.png", e.iou_threshold,
            f"PR on nodule slices: {ckpt['variant']}")
    return report


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.4f}"


def markdown_report(report: dict, result: FrocResult) -> str:
    a, b = report["slice_metrics_nodule_slices"], report["slice_metrics_all_lung_slices"]
    lines = [
        f"# Evaluation: {report['variant']}",
        "",
        f"Checkpoint `{report['checkpoint']}` (epoch {report['epoch']}), data `{report['data']}`: "
        f"{report['scans']} scans ({report['scans_chosen']}), {report['slices']} lung slices, "
        f"{report['ms_per_slice']:.0f} ms per slice.",
        "",
        f"## Slice level (score >= {a['score_threshold']}, IoU >= {a['iou_threshold']})",
        "",
        "| slices | mAP (AP@0.5) | AP@[.5:.95] | AP@0.1 | Recall | Precision | F1 | Jaccard |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in (("with a nodule (the paper's protocol)", a), ("all lung slices", b)):
        lines.append(f"| {name} ({m['slices']}) | {_fmt(m['ap50'])} | {_fmt(m['ap'])} | {_fmt(m['ap10'])} | "
                     f"{_fmt(m['recall'])} | {_fmt(m['precision'])} | {_fmt(m['f1'])} | {_fmt(m['jaccard'])} |")
    if np.isfinite(a.get("jaccard_mask", np.nan)):
        lines += ["", f"Mask Jaccard (matched nodules): {_fmt(a['jaccard_mask'])}."]
    lines += ["", f"## Scan level: LUNA16 FROC ({result.nodules} nodules, {result.detected} hit by a candidate)", "",
              "| FP/scan | " + " | ".join(["1/8", "1/4", "1/2", "1", "2", "4", "8"]) + " | CPM |",
              "|---|" + "---:|" * (len(FP_RATES) + 1),
              "| sensitivity | " + " | ".join(f"{s:.3f}" for s in result.sensitivities) + f" | **{result.cpm:.3f}** |"]
    if np.isfinite(result.ci_low).all():
        lines.append("| 95% CI | " + " | ".join(f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(result.ci_low, result.ci_high))
                     + f" | {result.cpm_ci[0]:.3f}-{result.cpm_ci[1]:.3f} |")
    return "\n".join(lines) + "\n"


def plot_pr(preds: list[dict], targets: list[dict], path: Path, iou: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precision, recall = pr_curve(preds, targets, iou)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot(recall, precision, lw=1.5)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
