"""``noduledet compare``: the paper's Tables 3 and 4 under one protocol.

Every variant of a table trains on the same data, the same scan split and the same budget
(epochs, batch, learning rate), once per seed, and is evaluated on the same held-out scans:
mAP, Recall, Jaccard and F1 as the paper (slices with a nodule), plus the LUNA16 CPM, the
parameters, GFLOPs and CPU milliseconds per slice. With several seeds the table gives
mean ± standard deviation, so that a difference can be told from noise. The curves of
validation mAP and Recall over epochs are the paper's Figures 5 (Table 3) and 6 (Table 4).

Finished runs are kept: running the command again resumes where it stopped.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from noduledet.config import load_config
from noduledet.errors import UserError
from noduledet.staging import atomic_write, write_text
from noduledet.models.detector import TABLES, same_network

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
METRICS = (("map", "mAP"), ("recall", "Recall"), ("jaccard", "Jaccard"), ("f1", "F1"), ("cpm", "CPM"))
FIGURE = {3: 5, 4: 6}


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


def _prepare_data(out: Path, data: str, cache: str | Path | None, scans: int, log, progress) -> tuple[Path, Path, str]:
    """The data root (a phantom generated in ``out`` for "phantom"), its prepared cache, and a
    line naming it."""
    from noduledet.config import DataConfig
    from noduledet.data.cache import cache_ready, prepare
    from noduledet.data.phantom import write_dataset

    if data == "phantom":
        root = out / "data"
        if not (root / "phantom.json").exists():
            log(f"phantom: {scans} scans of 256x256 pixels -> {root}")
            write_dataset(root, scans, seed=0, size=256, workers=2, diameters=(5.0, 30.0), force=True, progress=progress)
        source = f"phantom ({scans} generated scans, 256x256 px; not clinical data)"
    else:
        root, source = Path(data), str(data)
    cache = Path(cache or out / "cache")
    if not cache_ready(cache):
        prepare(root, cache, DataConfig(), workers=2, progress=progress)
    return root, cache, source


def _train_and_evaluate(run: Path, cfg, epochs: int, label: str, log) -> dict:
    """Train ``cfg`` into ``run`` unless done, evaluate its best checkpoint unless done; the report."""
    from noduledet import engine
    from noduledet.evaluate import evaluate

    if _run_complete(run, epochs):
        log(f"{label}: already trained")
    else:
        log(f"{label}: training {epochs} epochs")
        engine.train(cfg, resume=(run / "last.pt").is_file(), force=True, log=log)
    report_dir = run / "eval"
    if (report_dir / "metrics.json").is_file():
        return json.loads((report_dir / "metrics.json").read_text())
    return evaluate(run / "best.pt", report_dir, overrides={"bootstrap": 0}, force=True)


def run_compare(table: int, out: str | Path, data: str = "phantom", cache: str | Path | None = None,
                epochs: int = 8, seeds: tuple[int, ...] = (0,), preset: str = "tiny", scans: int = 32,
                profile_size: int = 512, overrides: tuple[str, ...] = (), variants: tuple[str, ...] = (),
                log=print, progress=None) -> dict:
    """Train and evaluate every variant of ``table`` (or only ``variants``); write
    ``table<N>.md/.csv`` and the figure."""
    from noduledet.data.luna16 import Luna16
    from noduledet.runfolder import read_metrics

    rows_of = _check_rows(table, variants)
    if data != "phantom":
        Luna16(data)  # a wrong path fails here, before OUT is made
    shared = {v: same_network(v, preset) for v in rows_of if same_network(v, preset) != v}  # trained once
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root, cache, source = _prepare_data(out, data, cache, scans, log, progress)
    results: dict[str, list[dict]] = {}
    curves: dict[str, list[list[dict]]] = {}
    for seed in seeds:
        for variant in rows_of:
            network = shared.get(variant, variant)
            run = out / "runs" / f"{network}-s{seed}"
            cfg = load_config(None, [f"data.root={root}", f"data.cache={cache}", f"model.variant={network}",
                                     f"model.preset={preset}", f"train.out={run}", f"train.epochs={epochs}",
                                     f"train.seed={seed}", "data.split_seed=0", *overrides])
            if network != variant:
                log(f"{variant} seed {seed}: the same network as {network} at preset {preset}; using its run")
            report = _train_and_evaluate(run, cfg, epochs, f"{network} seed {seed}", log)
            m = report["slice_metrics_nodule_slices"]
            results.setdefault(variant, []).append({"map": m["ap50"], "recall": m["recall"], "jaccard": m["jaccard"],
                                                    "f1": m["f1"], "cpm": report["froc"]["cpm"]})
            curves.setdefault(variant, []).append(read_metrics(run / "metrics.csv"))
            r = results[variant][-1]
            log(f"{variant} seed {seed}: " + ", ".join(f"{label} {r[k]:.3f}" for k, label in METRICS))
    splits = json.loads((out / "runs" / f"{shared.get(rows_of[0], rows_of[0])}-s{seeds[0]}" / "splits.json").read_text())
    protocol = (f"Data: {source}. The same split for every row ({len(splits['train'])} training, {len(splits['val'])} "
                f"validation, {len(splits['test'])} test scans; split seed 0), {epochs} epochs, preset `{preset}`, "
                f"seeds {list(seeds)}.")
    return _finish(out, table, rows_of, results, curves, source, protocol, seeds, preset, profile_size, shared)


def _finish(out: Path, table: int, rows_of: list[str], results: dict, curves: dict, source: str, protocol: str,
            seeds, preset: str, profile_size: int, shared: dict) -> dict:
    """The table's rows (metrics mean and std over seeds, cost, the paper's values), figure and files."""
    from noduledet.models.profile import profile_variant
    from noduledet.plots import training_curves

    rows = []
    for variant in rows_of:
        prof = profile_variant(variant, preset, profile_size, repeats=2)
        row = {"variant": variant, "seeds": len(results[variant]),
               "params_m": prof["params"] / 1e6, "gflops": prof["gflops"], "ms": prof["ms"]}
        for k, _ in METRICS:
            values = np.array([r[k] for r in results[variant]], dtype=float)
            values = values[np.isfinite(values)]  # e.g. Jaccard without a single match
            row[k], row[f"{k}_std"] = (float(values.mean()), float(values.std())) if len(values) else (np.nan, np.nan)
        for (k, _), v in zip(METRICS[:4], PAPER[table][variant]):
            row[f"paper_{k}"] = v
        rows.append(row)
    figure = out / f"figure{FIGURE[table]}.png"
    training_curves({v: _mean_curve(c) for v, c in curves.items()},
                    [("val_ap50", "validation mAP"), ("val_recall", "validation recall")], figure,
                    f"Figure {FIGURE[table]}: mAP and Recall over epochs ({source})")
    _write_table(out / f"table{table}", table, rows, protocol, seeds, preset, profile_size, figure.name, shared)
    return {"rows": rows, "figure": str(figure)}


def _mean_curve(runs: list[list[dict]]) -> list[dict]:
    n = min(len(r) for r in runs)
    def mean(values):
        values = [v for v in values if np.isfinite(v)]
        return float(np.mean(values)) if values else float("nan")

    return [{"epoch": runs[0][i]["epoch"], **{k: mean([r[i].get(k, np.nan) for r in runs]) for k in ("val_ap50", "val_recall")}}
            for i in range(n)]


def _write_table(stem: Path, table: int, rows: list[dict], protocol: str, seeds, preset: str,
                 profile_size: int, figure: str, shared: dict[str, str]) -> None:
    keys = ["variant", "seeds"] + [x for k, _ in METRICS for x in (k, f"{k}_std")] + \
           ["params_m", "gflops", "ms"] + [f"paper_{k}" for k, _ in METRICS[:4]]
    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k]) for k in keys})

    atomic_write(stem.with_suffix(".csv"), write_csv)
    pm = "" if len(seeds) == 1 else " (mean ± std over seeds)"
    lines = [f"# Table {table} reproduced{pm}", "",
             f"{protocol} Metrics on the test scans' slices with a nodule (the paper's protocol); CPM "
             f"(LUNA16 FROC) on the same scans. Cost per {profile_size}x{profile_size} slice on this machine's CPU.",
             "",
             "| variant | mAP | Recall | Jaccard | F1 | CPM | params (M) | GFLOPs | ms | paper mAP | paper Recall | paper Jaccard | paper F1 |",
             "|---|" + "---:|" * 12]

    def cell(r, k):
        v, s = r[k], r[f"{k}_std"]
        return "n/a" if not np.isfinite(v) else (f"{v:.3f}" if len(seeds) == 1 else f"{v:.3f} ± {s:.3f}")

    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(cell(r, k) for k, _ in METRICS)
                     + f" | {r['params_m']:.2f} | {r['gflops']:.2f} | {r['ms']:.0f} | "
                     + " | ".join(f"{r[f'paper_{k}']:.4f}" for k, _ in METRICS[:4]) + " |")
    lines += ["", "The paper's columns are as printed (LUNA16, its own protocol; Jaccard and F1 converted from "
                  "percent). Numbers measured on the phantom are not comparable with them.", "",
              *[f"`{v}` is the same network as Table 3's `{n}` at preset `{preset}` (whose carrier is that ResNet): "
                f"its row is that run." for v, n in shared.items()], *([""] if shared else []),
              f"![Figure {FIGURE[table]}]({figure})", ""]
    write_text(stem.with_suffix(".md"), "\n".join(lines))
