"""``noduledet compare``: the paper's Tables 3 and 4 under one protocol, with paired verdicts.

Every variant of a table trains on the same data, the same scan split and the same budget
(epochs, batch, learning rate), once per seed, and is evaluated on the same held-out scans:
mAP, the paper's AP (eq 25), Recall, Jaccard (matched boxes and the paper's eq 26), F1 (slices
with a nodule, the paper's protocol), the LUNA16 CPM, parameters, GFLOPs and CPU milliseconds
per slice. With several seeds the table gives mean ± standard deviation.

Protocol (``--neck``): ``paper`` builds Table 3's rows on "ResNet as carrier" without the pyramid
(the ResNet C4 detector) and Table 4's on "the pyramid model", with VGG as the single-map Fast
R-CNN it names; ``fpn`` builds every row on the pyramid. The second stage is left out: the
tables compare the detector the paper describes.

Which differences are real: every row against the baseline (``res``; ``resnet18`` in Table 4)
gets the paired difference of CPM and of the paper's AP with a 95% bootstrap interval over the
held-out scans and the seeds (``metrics.paired``: the same scans and seeds for both rows) and a
verdict: better, worse or not distinguishable. The curves of validation mAP and Recall over
epochs are the paper's Figures 5 (Table 3) and 6 (Table 4).

Finished runs are kept: running the command again resumes where it stopped.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from noduledet.config import load_config
from noduledet.errors import UserError
from noduledet.models.detector import TABLES, paper_neck, same_network
from noduledet.records import read_splits
from noduledet.staging import atomic_write, write_text

# As printed in Zhao, Zhao & Ahn 2024 (LUNA16; Jaccard and F1 in percent there, fractions here).
PAPER = {
    3: {"res": (0.7765, 0.4542, 0.7816, 0.7972), "res-se": (0.7785, 0.4655, 0.7859, 0.8023),
        "res-coord": (0.7239, 0.4284, 0.7387, 0.7533), "res-eca": (0.7452, 0.4281, 0.7527, 0.7737),
        "res-cbam": (0.6524, 0.4187, 0.6707, 0.6836), "resscblock": (0.8328, 0.4575, 0.8411, 0.8202),
        "ccasm": (0.8351, 0.4572, 0.8467, 0.8531), "ccapm": (0.8421, 0.4599, 0.8556, 0.8643)},
    4: {"vgg16": (0.6164, 0.3820, 0.6703, 0.6792), "resnet18": (0.7615, 0.4403, 0.7723, 0.7789),
        "resnet50": (0.7915, 0.4522, 0.7913, 0.8012), "efficientnet-b0": (0.7322, 0.4211, 0.7418, 0.7561),
        "mobilenet-v3-large": (0.6457, 0.3879, 0.6478, 0.6502), "resscblock": (0.8308, 0.4565, 0.8323, 0.8387),
        "ccasm": (0.8238, 0.4542, 0.8239, 0.8315), "ccapm": (0.8468, 0.4632, 0.8467, 0.8578)},
}
PAPER_KEYS = ("map", "recall", "jaccard", "f1")  # the order of PAPER's values
METRICS = (("map", "mAP"), ("ap_paper", "AP (eq 25)"), ("recall", "Recall"), ("jaccard", "Jaccard"),
           ("jaccard_set", "Jaccard (eq 26)"), ("f1", "F1"), ("cpm", "CPM"))
SLICE_KEYS = {"map": "ap50", "ap_paper": "ap_paper", "recall": "recall", "jaccard": "jaccard",
              "jaccard_set": "jaccard_set", "f1": "f1"}
BASELINE = {3: "res", 4: "resnet18"}
FIGURE = {3: 5, 4: 6}
NECKS = ("paper", "fpn")


def _run_complete(run: Path, epochs: int) -> bool:
    from noduledet import checkpoint

    last = run / "last.pt"
    return last.is_file() and checkpoint.load(last).epoch >= epochs


def _check_rows(table: int, variants: tuple[str, ...]) -> list[str]:
    if table not in TABLES:
        raise UserError(f"--table {table}: choose 3 or 4")
    unknown = sorted(set(variants) - set(TABLES[table]))
    if unknown:
        raise UserError(f"variant(s) {unknown} are not in Table {table}: {list(TABLES[table])}")
    return [v for v in TABLES[table] if not variants or v in variants]


def _prepare_data(out: Path, data: str, cache: str | Path | None, scans: int, size: int, log,
                  progress) -> tuple[Path, Path, str]:
    """The data root (a phantom generated in ``out`` for "phantom"), its prepared cache, and a
    line naming it."""
    from noduledet.config import DataConfig
    from noduledet.data.cache import cache_ready, prepare
    from noduledet.data.phantom import write_dataset

    if data == "phantom":
        root = out / "data"
        if not (root / "phantom.json").exists():
            log(f"phantom: {scans} scans of {size}x{size} pixels -> {root}")
            write_dataset(root, scans, seed=0, size=size, workers=2, force=True, progress=progress)
        source = f"phantom ({scans} generated scans, {size}x{size} px; not clinical data)"
    else:
        root, source = Path(data), str(data)
    cache = Path(cache or out / "cache")
    if not cache_ready(cache):
        prepare(root, cache, DataConfig(), workers=2, progress=progress)
    return root, cache, source


def _train_and_evaluate(run: Path, cfg, epochs: int, label: str, log) -> tuple[dict, dict]:
    """Train ``cfg`` into ``run`` unless done, evaluate its best checkpoint unless done; the
    evaluation's report and per-scan results."""
    from noduledet import engine
    from noduledet.evaluate import evaluate

    if _run_complete(run, epochs):
        log(f"{label}: already trained")
    else:
        log(f"{label}: training {epochs} epochs")
        engine.train(cfg, resume=(run / "last.pt").is_file(), force=True, log=log)
    report_dir = run / "eval"
    if not (report_dir / "per_scan.json").is_file():
        evaluate(run / "best.pt", report_dir, overrides={"bootstrap": 0}, force=True)
    return (json.loads((report_dir / "metrics.json").read_text()),
            json.loads((report_dir / "per_scan.json").read_text()))


def run_compare(table: int, out: str | Path, data: str = "phantom", cache: str | Path | None = None,
                epochs: int = 8, seeds: tuple[int, ...] = (0,), preset: str = "tiny", scans: int = 32,
                size: int = 512, neck: str = "paper", profile_size: int = 512, overrides: tuple[str, ...] = (),
                variants: tuple[str, ...] = (), log=print, progress=None) -> dict:
    """Train and evaluate every variant of ``table`` (or only ``variants``) with every seed; write
    ``table<N>.md/.csv`` and the figure."""
    from noduledet.data.luna16 import Luna16

    rows_of = _check_rows(table, variants)
    if neck not in NECKS:
        raise UserError(f"--neck {neck!r}; choose from {list(NECKS)}")
    if data != "phantom":
        Luna16(data)  # a wrong path fails here, before OUT is made
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root, cache, source = _prepare_data(out, data, cache, scans, size, log, progress)
    necks = {v: paper_neck(table, v) if neck == "paper" else "fpn" for v in rows_of}
    runs = {v: f"{same_network(v, preset)}-{necks[v]}" for v in rows_of}  # one run per network and neck
    results: dict[str, list[tuple[dict, dict]]] = {}
    for seed in seeds:
        for v in rows_of:
            run = out / "runs" / f"{runs[v]}-s{seed}"
            cfg = load_config(None, [f"data.root={root}", f"data.cache={cache}", f"model.variant={runs[v].rsplit('-', 1)[0]}",
                                     f"model.preset={preset}", f"model.options={{neck: {necks[v]}}}", f"train.out={run}",
                                     f"train.epochs={epochs}", f"train.seed={seed}", "data.split_seed=0",
                                     "stage2.enabled=false", *overrides])
            results.setdefault(v, []).append(_train_and_evaluate(run, cfg, epochs, f"{runs[v]} seed {seed}", log))
            r = _metrics(results[v][-1][0])
            log(f"{v} seed {seed}: " + ", ".join(f"{label} {r[k]:.3f}" for k, label in METRICS))
    splits = read_splits(out / "runs" / f"{runs[rows_of[0]]}-s{seeds[0]}")
    protocol = (f"Data: {source}. The same split for every row ({len(splits['train'])} training, {len(splits['val'])} "
                f"validation, {len(splits['test'])} test scans; split seed 0), {epochs} epochs, preset `{preset}`, "
                f"neck protocol `{neck}`, seeds {list(seeds)}, no second stage.")
    return _finish(out, table, rows_of, results, runs, necks, source, protocol, seeds, preset, profile_size)


def _metrics(report: dict) -> dict:
    m = report["slice_metrics_nodule_slices"]
    return {**{k: m.get(s, float("nan")) for k, s in SLICE_KEYS.items()}, "cpm": report["froc"]["cpm"]}


def _paired(rows_of: list[str], results: dict, baseline: str) -> dict[str, dict]:
    """Every row against ``baseline``: paired CPM and AP differences (``metrics.paired``)."""
    from noduledet.metrics.froc import ScanOutcome
    from noduledet.metrics.paired import ScanDetections, ap_of, paired_cpm, paired_difference

    def outcomes(per_scan: dict) -> list[ScanOutcome]:
        return [ScanOutcome(np.array([-np.inf if p is None else p for p in s["nodule_probs"]], dtype=float),
                            np.array(s["fp_probs"], dtype=float)) for _, s in sorted(per_scan.items())]

    def slices(per_scan: dict) -> list[ScanDetections]:
        return [ScanDetections(np.array(s["slice_scores"], dtype=float), np.array(s["slice_hits"], dtype=bool),
                               s["slice_boxes"]) for _, s in sorted(per_scan.items())]

    if baseline not in results:
        return {}
    base = results[baseline]
    out = {}
    for v in rows_of:
        if v == baseline:
            continue
        mine = results[v]
        out[v] = {"cpm": paired_cpm([outcomes(p) for _, p in mine], [outcomes(p) for _, p in base]),
                  "ap_paper": paired_difference("ap_paper", [slices(p) for _, p in mine],
                                                [slices(p) for _, p in base], ap_of)}
    return out


def _finish(out: Path, table: int, rows_of: list[str], results: dict, runs: dict, necks: dict, source: str,
            protocol: str, seeds, preset: str, profile_size: int) -> dict:
    """The table's rows (metrics mean and std over seeds, paired verdicts, cost, the paper's
    values), figure and files."""
    from noduledet.models.profile import profile_variant
    from noduledet.plots import training_curves
    from noduledet.runfolder import read_metrics

    paired = _paired(rows_of, results, BASELINE[table])
    rows = []
    for v in rows_of:
        prof = profile_variant(v, preset, profile_size, repeats=2, neck=necks[v])
        row = {"variant": v, "neck": necks[v], "seeds": len(results[v]), "params_m": prof["params"] / 1e6,
               "gflops": prof["gflops"], "ms": prof["ms"]}
        for k, _ in METRICS:
            values = np.array([_metrics(r)[k] for r, _ in results[v]], dtype=float)
            values = values[np.isfinite(values)]  # e.g. Jaccard without a single match
            row[k], row[f"{k}_std"] = (float(values.mean()), float(values.std())) if len(values) else (np.nan, np.nan)
        for k, value in zip(PAPER_KEYS, PAPER[table][v]):
            row[f"paper_{k}"] = value
        for metric, d in paired.get(v, {}).items():
            row.update({f"d_{metric}": d.difference, f"d_{metric}_low": d.ci_low, f"d_{metric}_high": d.ci_high,
                        f"d_{metric}_verdict": d.verdict, f"d_{metric}_scans_needed": d.scans_needed(0.05)})
        rows.append(row)
    figure = out / f"figure{FIGURE[table]}.png"
    curves = {v: _mean_curve([read_metrics(out / "runs" / f"{runs[v]}-s{s}" / "metrics.csv") for s in seeds])
              for v in rows_of}
    training_curves(curves, [("val_ap50", "validation mAP"), ("val_recall", "validation recall")], figure,
                    f"Figure {FIGURE[table]}: mAP and Recall over epochs ({source})")
    shared = {v: runs[v] for v in rows_of if runs[v].rsplit("-", 1)[0] != v}
    _write_table(out / f"table{table}", table, rows, protocol, seeds, preset, profile_size, figure.name, shared)
    return {"rows": rows, "figure": str(figure), "paired": paired}


def _mean_curve(runs: list[list[dict]]) -> list[dict]:
    n = min(len(r) for r in runs)

    def mean(values):
        values = [v for v in values if np.isfinite(v)]
        return float(np.mean(values)) if values else float("nan")

    return [{"epoch": runs[0][i]["epoch"], **{k: mean([r[i].get(k, np.nan) for r in runs]) for k in ("val_ap50", "val_recall")}}
            for i in range(n)]


def _difference_cell(r: dict, metric: str) -> str:
    if f"d_{metric}" not in r:
        return "baseline" if r.get("is_baseline") else ""
    return (f"{r[f'd_{metric}']:+.3f} [{r[f'd_{metric}_low']:+.3f}, {r[f'd_{metric}_high']:+.3f}] "
            f"{r[f'd_{metric}_verdict']}")


def _power_lines(rows: list[dict]) -> list[str]:
    """How many held-out scans these spreads would need to tell a 0.05 CPM difference from none."""
    needs = [(r["variant"], r["d_cpm_scans_needed"]) for r in rows if "d_cpm_scans_needed" in r]
    if not needs:
        return []
    said = ", ".join(f"`{v}` {n if n is not None else 'not estimable (the seeds alone are too spread, or no spread measured)'}"
                     for v, n in needs)
    return [f"Held-out scans needed for a 95% interval to exclude 0 with 80% power when the true CPM difference "
            f"is 0.05, at these per-scan and per-seed spreads and seeds: {said}.", ""]


def _write_table(stem: Path, table: int, rows: list[dict], protocol: str, seeds, preset: str,
                 profile_size: int, figure: str, shared: dict[str, str]) -> None:
    keys = ["variant", "neck", "seeds"] + [x for k, _ in METRICS for x in (k, f"{k}_std")] + \
           ["params_m", "gflops", "ms"] + [f"paper_{k}" for k in PAPER_KEYS] + \
           [f"d_{m}{s}" for m in ("cpm", "ap_paper") for s in ("", "_low", "_high", "_verdict")]

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{r[k]:.4f}" if isinstance(r.get(k), float) else r.get(k, "")) for k in keys})

    atomic_write(stem.with_suffix(".csv"), write_csv)
    pm = "" if len(seeds) == 1 else " (mean ± std over seeds)"
    base = BASELINE[table]
    lines = [f"# Table {table} reproduced{pm}", "",
             f"{protocol} Metrics on the test scans' slices with a nodule (the paper's protocol; AP eq 25 and "
             f"Jaccard eq 26 at IoU 0.5 and score 0.5); CPM (LUNA16 FROC) on the same scans. Cost per "
             f"{profile_size}x{profile_size} slice on this machine's CPU.", "",
             "| variant | neck | " + " | ".join(label for _, label in METRICS) + f" | ΔCPM vs {base} [95% CI] | "
             f"ΔAP vs {base} [95% CI] | params (M) | GFLOPs | ms | paper mAP | paper Recall | paper Jaccard | paper F1 |",
             "|---|---|" + "---:|" * len(METRICS) + "---|---|" + "---:|" * 7]

    def cell(r, k):
        v, s = r[k], r[f"{k}_std"]
        return "n/a" if not np.isfinite(v) else (f"{v:.3f}" if len(seeds) == 1 else f"{v:.3f} ± {s:.3f}")

    for r in rows:
        r["is_baseline"] = r["variant"] == base
        lines.append(f"| {r['variant']} | {r['neck']} | " + " | ".join(cell(r, k) for k, _ in METRICS)
                     + f" | {_difference_cell(r, 'cpm')} | {_difference_cell(r, 'ap_paper')}"
                     + f" | {r['params_m']:.2f} | {r['gflops']:.2f} | {r['ms']:.0f} | "
                     + " | ".join(f"{r[f'paper_{k}']:.4f}" for k in PAPER_KEYS) + " |")
    lines += ["", f"Δ: the row minus `{base}`, mean over seeds, with a 95% interval from a bootstrap of the held-out "
                  "scans and the seeds, paired (the same scans and seeds for both rows); \"not distinguishable\" when "
                  "the interval holds 0.", "",
              *_power_lines(rows), "The paper's columns are as printed (LUNA16, its own protocol; Jaccard and F1 converted from "
              "percent). Numbers measured on the phantom are not comparable with them.", "",
              *[f"`{v}` is the same network as `{n.rsplit('-', 1)[0]}` at preset `{preset}` with the same neck: "
                f"its row is that run." for v, n in shared.items()], *([""] if shared else []),
              f"![Figure {FIGURE[table]}]({figure})", ""]
    write_text(stem.with_suffix(".md"), "\n".join(lines))
