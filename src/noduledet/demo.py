"""``noduledet demo``: the whole job on generated data, ending in a report a person opens.

phantom dataset -> cache -> train the CPU model -> evaluate (slice metrics and FROC/CPM on the
held-out scans) -> predict on two held-out scans -> ``report.html`` (self-contained) and
``report.md`` with the pictures. About 9 minutes on a 2-core CPU with the defaults. The data
are phantoms: the numbers show the software at work, not clinical performance.
"""

from __future__ import annotations

import json
import shutil
import time
from functools import partial
from pathlib import Path

import numpy as np

from noduledet.config import load_config
from noduledet.errors import UserError

DEMO_SIZE = 256  # default in-plane pixels of the phantom scans (about 1.4 mm per pixel)
DEMO_DIAMETERS = (5.0, 30.0)


def run_demo(out: str | Path = "demo-output", seed: int = 0, scans: int = 40, epochs: int = 10,
             size: int = DEMO_SIZE, force: bool = False, log=partial(print, flush=True), progress=None) -> Path:
    """Run every stage into ``out``; return the path of ``report.html``."""
    from noduledet import engine
    from noduledet.data.cache import prepare
    from noduledet.data.luna16 import Luna16
    from noduledet.data.phantom import write_dataset
    from noduledet.evaluate import evaluate
    from noduledet.models.profile import profile_variant
    from noduledet.predict import predict

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out}: exists; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}

    def stage(name: str, number: int):
        log(f"[{number}/6] {name}")
        return time.perf_counter()

    t = stage(f"phantom: {scans} scans of {size}x{size} pixels", 1)
    write_dataset(out / "data", scans, seed=seed, size=size, workers=2, diameters=DEMO_DIAMETERS, progress=progress)
    stages["phantom"] = time.perf_counter() - t

    t = stage("prepare: lung masks and the cache", 2)
    prepare(out / "data", out / "cache", workers=2, progress=progress)
    stages["prepare"] = time.perf_counter() - t

    t = stage(f"train: ccapm, tiny preset, {epochs} epochs on the CPU", 3)
    cfg = load_config(None, [f"data.root={out / 'data'}", f"data.cache={out / 'cache'}", f"train.out={out / 'run'}",
                             f"train.epochs={epochs}", f"train.seed={seed}", f"data.split_seed={seed}"])
    result = engine.train(cfg, progress=progress is not None)
    stages["train"] = time.perf_counter() - t

    t = stage("evaluate: held-out scans, slice metrics and LUNA16 FROC", 4)
    best = out / "run" / "best.pt"
    report = evaluate(best, out / "eval", progress=progress)
    stages["evaluate"] = time.perf_counter() - t

    t = stage("predict: two held-out scans", 5)
    data = Luna16(out / "data")
    test = json.loads((out / "run" / "splits.json").read_text())["test"]
    annotations = data.annotations()
    chosen = [u for u in test if len(annotations.for_scan(u))][:2] or test[:2]
    summaries = predict([data.scan_path(u) for u in chosen], best, out / "predict", top=3, log=None)
    stages["predict"] = time.perf_counter() - t

    t = stage("report", 6)
    profile = profile_variant(cfg.model.variant, cfg.model.preset, size, repeats=1)
    path = write_report(out, cfg, result, report, summaries, annotations, stages, profile, seed, scans, epochs, size)
    stages["report"] = time.perf_counter() - t
    log(f"report: {path} (and {out / 'report.md'}); total {sum(stages.values()) / 60:.1f} min")
    return path


def write_report(out: Path, cfg, result: dict, report: dict, summaries: list[dict], annotations, stages: dict,
                 profile: dict, seed: int, scans: int, epochs: int, size: int) -> Path:
    from noduledet.metrics.froc import FP_RATES, hits
    from noduledet.report import markdown_to_html, plot_curves, read_metrics_csv

    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    rows = read_metrics_csv(out / "run" / "metrics.csv")
    plot_curves({cfg.model.variant: rows}, [("loss", "training loss"), ("val_ap50", "validation mAP (AP@0.5)"),
                                            ("val_recall", "validation recall")], figures / "training.png")
    shutil.copy(out / "eval" / "froc.png", figures / "froc.png")
    shutil.copy(out / "eval" / "pr.png", figures / "pr.png")
    a, b, f = report["slice_metrics_nodule_slices"], report["slice_metrics_all_lung_slices"], report["froc"]
    splits = json.loads((out / "run" / "splits.json").read_text())

    def fmt(v):
        return "n/a" if not np.isfinite(v) else f"{v:.3f}"

    best_epoch = max(rows, key=lambda r: r.get("val_ap50", -1))["epoch"]
    md = [
        "# noduledet demo report",
        "",
        f"**Phantom data.** {scans} generated chest CT scans ({size}x{size} pixels, about {0.71 * 512 / size:.1f} mm "
        f"per pixel, nodules {DEMO_DIAMETERS[0]:g}-{DEMO_DIAMETERS[1]:g} mm). These numbers show the software at work; "
        "they are not clinical results and not comparable with LUNA16 numbers.",
        "",
        "## Setup",
        "",
        "| item | value |",
        "|---|---|",
        f"| data | {len(splits['train'])} training, {len(splits['val'])} validation, {len(splits['test'])} test scans (split by scan, seed {seed}) |",
        f"| model | `{cfg.model.variant}` (tiny preset: ResNet-18 carrier at a quarter width, CCAPM attention in every block, FPN, Faster R-CNN), "
        f"{profile['params'] / 1e6:.2f} M parameters, {profile['gflops']:.2f} GFLOPs per {size}x{size} slice |",
        f"| training | {epochs} epochs, {cfg.train.batch_size} patches of {cfg.data.patch} px per step, AdamW lr {cfg.train.lr:g}, "
        f"{stages['train'] / 60:.1f} min on the CPU; best validation mAP {result['best']:.3f} at epoch {best_epoch} |",
        f"| inference | {report['ms_per_slice']:.0f} ms per lung slice ({report['slices']} slices of {report['scans']} test scans) |",
        "",
        "## Results on the held-out scans",
        "",
        f"Slice level (score >= {a['score_threshold']}, IoU >= {a['iou_threshold']}):",
        "",
        "| slices | mAP | AP@[.5:.95] | Recall | Precision | F1 | Jaccard |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| with a nodule, the paper's protocol ({a['slices']}) | {fmt(a['ap50'])} | {fmt(a['ap'])} | {fmt(a['recall'])} | "
        f"{fmt(a['precision'])} | {fmt(a['f1'])} | {fmt(a['jaccard'])} |",
        f"| all lung slices ({b['slices']}) | {fmt(b['ap50'])} | {fmt(b['ap'])} | {fmt(b['recall'])} | {fmt(b['precision'])} | "
        f"{fmt(b['f1'])} | {fmt(b['jaccard'])} |",
        "",
        f"Scan level, LUNA16 FROC ({f['nodules']} nodules in {f['scans']} scans, {f['detected']} hit by a candidate):",
        "",
        "| FP per scan | " + " | ".join(["1/8", "1/4", "1/2", "1", "2", "4", "8"]) + " | CPM |",
        "|---|" + "---:|" * (len(FP_RATES) + 1),
        "| sensitivity | " + " | ".join(f"{s:.3f}" for s in f["sensitivities"]) + f" | **{f['cpm']:.3f}** |",
        "",
        "![Training loss and validation mAP and recall per epoch](figures/training.png)",
        "",
        "![FROC curve of the held-out scans (LUNA16 rules)](figures/froc.png)",
        "",
        "![Precision-recall on the held-out slices with a nodule](figures/pr.png)",
        "",
        "## Predictions on two held-out scans",
        "",
    ]
    for s in summaries:
        truth = annotations.for_scan(s["name"])
        cands = json.loads((out / "predict" / f"{s['name']}.json").read_text())["candidates"]
        md += [f"Scan `{s['name']}`: {s['status']} in {s['seconds']:.1f} s. Reference nodules: "
               + (", ".join(f"{d:.1f} mm at ({x:.0f}, {y:.0f}, {z:.0f})" for (x, y, z), d in zip(truth.xyz, truth.value))
                  or "none") + ".", ""]
        md += ["| rank | probability | world x, y, z (mm) | diameter | hits a reference nodule |", "|---|---:|---|---:|---|"]
        for k, c in enumerate(cands[:3]):
            hit = hits(c["world_xyz"], truth).any()  # the FROC's rule: within the nodule's radius
            md.append(f"| {k + 1} | {c['probability']:.3f} | {', '.join(f'{v:.1f}' for v in c['world_xyz'])} | "
                      f"{c['diameter_mm']:.1f} mm | {'yes' if hit else 'no'} |")
        md.append("")
        for k in range(min(3, len(cands))):
            png = f"predict/{s['name']}_top{k + 1}.png"
            md += [f"![Candidate {k + 1} of {s['name']} (lung window, the right panel zoomed)]({png})", ""]
    md += ["## Time", "", "| stage | seconds |", "|---|---:|"]
    md += [f"| {k} | {v:.0f} |" for k, v in stages.items()]
    md += ["", "## Reproduce", "", "```",
           f"noduledet demo -o {out} --seed {seed} --scans {scans} --epochs {epochs} --size {size}",
           f"noduledet evaluate --checkpoint {out}/run/best.pt -o {out}/eval --force",
           "```", ""]
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    page = out / "report.html"
    page.write_text(markdown_to_html(text, out, "noduledet demo report"))
    return page
