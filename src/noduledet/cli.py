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
