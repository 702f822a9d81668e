"""Every picture noduledet draws, on ``matplotlib.figure.Figure`` objects.

No pyplot and no backend switch: a notebook's inline backend is left alone, and nothing holds
global figure state. Each function draws one figure and writes it to ``path`` (PNG).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Circle

# HU black to white: W1500/L-600, how radiologists read lung nodules (every picture, the viewer)
LUNG_WINDOW = (-1350.0, 150.0)


def _save(fig: Figure, path: str | Path, dpi: int) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def _png_pixel(fig: Figure, ax, xy) -> tuple[int, int]:
    """The (row, col) of the saved PNG (a figure made at the dpi it is saved with) where data
    point ``xy`` of ``ax`` is drawn."""
    col, up = ax.transData.transform(xy)
    return int(fig.bbox.height - up), int(col)


def training_curves(runs: dict[str, list[dict]], keys: list[tuple[str, str]], path: str | Path,
                    title: str = "") -> None:
    """One panel per (key, label), one line per run, over epochs."""
    fig = Figure(figsize=(4.6 * len(keys), 3.6))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, (key, label) in zip(axes, keys):
        for name, rows in runs.items():
            pts = [(r["epoch"], r[key]) for r in rows if key in r and np.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, lw=1.4, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[-1].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path, 100)


def froc(fps: np.ndarray, sens: np.ndarray, rates, at: np.ndarray, ci: tuple[np.ndarray, np.ndarray] | None,
         labels, path: str | Path, title: str) -> None:
    """A FROC curve on a log2 false-positives-per-scan axis with its operating points (and CIs)."""
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    keep = fps > 0
    ax.plot(fps[keep], sens[keep], color="tab:blue", lw=1.5, label=f"CPM {np.mean(at):.3f}")
    yerr = None if ci is None else [at - ci[0], ci[1] - at]
    ax.errorbar(rates, at, yerr=yerr, fmt="o", color="tab:red", ms=4, capsize=3,
                label=f"{labels[0]} ... {labels[-1]} FP/scan" + ("" if ci is None else " (95% CI)"))
    ax.set_xscale("log", base=2)
    ax.set_xlim(rates[0] / 1.5, rates[-1] * 1.5)
    ax.set_xticks(rates, labels)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    _save(fig, path, 110)


def precision_recall(precision: np.ndarray, recall: np.ndarray, path: str | Path, title: str) -> None:
    """A precision-recall curve."""
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    ax.plot(recall, precision, lw=1.5)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _save(fig, path, 110)


def candidate(plane_hu: np.ndarray, spacing_xy, centre_xy, radius_mm: float, title: str, path: str | Path,
              zoom_mm: float = 60.0) -> list[tuple[int, int]]:
    """An axial slice in a lung window, whole and zoomed, with a circle around a finding.

    Args:
        plane_hu: (H, W) HU.
        spacing_xy: pixel size (x, y) mm.
        centre_xy: the finding's centre in pixel coordinates.

    Returns:
        The (row, col) of the PNG where the finding's centre lies, in the whole and the zoomed panel.
    """
    sx, sy = spacing_xy
    x, y = centre_xy
    fig = Figure(figsize=(9, 4.6), dpi=90)
    axes = fig.subplots(1, 2)
    for ax, zoom in zip(axes, (False, True)):
        ax.imshow(plane_hu, cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1], aspect=sy / sx,
                  extent=(0, plane_hu.shape[1], plane_hu.shape[0], 0))
        ax.add_patch(Circle((x, y), (radius_mm + 3) / sx, fill=False, color="#ff3b30", lw=1.4))
        if zoom:
            hx, hy = zoom_mm / 2 / sx, zoom_mm / 2 / sy
            ax.set_xlim(x - hx, x + hx)
            ax.set_ylim(y + hy, y - hy)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    _save(fig, path, 90)
    return [_png_pixel(fig, ax, (x, y)) for ax in axes]


def slice_grid(panels: list[tuple[np.ndarray, tuple[float, float], float, str]], path: str | Path,
               columns: int = 4) -> list[tuple[int, int]]:
    """Axial slices in a lung window, each with a circle: (plane HU, centre (x, y) px, radius px,
    title); returns the (row, col) of the PNG where each circle's centre lies."""
    rows = (len(panels) + columns - 1) // columns
    fig = Figure(figsize=(4 * columns, 4 * rows), dpi=80)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, (plane, (x, y), r, title) in zip(axes, panels):
        ax.imshow(plane, cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1],
                  extent=(0, plane.shape[1], plane.shape[0], 0))
        ax.add_patch(Circle((x, y), r, fill=False, color="red", lw=1.2))
        ax.set_title(title, fontsize=9)
    _save(fig, path, 80)
    return [_png_pixel(fig, ax, centre) for ax, (_, centre, _, _) in zip(axes, panels)]

