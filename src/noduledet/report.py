"""Reports a person opens: markdown beside PNGs, and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import numpy as np


def number(v, digits: int = 3) -> str:
    """A metric as printed: ``digits`` decimals, or n/a when undefined."""
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


SLICE_COLUMNS = (("ap50", "mAP (AP@0.5)"), ("ap_paper", "AP (eq 25)"), ("ap", "AP@[.5:.95]"), ("ap10", "AP@0.1"),
                 ("recall", "Recall"), ("precision", "Precision"), ("f1", "F1"), ("jaccard", "Jaccard"),
                 ("jaccard_set", "Jaccard (eq 26)"))


def slice_table(rows: list[tuple[str, dict]]) -> list[str]:
    """Markdown lines of the slice-level metrics, one row per (label, ``slice_metrics`` result)."""
    lines = ["| slices | " + " | ".join(h for _, h in SLICE_COLUMNS) + " |",
             "|---|" + "---:|" * len(SLICE_COLUMNS)]
    for label, m in rows:
        lines.append(f"| {label} ({m['slices']}) | " + " | ".join(number(m[k]) for k, _ in SLICE_COLUMNS) + " |")
    return lines


def group_table(rows: list[dict], what: str) -> list[str]:
    """Markdown lines of the sensitivity by group (``FrocResult.to_dict()["by_size"]`` or
    ``["by_kind"]``), with the nodules stage two's pool held when known; ``what`` heads the first column."""
    from noduledet.metrics.froc import fp_label

    if not rows:
        return []
    rates, pool = rows[0]["fp_rates"], "in_pool" in rows[0]
    lines = [f"| {what} | nodules | " + ("in the pool | " if pool else "")
             + " | ".join(f"sensitivity at {fp_label(r)} FP/scan" for r in rates) + " |",
             "|---|---:|" + ("---:|" if pool else "") + "---:|" * len(rates)]
    for r in rows:
        lines.append(f"| {r['group']} | {r['nodules']} | " + (f"{r['in_pool']} | " if pool else "")
                     + " | ".join(number(v) for v in r["sensitivity"]) + " |")
    return lines


def froc_table(froc: dict) -> list[str]:
    """Markdown lines of a FROC result (``FrocResult.to_dict()``): sensitivity at each rate, CPM, CIs."""
    from noduledet.metrics.froc import fp_label

    labels = [fp_label(r) for r in froc["fp_rates"]]
    lines = ["| FP/scan | " + " | ".join(labels) + " | CPM |", "|---|" + "---:|" * (len(labels) + 1),
             "| sensitivity | " + " | ".join(number(v) for v in froc["sensitivities"]) + f" | **{number(froc['cpm'])}** |"]
    if np.isfinite(froc["ci95_low"]).all():
        lines.append("| 95% CI | " + " | ".join(f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(froc["ci95_low"], froc["ci95_high"]))
                     + f" | {froc['cpm_ci95'][0]:.3f}-{froc['cpm_ci95'][1]:.3f} |")
    return lines


_IMG = re.compile(r"!\[([^\]]*)\]\(([^)]+\.png)\)")


def scan_level_lines(report: dict) -> list[str]:
    """Markdown of an evaluation's scan level: stage one beside both stages, the FROC, the
    sensitivity by size and the calibrated operating points (``evaluate``'s report dict)."""
    from noduledet.metrics.froc import fp_label

    f, lines = report["froc"], []
    if "froc_stage1" in report:
        lines += [f"Stage one alone: CPM {number(report['froc_stage1']['cpm'])}; with the 3D false-positive "
                  f"reduction (below): CPM {number(f['cpm'])}.", ""]
    lines += [*froc_table(f), "", "Sensitivity by nodule size:", "", *group_table(f["by_size"], "nodule size")]
    if f.get("by_kind"):
        lines += ["", "Sensitivity by nodule location and texture (annotations_kinds.csv):", "",
                  *group_table(f["by_kind"], "nodule kind")]
    if report.get("operating_points"):
        lines += ["", "Operating points (a threshold and the findings per scan at most, calibrated on the validation "
                  "scans, applied here):", "",
                  "| calibrated for FP/scan | threshold | findings per scan at most | FP/scan here | sensitivity here |",
                  "|---:|---:|---:|---:|---:|",
                  *[f"| {fp_label(p['fp_rate_validation'])} | {p['threshold']:.3f} | {p.get('max_findings') or 'no limit'} | "
                    f"{p['fp_per_scan']:.2f} | {number(p['sensitivity'])} |" for p in report["operating_points"]]]
    return lines


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
