"""Reports a person opens: markdown beside PNGs, and one self-contained HTML page."""

from __future__ import annotations

import base64
import csv
import html
import re
from pathlib import Path

import numpy as np


def read_metrics_csv(path: Path) -> list[dict]:
    """A run's metrics.csv as rows of floats (epoch as int)."""
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v) if v not in ("", "nan") else float("nan"))
                 for k, v in row.items()} for row in csv.DictReader(f)]


def plot_curves(runs: dict[str, list[dict]], keys: list[tuple[str, str]], path: Path, title: str = "") -> None:
    """One panel per (key, label), one line per run, over epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        for name, rows in runs.items():
            pts = [(r["epoch"], r[key]) for r in rows if key in r and np.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, lw=1.4, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0][-1].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


_IMG = re.compile(r"!\[([^\]]*)\]\(([^)]+\.png)\)")


def markdown_to_html(markdown: str, root: Path, title: str) -> str:
    """A small markdown subset (headings, tables, lists, images, code, paragraphs) as one HTML page
    with every PNG embedded, so the page stands alone."""
    out, table, code = [], [], False

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        return text

    def flush_table():
        if table:
            rows = [r for r in table if not re.fullmatch(r"\|[\s:|-]+\|", r)]
            cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in cells[0]) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
                       + "</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("```"):
            flush_table()
            out.append("</pre>" if code else "<pre>")
            code = not code
            continue
        if code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        m = _IMG.fullmatch(line.strip())
        if m:
            data = base64.b64encode((root / m.group(2)).read_bytes()).decode()
            out.append(f'<figure><img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{inline(m.group(1))}</figcaption></figure>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush_table()
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
             "figure{margin:1em 0}figcaption{color:#555;font-size:90%}pre{background:#f6f6f6;padding:.8em}"
             ".note{background:#fff6d6;padding:.6em 1em;border-left:4px solid #e0b400}")
    body = "\n".join(out)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n{body}\n</body></html>\n")
