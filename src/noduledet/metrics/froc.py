"""Scan-level FROC and CPM with the LUNA16 rules (Setio et al., Medical Image Analysis 2017).

- At most ``max_per_scan`` (100) candidates per scan are kept, the most probable.
- A candidate hits a nodule when its distance to the nodule's centre is below the nodule's
  radius (``diameter_mm / 2``; an excluded finding without a diameter counts as 10 mm).
- A nodule hit by several candidates counts once, with the highest probability; the other hits
  are neither true nor false positives.
- A candidate that hits no nodule of the reference but an excluded finding is ignored.
- Every other candidate is a false positive.
- Sensitivity is read off the FROC curve (sensitivity against false positives per scan, as the
  threshold falls through every probability) at 1/8, 1/4, 1/2, 1, 2, 4 and 8 FP per scan by
  linear interpolation; CPM is their mean. 95% intervals come from bootstrapping scans.

Beside the curve: the probability thresholds that give a chosen number of false positives per
scan, on the scans measured (``thresholds_at``) and expected on new scans from validation scans
(``calibrated_thresholds``: the operating points a reader is given), and the sensitivity for
nodules of each size, location and texture at such thresholds (``sensitivity_by_group``: small
nodules, those on the pleura or a vessel and ground glass are where detectors fail).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from noduledet.data.luna16 import Findings

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
EXCLUDED_DEFAULT_DIAMETER = 10.0


def fp_label(rate: float) -> str:
    """A false-positive rate as printed: 1/8, 1/4, 1/2, 1, 2, 4, 8."""
    return f"1/{round(1 / rate)}" if rate < 1 else f"{rate:g}"


FP_LABELS = tuple(fp_label(r) for r in FP_RATES)
OPERATING_RATES = (0.5, 1.0, 2.0, 4.0)  # false positives per scan a reader may be given
SIZE_BINS = ((3.0, 6.0), (6.0, 10.0), (10.0, float("inf")))  # nodule diameter, mm
SIZE_RATES = (1.0, 4.0)  # FP per scan at which sensitivity by size is reported


def size_label(lo: float, hi: float) -> str:
    return f">= {lo:g} mm" if hi == float("inf") else f"{lo:g}-{hi:g} mm"


@dataclass
class ScanOutcome:
    """Per scan: the probability of each reference nodule (-inf if missed) and of each FP."""

    nodule_probs: np.ndarray
    fp_probs: np.ndarray


@dataclass
class FrocResult:
    sensitivities: np.ndarray  # at FP_RATES
    cpm: float
    fps: np.ndarray  # the curve: FP per scan ...
    sens: np.ndarray  # ... and sensitivity at every threshold
    nodules: int
    scans: int
    detected: int  # nodules hit by any kept candidate
    false_positives: int  # candidates counted as FP (all thresholds)
    ci_low: np.ndarray = field(default_factory=lambda: np.full(len(FP_RATES), np.nan))
    ci_high: np.ndarray = field(default_factory=lambda: np.full(len(FP_RATES), np.nan))
    cpm_ci: tuple[float, float] = (float("nan"), float("nan"))
    by_size: list[dict] = field(default_factory=list)  # sensitivity_by_group's rows, by size ...
    by_kind: list[dict] = field(default_factory=list)  # ... and by location and texture (where recorded)
    in_pool: int | None = None  # nodules hit by a candidate of stage two's pool, when it was given
    outcomes: list[ScanOutcome] = field(default_factory=list, repr=False)  # per scan, for operating points

    def to_dict(self) -> dict:
        return {
            "cpm": self.cpm, "cpm_ci95": list(self.cpm_ci), "fp_rates": list(FP_RATES), "by_size": self.by_size,
            "by_kind": self.by_kind, "sensitivities": self.sensitivities.tolist(), "ci95_low": self.ci_low.tolist(),
            "ci95_high": self.ci_high.tolist(), "nodules": self.nodules, "scans": self.scans,
            "detected": self.detected, "in_pool": self.in_pool, "false_positives": self.false_positives,
        }


def hits(xyz: np.ndarray, findings: Findings, default_diameter: float | None = None) -> np.ndarray:
    """(points, findings) bool: world point ``xyz[i]`` lies strictly within finding j's radius
    (``diameter / 2``; a negative diameter becomes ``default_diameter`` when given)."""
    d = findings.value.copy()
    if default_diameter is not None:
        d[d < 0] = default_diameter
    dist2 = ((np.asarray(xyz, dtype=float).reshape(-1, 3)[:, None, :] - findings.xyz[None, :, :]) ** 2).sum(-1)
    return dist2 < (d[None, :] / 2) ** 2


def scan_outcome(nodules: Findings, excluded: Findings, candidates: Findings, max_per_scan: int = 100) -> ScanOutcome:
    """Score one scan's candidates against its nodules and excluded findings."""
    probs = candidates.value
    order = np.argsort(-probs, kind="stable")[: max_per_scan if max_per_scan > 0 else None]
    xyz, probs = candidates.xyz[order], probs[order]
    on_nodule = hits(xyz, nodules)
    on_excluded = hits(xyz, excluded, EXCLUDED_DEFAULT_DIAMETER)
    nodule_probs = np.array([probs[on_nodule[:, j]].max() if on_nodule[:, j].any() else -np.inf
                             for j in range(len(nodules))])
    fp = ~on_nodule.any(1) & ~on_excluded.any(1)
    return ScanOutcome(nodule_probs, probs[fp])


def froc_curve(outcomes: list[ScanOutcome]) -> tuple[np.ndarray, np.ndarray]:
    """FP per scan and sensitivity at every threshold (descending), starting at (0, 0)."""
    nod = np.concatenate([o.nodule_probs for o in outcomes]) if outcomes else np.zeros(0)
    fps = np.concatenate([o.fp_probs for o in outcomes]) if outcomes else np.zeros(0)
    n_nodules, n_scans = len(nod), max(len(outcomes), 1)
    detected = nod[np.isfinite(nod)]
    thresholds = np.unique(np.concatenate([detected, fps]))[::-1]
    tp_sorted, fp_sorted = np.sort(detected), np.sort(fps)
    tp_counts = len(tp_sorted) - np.searchsorted(tp_sorted, thresholds, side="left")
    fp_counts = len(fp_sorted) - np.searchsorted(fp_sorted, thresholds, side="left")
    curve_fps = np.concatenate([[0.0], fp_counts / n_scans])
    curve_sens = np.concatenate([[0.0], tp_counts / max(n_nodules, 1)])
    return curve_fps, curve_sens


def sensitivities_at(fps: np.ndarray, sens: np.ndarray, rates=FP_RATES) -> np.ndarray:
    """Sensitivity at each FP rate by linear interpolation (the last value beyond the curve)."""
    return np.interp(np.asarray(rates), fps, sens)


def _allowed(outcomes: list[ScanOutcome], rates) -> tuple[np.ndarray, list[int]]:
    """The false positives' probabilities, most probable first, and per rate how many of them
    ``rate`` false positives per scan allow over all the scans."""
    fps = np.sort(np.concatenate([o.fp_probs for o in outcomes]) if outcomes else np.zeros(0))[::-1]
    return fps, [int(np.floor(rate * len(outcomes) + 1e-9)) for rate in rates]


def thresholds_at(outcomes: list[ScanOutcome], rates=OPERATING_RATES) -> list[float]:
    """For each rate, the lowest probability threshold at which the candidates scoring at least
    that much hold no more than ``rate`` false positives per scan (0.0: every candidate)."""
    fps, allowed = _allowed(outcomes, rates)
    return [float(np.nextafter(fps[k], np.inf)) if k < len(fps) else 0.0 for k in allowed]


def calibrated_thresholds(outcomes: list[ScanOutcome], rates=OPERATING_RATES) -> list[float]:
    """For each rate, a threshold for new scans, read off these (validation) scans: the
    probability of their k-th most probable false positive, k = floor(``rate`` x scans), which
    passes k of them here (k = 0: just above the highest; the (k+1)-th as probable as the k-th:
    just above both, passing fewer; fewer than k: 0.0, every candidate).

    Every threshold from just above the (k+1)-th to the k-th passes k false positives here. A new
    scan's false positive that scores like these N passes the k-th with probability k / (N + 1)
    and just above the (k+1)-th with (k + 1) / (N + 1); with about N / scans false positives per
    new scan, as here, the k-th expects k / scans x N / (N + 1) per scan (``rate`` when rate x
    scans is whole), the lowest (``thresholds_at``, right for reading a curve off the scans it was
    measured on) one more per ``len(outcomes)`` scans: 0.25 per scan from four validation scans."""
    fps, allowed = _allowed(outcomes, rates)
    out = []
    for k in allowed:
        if k > len(fps) or not len(fps):
            out.append(0.0)
        elif k and (k == len(fps) or fps[k] < fps[k - 1]):
            out.append(float(fps[k - 1]))
        else:  # k = 0, or the (k+1)-th ties with the k-th: just above them, passing fewer than k
            out.append(float(np.nextafter(fps[max(k - 1, 0)], np.inf)))
    return out


def calibrated_max_findings(scan_probs: list[np.ndarray], thresholds) -> list[int]:
    """For each threshold, the most candidates any of these (validation) scans has at or above it
    (at least 1): what a new scan lists at most at that operating point.

    A threshold read off the validation scans gives their false positives per scan in the mean,
    not on a scan unlike them (another scanner, a busy vessel tree), where far more candidates
    can pass it; the limit keeps such a scan's list as long as the busiest validation scan's, and
    changes nothing on the validation scans themselves.

    Args:
        scan_probs: per scan, the probabilities of the candidates it lists.
    """
    return [max(1, max((int((np.asarray(p) >= t).sum()) for p in scan_probs), default=0)) for t in thresholds]


def max_findings(points: dict) -> list[int]:
    """Each calibrated operating point's findings per scan at most (0: no limit, as in checkpoints
    from before the limit)."""
    return points.get("max_findings") or [0] * len(points["fp_rates"])


def limited(outcomes: list[ScanOutcome], listed: list[np.ndarray], most: int) -> list[ScanOutcome]:
    """The outcomes of each scan's ``most`` most probable candidates (0: all of them).

    Args:
        listed: per scan, the probabilities of every candidate it lists (hits, false positives
            and those the outcome ignores, such as a second hit on a nodule: each takes a place).
    """
    if not most:
        return outcomes
    out = []
    for o, probs in zip(outcomes, listed):
        floor = np.sort(probs)[::-1][most - 1] if len(probs) >= most else -np.inf  # ties with it stay too
        nodules = np.where(o.nodule_probs >= floor, o.nodule_probs, -np.inf)
        out.append(ScanOutcome(nodules, o.fp_probs[o.fp_probs >= floor]))
    return out


def at_thresholds(outcomes: list[ScanOutcome], thresholds) -> list[dict]:
    """False positives per scan and sensitivity of the candidates scoring at least each threshold."""
    probs = np.concatenate([o.nodule_probs for o in outcomes]) if outcomes else np.zeros(0)
    fps = np.concatenate([o.fp_probs for o in outcomes]) if outcomes else np.zeros(0)
    return [{"threshold": float(t), "fp_per_scan": float((fps >= t).sum() / max(len(outcomes), 1)),
             "sensitivity": float((probs >= t).mean()) if len(probs) else float("nan")} for t in thresholds]


def sensitivity_by_group(outcomes: list[ScanOutcome], groups: dict[str, np.ndarray], rates=SIZE_RATES,
                         pooled: np.ndarray | None = None) -> list[dict]:
    """Sensitivity of the nodules of each group at the thresholds giving ``rates`` false positives
    per scan over all the scans (``thresholds_at``), and how many of them the candidate pool held.

    Args:
        groups: label -> (N,) bool over all the nodules, in the order of the outcomes' ``nodule_probs``.
        pooled: (N,) bool, the nodules a candidate of the pool hits (stage two's pool, before the
            cut to the candidates kept), or None.

    Returns:
        One row per group: {"group": label, "nodules": n, "sensitivity": [one per rate],
        "fp_rates": rates, and with ``pooled`` "in_pool": how many of them the pool held}.
    """
    probs = np.concatenate([o.nodule_probs for o in outcomes]) if outcomes else np.zeros(0)
    thresholds = thresholds_at(outcomes, rates)
    rows = []
    for label, inside in groups.items():
        sens = [float((probs[inside] >= t).mean()) if inside.any() else float("nan") for t in thresholds]
        row = {"group": label, "nodules": int(inside.sum()), "sensitivity": sens, "fp_rates": list(rates)}
        if pooled is not None:
            row["in_pool"] = int(pooled[inside].sum())
        rows.append(row)
    return rows


def size_groups(diameters: np.ndarray, bins=SIZE_BINS) -> dict[str, np.ndarray]:
    """Each size bin's label -> which of the nodules (``diameters``, mm) fall in it."""
    return {size_label(lo, hi): (diameters >= lo) & (diameters < hi) for lo, hi in bins}


def kind_groups(kinds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each location and texture (``noduledet.data.kinds``) -> which of the nodules are of it."""
    from noduledet.data.kinds import LOCATIONS, TEXTURES

    return {value: kinds[column] == value for column, values in (("location", LOCATIONS), ("texture", TEXTURES))
            for value in values}


def froc(annotations: Findings, excluded: Findings, candidates: Findings, scans: list[str],
         max_per_scan: int = 100, bootstrap: int = 1000, seed: int = 0, pool: Findings | None = None,
         kinds: dict[str, np.ndarray] | None = None) -> FrocResult:
    """LUNA16 FROC over ``scans`` (nodules and candidates of other scans are ignored).

    Args:
        bootstrap: resamples of the scans for the 95% intervals (0: none).
        pool: every candidate stage two scored (``ScanResult.pool``): how many nodules of each size
            and kind it held goes beside their sensitivity.
        kinds: each annotation's location and texture (``noduledet.data.kinds.kinds_of``, in the
            order of ``annotations``): the sensitivity by kind, beside the one by size.
    """
    outcomes = [scan_outcome(annotations.for_scan(u), excluded.for_scan(u), candidates.for_scan(u), max_per_scan)
                for u in scans]
    fps, sens = froc_curve(outcomes)
    at = sensitivities_at(fps, sens)
    nodule_probs = np.concatenate([o.nodule_probs for o in outcomes]) if outcomes else np.zeros(0)
    order = np.concatenate([np.nonzero(annotations.uids == u)[0] for u in scans]).astype(int) if scans else np.zeros(0, int)
    pooled = None
    if pool is not None:
        pooled = np.concatenate([hits(pool.for_scan(u).xyz, annotations.for_scan(u)).any(axis=0) for u in scans]
                                ) if scans else np.zeros(0, bool)
    result = FrocResult(at, float(at.mean()), fps, sens, len(nodule_probs), len(scans),
                        int(np.isfinite(nodule_probs).sum()), int(sum(len(o.fp_probs) for o in outcomes)),
                        by_size=sensitivity_by_group(outcomes, size_groups(annotations.value[order]), pooled=pooled),
                        by_kind=sensitivity_by_group(outcomes, kind_groups({k: v[order] for k, v in kinds.items()}),
                                                     pooled=pooled) if kinds is not None else [],
                        in_pool=int(pooled.sum()) if pooled is not None else None, outcomes=outcomes)
    if bootstrap and outcomes:
        rng = np.random.default_rng(seed)
        samples = np.array([sensitivities_at(*froc_curve([outcomes[i] for i in rng.integers(len(outcomes), size=len(outcomes))]))
                            for _ in range(bootstrap)])
        result.ci_low, result.ci_high = np.percentile(samples, 2.5, axis=0), np.percentile(samples, 97.5, axis=0)
        cpms = samples.mean(1)
        result.cpm_ci = (float(np.percentile(cpms, 2.5)), float(np.percentile(cpms, 97.5)))
    return result


def plot_froc(result: FrocResult, path, title: str = "FROC") -> None:
    """The FROC curve with the seven LUNA16 points and, when bootstrapped, their 95% intervals."""
    from noduledet import plots

    ci = None if np.isnan(result.ci_low).all() else (result.ci_low, result.ci_high)
    plots.froc(result.fps, result.sens, FP_RATES, result.sensitivities, ci, FP_LABELS, path,
               f"{title} ({result.nodules} nodules, {result.scans} scans)")
