"""``noduledet demo``: the whole job on generated data, ending in a report a person opens.

phantom dataset -> cache -> train the CPU model -> evaluate (slice metrics and FROC/CPM on the
held-out scans) -> predict on two held-out scans -> ``report.html`` (self-contained) and
``report.md`` with the pictures. Everything is written into a hidden folder beside OUT that
becomes OUT when the report is done, so an interrupted demo leaves no half folder. The data are
phantoms: the numbers show the software at work, not clinical performance.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from functools import partial
from pathlib import Path

import numpy as np

from noduledet.config import Config, load_config
from noduledet.errors import UserError
from noduledet.records import read_scan_record, read_splits
from noduledet.report import markdown_to_html, scan_level_lines, slice_table
from noduledet.staging import staged_dir, write_text

DEMO_SIZE = 512  # default in-plane pixels of the phantom scans: LUNA16's, 0.5-0.95 mm pixels
DEMO_DIAMETERS = (3.0, 30.0)  # LUNA16's nodules are 3 mm and larger
STAGES = ("phantom", "prepare", "train", "evaluate", "predict", "report")
PLACED = ("data.root", "data.cache", "train.out")  # the demo puts these in OUT itself


def run_demo(out: str | Path = "demo-output", seed: int = 0, scans: int = 40, epochs: int = 10,
             size: int = DEMO_SIZE, force: bool = False, overrides: tuple[str, ...] = (),
             log=partial(print, flush=True), progress=None) -> Path:
    """Run every stage into ``out``; return the path of ``report.html``.

    ``overrides`` (``section.key=value``) change the default config after the demo's own settings,
    e.g. ``stage2.epochs=4``; the demo's folders (``PLACED``) cannot be moved."""
    out = Path(out)
    for item in overrides:
        if item.split("=", 1)[0].strip() in PLACED:
            raise UserError(f"override {item!r}: the demo places {', '.join(PLACED)} inside -o itself")
    with staged_dir(out, force) as tmp:
        cfg = load_config(None, [f"data.root={tmp / 'data'}", f"data.cache={tmp / 'cache'}", f"train.out={tmp / 'run'}",
                                 f"train.epochs={epochs}", f"train.seed={seed}", f"data.split_seed={seed}", *overrides])
        stages, results = _run_stages(tmp, cfg, seed, scans, size, log, progress)
        t = time.perf_counter()
        log(f"[{len(STAGES)}/{len(STAGES)}] report")
        _relocate(tmp, out)
        write_report(tmp, out, cfg, results, stages, seed, scans, size, overrides)
        stages["report"] = time.perf_counter() - t
    log(f"report: {out / 'report.html'} (and {out / 'report.md'}); total {sum(stages.values()) / 60:.1f} min")
    return out / "report.html"


def _run_stages(tmp: Path, cfg: Config, seed: int, scans: int, size: int, log, progress) -> tuple[dict, dict]:
    """Phantom, cache, training, evaluation and predictions in ``tmp``; their seconds and results."""
    from noduledet import engine
    from noduledet.data.cache import prepare
    from noduledet.data.luna16 import Luna16
    from noduledet.data.phantom import write_dataset
    from noduledet.evaluate import evaluate
    from noduledet.predict import PredictOptions, predict
    from noduledet.progress import reporter

    stages: dict[str, float] = {}
    results: dict = {}
    titles = {"phantom": f"phantom: {scans} scans of {size}x{size} pixels", "prepare": "prepare: lung masks and the cache",
              "train": f"train: {cfg.model.variant}, {cfg.model.preset} preset, {cfg.train.epochs} epochs",
              "evaluate": "evaluate: held-out scans, slice metrics and LUNA16 FROC", "predict": "predict: two held-out scans"}
    for number_, name in enumerate(STAGES[:-1], start=1):
        log(f"[{number_}/{len(STAGES)}] {titles[name]}")
        t = time.perf_counter()
        if name == "phantom":
            write_dataset(tmp / "data", scans, seed=seed, size=size, workers=2, diameters=DEMO_DIAMETERS, progress=progress)
        elif name == "prepare":
            prepare(tmp / "data", tmp / "cache", cfg.data, workers=2, progress=progress)
        elif name == "train":
            results["train"] = engine.train(cfg, progress=reporter("train", "batch", plain=False) if progress else None,
                                            log=log, scans=progress)
        elif name == "evaluate":
            results["evaluate"] = evaluate(tmp / "run" / "best.pt", tmp / "eval", progress=progress)
        else:
            data = Luna16(tmp / "data")
            annotations = data.annotations()
            test = read_splits(tmp / "run")["test"]
            chosen = [u for u in test if len(annotations.for_scan(u))][:2] or test[:2]
            results["predict"] = predict([data.scan_path(u) for u in chosen], tmp / "run" / "best.pt",
                                         tmp / "predict", options=PredictOptions(top=3), log=None)
            results["annotations"] = annotations
        stages[name] = time.perf_counter() - t
    return stages, results


def _relocate(tmp: Path, out: Path) -> None:
    """Point every path the run recorded from the staging folder ``tmp`` to ``out``, where it
    will be: the run's config and checkpoints, the evaluation's and predictions' records."""
    from noduledet import checkpoint

    old, new = str(tmp), str(out)
    for pt in sorted((tmp / "run").glob("*.pt")):
        ckpt = checkpoint.load(pt)
        for section, key in (("data", "root"), ("data", "cache"), ("train", "out")):
            part = getattr(ckpt.config, section)
            setattr(part, key, getattr(part, key).replace(old, new, 1))
        checkpoint.save(ckpt, pt)
    records = [tmp / "run" / "config.yaml", *(tmp / "eval").glob("metrics.*"), *(tmp / "predict").rglob("*.json")]
    for path in records:
        path.write_text(path.read_text().replace(old, new))


def _model_line(cfg: Config, params: float, gflops: float, size: int) -> str:
    from noduledet.models.detector import resolve_spec

    spec = resolve_spec(cfg.model.preset)
    head = "Mask R-CNN" if cfg.model.masks else "Faster R-CNN"
    return (f"`{cfg.model.variant}`, {cfg.model.preset} preset (ResNet-{spec.depth} carrier at width {spec.width:g}, "
            f"{spec.fpn_channels}-channel pyramid, {head}), {params / 1e6:.2f} M parameters, "
            f"{gflops:.2f} GFLOPs per {size}x{size} slice")


def write_report(tmp: Path, out: Path, cfg: Config, results: dict, stages: dict, seed: int, scans: int,
                 size: int, overrides: tuple[str, ...] = ()) -> None:
    """``report.md`` and the self-contained ``report.html`` in ``tmp`` (which becomes ``out``)."""
    from noduledet.models.profile import profile_variant
    from noduledet.plots import training_curves
    from noduledet.runfolder import read_metrics

    figures = tmp / "figures"
    figures.mkdir(exist_ok=True)
    rows = read_metrics(tmp / "run" / "metrics.csv")
    training_curves({cfg.model.variant: rows}, [("loss", "training loss"), ("val_ap50", "validation mAP (AP@0.5)"),
                                                ("val_recall", "validation recall")], figures / "training.png")
    for name in ("froc.png", "pr.png"):
        shutil.copy(tmp / "eval" / name, figures / name)
    profile = profile_variant(cfg.model.variant, cfg.model.preset, size, repeats=1)
    phantom = json.loads((tmp / "data" / "phantom.json").read_text())
    pixel = np.mean([s["spacing_xyz"][0] for s in phantom["scans"]])
    report, f = results["evaluate"], results["evaluate"]["froc"]
    a, b = report["slice_metrics_nodule_slices"], report["slice_metrics_all_lung_slices"]
    splits = read_splits(tmp / "run")
    best_epoch = max(rows, key=lambda r: r.get("val_ap50", -1))["epoch"]
    t = cfg.train
    md = [
        "# noduledet demo report", "",
        f"**Phantom data.** {scans} generated chest CT scans ({size}x{size} pixels, {pixel:.2f} mm per pixel on "
        f"average, nodules {DEMO_DIAMETERS[0]:g}-{DEMO_DIAMETERS[1]:g} mm). These numbers show the software at work; "
        "they are not clinical results and not comparable with LUNA16 numbers.", "",
        "## Setup", "", "| item | value |", "|---|---|",
        f"| data | {len(splits['train'])} training, {len(splits['val'])} validation, {len(splits['test'])} test scans "
        f"(split by scan, seed {seed}) |",
        f"| model | {_model_line(cfg, profile['params'], profile['gflops'], size)} |",
        f"| training | {t.epochs} epochs, {t.batch_size} patches of {cfg.data.patch} px per step, {t.optimizer} lr {t.lr:g}, "
        f"{stages['train'] / 60:.1f} min; best validation mAP {results['train']['best']:.3f} at epoch {best_epoch} |",
        f"| inference | {report['ms_per_slice']:.0f} ms per lung slice ({report['slices']} slices of {report['scans']} test scans) |",
        "", "## Results on the held-out scans", "",
        f"Slice level (score >= {a['score_threshold']}, IoU >= {a['iou_threshold']}):", "",
        *slice_table([("with a nodule, the paper's protocol", a), ("all lung slices", b)]), "",
        f"Scan level, LUNA16 FROC ({f['nodules']} nodules in {f['scans']} scans, {f['detected']} hit by a candidate):", "",
        *scan_level_lines(report), "",
        "![Training loss and validation mAP and recall per epoch](figures/training.png)", "",
        "![FROC curve of the held-out scans (LUNA16 rules)](figures/froc.png)", "",
        "![Precision-recall on the held-out slices with a nodule](figures/pr.png)", "",
        "## Predictions on two held-out scans", "",
        *_prediction_lines(tmp, results),
        "## Time", "", "| stage | seconds |", "|---|---:|", *[f"| {k} | {v:.0f} |" for k, v in stages.items()], "",
        "## Reproduce", "", "```",
        " ".join(["noduledet demo", "-o", str(out), "--seed", str(seed), "--scans", str(scans), "--epochs",
                  str(t.epochs), "--size", str(size), *map(shlex.quote, overrides)]),
        f"noduledet evaluate --checkpoint {out}/run/best.pt -o {out}/eval --force", "```", ""]
    text = "\n".join(md)
    write_text(tmp / "report.md", text)
    write_text(tmp / "report.html", markdown_to_html(text, tmp, "noduledet demo report"))


def _prediction_lines(tmp: Path, results: dict) -> list[str]:
    from noduledet.metrics.froc import hits

    md = []
    for s in results["predict"]:
        truth = results["annotations"].for_scan(s["name"])
        cands = read_scan_record(tmp / "predict" / s["name"])[1]
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
            md += [f"![Candidate {k + 1} of {s['name']} (lung window, the right panel zoomed)]"
                   f"(predict/{s['name']}/top{k + 1}.png)", ""]
    return md
