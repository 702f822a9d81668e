"""docs/results.md from the run folders that produced its numbers, so that no number is typed by hand.

``benchmarks/results.yaml`` lists what the page reports: the data to make (``make``: an output path
and the command that writes it), the rows (a set of seeds, where each seed's ``metrics.json`` lies
and the commands that write it, each with its output) and the tables (which rows, which columns, a sentence of scope).
This script reads every row's ``metrics.json`` (``noduledet evaluate``'s, which the demo writes
too), aggregates over seeds (per-seed values, mean ± std, the 95% interval over scans averaged over
seeds) and writes the page; each row names the commit its checkpoints were trained at (their
``meta.json``) and the command that remakes it. ``--rerun`` first runs the command of every
output that is missing, in the order listed; a row with no metrics at all is printed as not
measured rather than left out::

    python benchmarks/results.py --runs runs --rerun        # make what is missing, then the page
    python benchmarks/results.py --runs runs -o docs/results.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from noduledet.records import read_meta
from noduledet.staging import write_text

MANIFEST = Path(__file__).with_name("results.yaml")
# column -> (header, value of one seed's metrics.json, digits); None where the run lacks it
COLUMNS = {
    "cpm": ("CPM", lambda m: m["froc"]["cpm"], 3),
    "cpm_stage1": ("CPM, stage one alone", lambda m: (m.get("froc_stage1") or {}).get("cpm"), 3),
    "sens1": ("sensitivity at 1 FP/scan", lambda m: _at(m["froc"], 1.0), 3),
    "sens4": ("sensitivity at 4 FP/scan", lambda m: _at(m["froc"], 4.0), 3),
    "pool": ("in the pool", lambda m: m["froc"]["in_pool"] / m["froc"]["nodules"] if "in_pool" in m["froc"] else None, 3),
    "op1_fp": ("FP/scan at the 1-FP point", lambda m: _operating(m, "fp_per_scan"), 2),
    "op1_sens": ("sensitivity at the 1-FP point", lambda m: _operating(m, "sensitivity"), 3),
    "seconds_per_scan": ("s per scan (evaluate)", lambda m: m.get("seconds_per_scan"), 1),
}
GROUPS = ("3-6 mm", "6-10 mm", ">= 10 mm", "free", "pleural", "vascular", "solid", "part-solid", "ground-glass")


def _at(froc: dict, rate: float) -> float:
    return froc["sensitivities"][froc["fp_rates"].index(rate)]


def _operating(m: dict, key: str) -> float | None:
    return next((p[key] for p in m.get("operating_points") or [] if p["fp_rate_validation"] == 1.0), None)


def load_manifest(path: Path) -> dict:
    try:
        manifest = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SystemExit(f"error: {path}: {err}")
    for key in ("rows", "tables"):
        if not isinstance(manifest.get(key), dict if key == "rows" else list):
            raise SystemExit(f"error: {path}: no '{key}' section")
    for table in (t for t in manifest["tables"] if "output" not in t):
        unknown = [r for r in table["rows"] if r not in manifest["rows"]] + [
            c for c in table.get("columns", []) if c not in COLUMNS]
        if unknown:
            raise SystemExit(f"error: {path}: table {table['title']!r} names unknown rows or columns {unknown}")
    return manifest


def seed_metrics(runs: Path, row: dict) -> dict[int, dict]:
    """Seed -> its metrics.json, for the seeds whose file exists."""
    found = {}
    for seed in row["seeds"]:
        path = runs / row["metrics"].format(seed=seed)
        if path.is_file():
            found[seed] = json.loads(path.read_text())
    return found


def commits(runs: Path, metrics: dict[int, dict]) -> list[str]:
    """The commits the rows' checkpoints were trained at (stage two's too, when retrained)."""
    seen = []
    for m in metrics.values():
        run_dir = Path(m["checkpoint"]).parent
        record = read_meta(run_dir if run_dir.is_absolute() else runs / run_dir)
        for git in (record.get("git"), (record.get("stage2_retrained") or {}).get("git")):
            if git and git not in seen:
                seen.append(git)
    return seen


def aggregate(values: list[float | None]) -> tuple[list[float], float | None, float | None]:
    """The values present, their mean and (over two or more) their sample standard deviation."""
    present = [v for v in values if v is not None]
    if not present:
        return present, None, None
    return present, statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None


def cell(values: list[float | None], digits: int) -> str:
    present, mean, std = aggregate(values)
    if mean is None:
        return "-"
    spread = f" ± {std:.{digits}f}" if std is not None else ""
    per_seed = ", ".join(f"{v:.{digits}f}" for v in present)
    return f"{mean:.{digits}f}{spread} ({per_seed})" if len(present) > 1 else f"{mean:.{digits}f}"


def interval(metrics: dict[int, dict]) -> str:
    lows = [m["froc"]["cpm_ci95"][0] for m in metrics.values() if m["froc"].get("cpm_ci95")]
    highs = [m["froc"]["cpm_ci95"][1] for m in metrics.values() if m["froc"].get("cpm_ci95")]
    return f"{statistics.fmean(lows):.2f}-{statistics.fmean(highs):.2f}" if lows else "-"


def row_line(row: dict, metrics: dict[int, dict], columns: list[str], runs: Path) -> str:
    if not metrics:
        return f"| {row['what']} | not measured at this commit: `{commands(row, runs)}` |" + " |" * (len(columns) + 3)
    scans = sorted({m["froc"]["scans"] for m in metrics.values()})
    nodules = sorted({m["froc"]["nodules"] for m in metrics.values()})
    cells = [cell([COLUMNS[c][1](m) for m in metrics.values()], COLUMNS[c][2]) for c in columns]
    seeds = ", ".join(map(str, metrics))
    return (f"| {row['what']} | {seeds} | {'/'.join(map(str, scans))} scans, {'/'.join(map(str, nodules))} nodules | "
            + " | ".join(cells) + f" | {interval(metrics)} | {', '.join(commits(runs, metrics)) or '-'} |")


def group_lines(title: str, rows: list[tuple[dict, dict[int, dict]]]) -> list[str]:
    """By size and kind: nodules (each seed's sum), pool recall and sensitivities, mean over seeds."""
    lines = [f"**{title}**, by nodule size and kind (mean over seeds; pool = held by any candidate):", "",
             "| run | group | nodules (all seeds) | in the pool | sensitivity at 1 FP/scan | at 4 FP/scan |",
             "|---|---|---:|---:|---:|---:|"]
    for row, metrics in rows:
        for group in GROUPS:
            found = [g for m in metrics.values() for g in m["froc"].get("by_size", []) + m["froc"].get("by_kind", [])
                     if g["group"] == group and g["nodules"]]
            if not found:
                continue
            n = sum(g["nodules"] for g in found)
            pool = sum(g.get("in_pool", 0) for g in found) / n
            at1, at4 = (statistics.fmean(g["sensitivity"][i] for g in found) for i in (0, 1))
            lines.append(f"| {row['what']} | {group} | {n} | {pool:.2f} | {at1:.3f} | {at4:.3f} |")
    return lines


def output_lines(table: dict, runs: Path) -> list[str]:
    """A benchmark's printed output, kept as it printed it (``output``: its file and command)."""
    out, command = runs / table["output"]["out"], table["output"]["run"].replace("{runs}", str(runs))
    lines = [f"## {table['title']}", "", table.get("text", "").strip(), ""]
    if not out.is_file():
        return lines + [f"Not measured at this commit: `{command}`", ""]
    return lines + [f"`{command}`:", "", "```text", out.read_text().rstrip(), "```", ""]


def table_lines(table: dict, manifest: dict, runs: Path) -> list[str]:
    if "output" in table:
        return output_lines(table, runs)
    columns = table.get("columns", ["cpm", "cpm_stage1", "sens1", "op1_fp", "op1_sens", "pool"])
    lines = [f"## {table['title']}", "", table.get("text", "").strip(), ""]
    lines += ["| run | seeds | held-out data | " + " | ".join(COLUMNS[c][0] for c in columns)
              + " | CPM 95% CI over scans | trained at |", "|---|---|---|" + "---:|" * len(columns) + "---|---|"]
    measured = []
    for name in table["rows"]:
        row = manifest["rows"][name]
        metrics = seed_metrics(runs, row)
        lines.append(row_line(row, metrics, columns, runs))
        if metrics:
            measured.append((row, metrics))
    lines += ["", "Commands:", ""] + [f"- {manifest['rows'][n]['what']}: `{commands(manifest['rows'][n], runs)}`"
                                      for n in table["rows"]]
    if table.get("groups") and measured:
        lines += [""] + group_lines(table["title"], measured)
    return lines + [""]


def render(manifest: dict, runs: Path, commit: str) -> str:
    lines = [f"# {manifest['title']}", "", "<!-- written by benchmarks/results.py from benchmarks/results.yaml; "
             "edit those, not this page -->", "", manifest["intro"].strip().replace("{commit}", commit), ""]
    for table in manifest["tables"]:
        lines += table_lines(table, manifest, runs)
    lines += [manifest.get("outro", "").strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def commands(row: dict, runs: Path) -> str:
    """A row's commands as a reader types them: the runs folder filled in, ``{seed}`` left for each seed."""
    return " && ".join(step["run"].replace("{runs}", str(runs)) for step in row["steps"])


def rerun(manifest: dict, runs: Path) -> None:
    """Run the command of every missing output in the manifest's order: data first, then each row's
    steps seed by seed (a training shared by two rows runs once: its output then exists)."""
    todo = [(m["out"], m["run"], {}) for m in manifest.get("make", [])]
    for row in manifest["rows"].values():
        todo += [(step["out"], step["run"], {"seed": seed}) for seed in row["seeds"] for step in row["steps"]]
    todo += [(t["output"]["out"], t["output"]["run"], {"capture": True}) for t in manifest["tables"] if "output" in t]
    for out, command, fields in todo:
        capture = fields.pop("capture", False)
        out = runs / out.format(**fields)
        command = command.format(runs=runs, out=out, **fields)
        if out.exists():
            continue
        print(f"results: {command}", flush=True)
        done = subprocess.run(shlex.split(command), stdout=subprocess.PIPE if capture else None, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: {command!r} failed; {out} is not made")
        if capture:  # a benchmark's table: what it printed, written whole or not at all
            write_text(out, done.stdout)


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent)
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path("runs"), help="the folder the manifest's paths are in")
    p.add_argument("--manifest", type=Path, default=MANIFEST)
    p.add_argument("-o", "--out", type=Path, default=Path(__file__).parents[1] / "docs" / "results.md")
    p.add_argument("--rerun", action="store_true", help="first make every missing output by its command")
    args = p.parse_args(argv)
    manifest = load_manifest(args.manifest)
    if not args.runs.is_dir():
        print(f"error: {args.runs}: no such folder of runs (--runs)", file=sys.stderr)
        return 2
    if args.rerun:
        rerun(manifest, args.runs)
    page = render(manifest, args.runs, git_commit())
    write_text(args.out, page)
    print(f"results: {args.out} ({page.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
