"""Is a row of a comparison table really better than the baseline? Paired differences with intervals.

Two detector rows (say ``ccapm`` and ``res``) are trained with the same S seeds and evaluated on
the same N held-out scans. For each metric (CPM, and the paper's AP when slice predictions are
given) this module reports:

- the row's and the baseline's value, each the mean over seeds of the metric over all scans;
- their difference d = row - baseline (the mean over seeds of d_s = row_s - baseline_s);
- a percentile bootstrap interval for d, paired twice: a replicate draws N scans with
  replacement and S seed indices with replacement, and uses the SAME scans and the same seed
  indices for both rows. Scan pairing removes the scan-to-scan difficulty that both rows share
  (the reason a paired interval is narrower than two separate ones); seed pairing matches seed k
  of one row with seed k of the other, which saw the same data order (randomness comes from
  (seed, epoch, index)). Resampling seeds puts the training noise into the interval, which a
  scan-only bootstrap of one run would leave out;
- a verdict: "better" when the interval lies above 0, "worse" when below, else
  "not distinguishable";
- the spread behind the interval, split in two: ``per_scan_sd`` (sd of the difference when only
  scans are resampled, times sqrt(N)) and ``per_seed_sd`` (sd when only seeds are resampled,
  times sqrt(S)), from which ``scans_needed`` sizes a protocol.

CPM is computed by ``froc.froc_curve`` and ``froc.sensitivities_at`` on the resampled scans, as
in ``froc.froc``'s own bootstrap; AP is ``coco.average_precision`` (the paper's eq 25, not
interpolated) at ``iou_threshold``, slices matched once per scan and pooled over the resampled
scans. Pure numpy; a given ``seed`` gives the same interval every time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

from noduledet.metrics.coco import average_precision, ranked_hits
from noduledet.metrics.froc import ScanOutcome, froc_curve, sensitivities_at

VERDICTS = ("better", "worse", "not distinguishable")


@dataclass(frozen=True)
class ScanDetections:
    """One scan's slice detections, matched once: scores (N,), hits (N,) bool, reference boxes."""

    scores: np.ndarray
    hits: np.ndarray
    boxes: int


@dataclass(frozen=True)
class PairedDifference:
    """A row against the baseline in one metric, over the same scans and seeds."""

    metric: str  # "cpm" or "ap_paper"
    row: float  # mean over seeds
    baseline: float
    difference: float  # row - baseline
    ci_low: float
    ci_high: float
    level: float  # of the interval, e.g. 0.95
    verdict: str  # one of VERDICTS
    scans: int
    seeds: int
    per_scan_sd: float  # sd of one scan's share of the difference: sd(scan-only bootstrap) * sqrt(scans)
    per_seed_sd: float  # sd of one seed's difference d_s: sd(seed-only bootstrap) * sqrt(seeds)

    def to_dict(self) -> dict:
        return asdict(self)

    def scans_needed(self, difference: float = 0.05, power: float = 0.8, seeds: int | None = None) -> int | None:
        """``scans_needed`` with this comparison's spreads and level (and its seeds unless given);
        None also when a spread could not be measured (nothing found, one seed)."""
        if not (math.isfinite(self.per_scan_sd) and math.isfinite(self.per_seed_sd)) or self.per_scan_sd == 0:
            return None
        return scans_needed(self.per_scan_sd, difference, self.level, power, self.per_seed_sd,
                            self.seeds if seeds is None else seeds)


def verdict(ci_low: float, ci_high: float) -> str:
    """"better" if the interval lies above 0, "worse" if below, else "not distinguishable"."""
    if ci_low > 0:
        return "better"
    if ci_high < 0:
        return "worse"
    return "not distinguishable"


def cpm_of(outcomes: Sequence[ScanOutcome]) -> float:
    """CPM (mean sensitivity at 1/8 .. 8 FP per scan) of a list of scan outcomes."""
    return float(sensitivities_at(*froc_curve(list(outcomes))).mean())


def scan_detections(predictions: list[dict], targets: list[dict], iou_threshold: float = 0.5) -> ScanDetections:
    """Match one scan's slices (``coco.match``) once, for resampling scans without re-matching."""
    scores, hits, n_gt = ranked_hits(predictions, targets, iou_threshold)
    return ScanDetections(scores, hits, n_gt)


def ap_of(scans: Sequence[ScanDetections]) -> float:
    """The paper's AP (eq 25) over the pooled slices of ``scans``."""
    if not len(scans):
        return float("nan")
    return average_precision(np.concatenate([s.scores for s in scans]), np.concatenate([s.hits for s in scans]),
                             sum(s.boxes for s in scans))


def _check_paired(row: Sequence[Sequence], baseline: Sequence[Sequence]) -> tuple[int, int]:
    """(seeds, scans); both rows must hold the same number of seeds, each the same scans."""
    if len(row) != len(baseline) or not len(row):
        raise ValueError(f"paired rows need the same seeds: row has {len(row)}, baseline {len(baseline)}")
    counts = {len(s) for s in [*row, *baseline]}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every seed of both rows must hold the same scans, got scan counts {sorted(counts)}")
    return len(row), counts.pop()


def paired_difference(metric: str, row: Sequence[Sequence], baseline: Sequence[Sequence],
                      statistic: Callable[[Sequence], float], bootstrap: int = 1000, seed: int = 0,
                      level: float = 0.95) -> PairedDifference:
    """The paired bootstrap of the module docstring for any per-scan ``statistic``.

    Args:
        metric: the name reported.
        row, baseline: per seed, per scan, whatever ``statistic`` takes a list of; scan i of
            every seed of both rows is the same scan.
        statistic: the metric of a list of scans (it sees a scan twice when drawn twice).
        bootstrap: replicates.
        seed: of the resampling.
        level: of the interval.
    """
    n_seeds, n_scans = _check_paired(row, baseline)

    def diffs(idx: np.ndarray) -> np.ndarray:  # (S,) d_s on the scans idx
        return np.array([statistic([row[s][i] for i in idx]) - statistic([baseline[s][i] for i in idx])
                         for s in range(n_seeds)])

    rows = [statistic(list(r)) for r in row]
    bases = [statistic(list(b)) for b in baseline]
    d_all = np.array(rows) - np.array(bases)
    rng = np.random.default_rng(seed)
    d_scans = np.array([diffs(rng.integers(n_scans, size=n_scans)) for _ in range(bootstrap)])  # (B, S)
    seed_draws = rng.integers(n_seeds, size=(bootstrap, n_seeds))
    joint = np.take_along_axis(d_scans, seed_draws, axis=1).mean(axis=1)
    low, high = (float(v) for v in np.percentile(joint, [50 * (1 - level), 50 * (1 + level)]))
    return PairedDifference(
        metric=metric, row=float(np.mean(rows)), baseline=float(np.mean(bases)),
        difference=float(d_all.mean()), ci_low=low, ci_high=high, level=level, verdict=verdict(low, high),
        scans=n_scans, seeds=n_seeds,
        per_scan_sd=float(d_scans.mean(axis=1).std() * math.sqrt(n_scans)),
        per_seed_sd=float(d_all[seed_draws].mean(axis=1).std() * math.sqrt(n_seeds)),
    )


def paired_cpm(row: Sequence[Sequence[ScanOutcome]], baseline: Sequence[Sequence[ScanOutcome]],
               bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> PairedDifference:
    """Paired CPM difference, row minus baseline, from per-seed lists of per-scan FROC outcomes.

    Args:
        row, baseline: ``[seed][scan]`` ``froc.ScanOutcome`` (from ``froc.scan_outcome``).

    Example:
        >>> d = paired_cpm(ccapm_outcomes, res_outcomes)
        >>> print(f"{d.difference:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}] {d.verdict}")
    """
    return paired_difference("cpm", row, baseline, cpm_of, bootstrap, seed, level)


def paired_ap(row: Sequence[Sequence[tuple[list[dict], list[dict]]]],
              baseline: Sequence[Sequence[tuple[list[dict], list[dict]]]], iou_threshold: float = 0.5,
              bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> PairedDifference:
    """Paired difference of the paper's AP (eq 25) at ``iou_threshold``.

    Args:
        row, baseline: ``[seed][scan]`` (predictions, targets): the scan's slices as
            ``coco.slice_metrics`` takes them.
    """
    def matched(rows):
        return [[scan_detections(p, t, iou_threshold) for p, t in scans] for scans in rows]

    return paired_difference("ap_paper", matched(row), matched(baseline), ap_of, bootstrap, seed, level)


def compare_rows(row_outcomes: Sequence[Sequence[ScanOutcome]], baseline_outcomes: Sequence[Sequence[ScanOutcome]],
                 row_slices=None, baseline_slices=None, iou_threshold: float = 0.5, bootstrap: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict[str, PairedDifference]:
    """CPM and, when both rows' slices are given, AP: {"cpm": ..., "ap_paper": ...}."""
    out = {"cpm": paired_cpm(row_outcomes, baseline_outcomes, bootstrap, seed, level)}
    if row_slices is not None and baseline_slices is not None:
        out["ap_paper"] = paired_ap(row_slices, baseline_slices, iou_threshold, bootstrap, seed, level)
    return out


def scans_needed(per_scan_sd: float, difference: float = 0.05, level: float = 0.95, power: float = 0.8,
                 per_seed_sd: float = 0.0, seeds: int = 1) -> int | None:
    """Held-out scans needed for a paired interval to separate a true ``difference`` from 0.

    The estimate d has variance about ``per_scan_sd**2 / n + per_seed_sd**2 / seeds`` (n scans).
    Its ``level`` interval excludes 0 with probability ``power`` when the true difference is
    ``difference`` if (z_a + z_b) * sd(d) <= difference, z_a = z((1 + level) / 2),
    z_b = z(power) (normal quantiles; power 0.5 gives z_b = 0: the interval's half-width equals
    the difference). Solved for n::

        n = per_scan_sd**2 / ((difference / (z_a + z_b))**2 - per_seed_sd**2 / seeds)

    Returns:
        n rounded up; None when the seed term alone is too wide (train more seeds instead).

    Example:
        >>> scans_needed(0.2)  # (1.960 + 0.842)**2 * 0.2**2 / 0.05**2 = 125.6
        126
    """
    z = NormalDist().inv_cdf((1 + level) / 2) + NormalDist().inv_cdf(power)
    budget = (difference / z) ** 2 - per_seed_sd**2 / seeds
    if budget <= 0:
        return None
    return max(1, math.ceil(per_scan_sd**2 / budget - 1e-9))
