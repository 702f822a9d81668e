import numpy as np
import pytest

from noduledet.metrics.froc import ScanOutcome
from noduledet.metrics.paired import (compare_rows, cpm_of, paired_ap, paired_cpm, scans_needed, verdict)


def _scan(nodule_probs, fp_probs=()):
    return ScanOutcome(np.array(nodule_probs, dtype=float), np.array(fp_probs, dtype=float))


def _runs(seeds, scans, found: bool, rng):
    """[seed][scan] outcomes: 1-3 nodules per scan, all found (prob 0.9) or none; a few FPs."""
    counts = rng.integers(1, 4, size=scans)
    fps = [rng.uniform(0, 0.5, size=rng.integers(0, 5)) for _ in range(scans)]
    prob = 0.9 if found else -np.inf
    return [[_scan([prob] * c, f if not found else ()) for c, f in zip(counts, fps)] for _ in range(seeds)]


def test_identical_rows_differ_by_zero():
    rng = np.random.default_rng(0)
    rows = [[_scan(rng.choice([0.8, -np.inf], size=2), rng.uniform(0, 1, size=3)) for _ in range(6)] for _ in range(3)]
    d = paired_cpm(rows, rows, bootstrap=200)
    assert d.difference == 0 and (d.ci_low, d.ci_high) == (0.0, 0.0) and d.verdict == "not distinguishable"
    assert (d.scans, d.seeds, d.per_scan_sd, d.per_seed_sd) == (6, 3, 0.0, 0.0)


def test_finding_every_nodule_beats_finding_none_with_a_tight_interval():
    rng = np.random.default_rng(1)
    everything, nothing = _runs(3, 8, True, rng), _runs(3, 8, False, rng)
    d = paired_cpm(everything, nothing, bootstrap=300)
    assert (d.row, d.baseline, d.difference) == (1.0, 0.0, 1.0)
    assert d.verdict == "better" and d.ci_high - d.ci_low < 1e-12 and d.ci_low == pytest.approx(1.0)
    assert paired_cpm(nothing, everything, bootstrap=300).verdict == "worse"


def test_two_scans_by_hand():
    """One seed, two scans of one nodule each: the row finds scan A's, the baseline neither.

    CPM: row 1/2 (sensitivity 1/2 at every FP rate), baseline 0, difference 1/2. A replicate
    draws (A, A) with probability 1/4 (difference 1), (B, B) with 1/4 (difference 0), a mix with
    1/2 (difference 1/2): the 95% interval is [0, 1], which holds 0: not distinguishable.
    """
    row, base = [[_scan([0.9]), _scan([-np.inf])]], [[_scan([-np.inf]), _scan([-np.inf])]]
    assert cpm_of(row[0]) == 0.5
    d = paired_cpm(row, base, bootstrap=2000, seed=3)
    assert (d.difference, d.ci_low, d.ci_high, d.verdict) == (0.5, 0.0, 1.0, "not distinguishable")
    # the scan-only spread: sd of {1, 1/2, 0} with weights 1/4, 1/2, 1/4 is sqrt(1/8); times sqrt(2) = 1/2
    assert d.per_scan_sd == pytest.approx(0.5, abs=0.03) and d.per_seed_sd == 0


def test_seed_spread_by_hand():
    """Four identical scans of 2 nodules; the row's seeds find 2, 1, 0 of them on every scan.

    d_s = 1, 1/2, 0 (the baseline finds none): difference 1/2; resampling scans changes nothing
    (per_scan_sd 0); the seeds' sd is sqrt(((1/2)^2 + 0 + (1/2)^2) / 3) = sqrt(1/6) = 0.408;
    all three draws of seed 2 (probability 1/27 > 2.5%) give 0, so the interval holds 0.
    """
    row = [[_scan([0.9] * k + [-np.inf] * (2 - k)) for _ in range(4)] for k in (2, 1, 0)]
    base = [[_scan([-np.inf, -np.inf]) for _ in range(4)] for _ in range(3)]
    d = paired_cpm(row, base, bootstrap=2000)
    assert d.difference == 0.5 and d.per_scan_sd == 0 and d.per_seed_sd == pytest.approx(np.sqrt(1 / 6), abs=0.02)
    assert d.ci_low == 0 and d.ci_high == 1 and d.verdict == "not distinguishable"
    assert d.scans_needed() is None  # seeds, not scans, are what this comparison lacks


def test_paired_is_deterministic_and_checks_its_inputs():
    rng = np.random.default_rng(2)
    a, b = _runs(2, 5, True, rng), _runs(2, 5, False, rng)
    a[1][2] = _scan([-np.inf, 0.3], [0.7])
    assert paired_cpm(a, b, seed=7, bootstrap=100) == paired_cpm(a, b, seed=7, bootstrap=100)
    with pytest.raises(ValueError, match="same seeds"):
        paired_cpm(a, b[:1])
    with pytest.raises(ValueError, match="same scans"):
        paired_cpm(a, [b[0], b[1][:4]])


def _slices(found: bool):
    """One scan: two slices, one nodule box each; a perfect detector or one that only misses."""
    targets = [{"boxes": np.array([[10.0, 10, 20, 20]])}, {"boxes": np.array([[30.0, 30, 40, 44]])}]
    if found:
        preds = [{"boxes": t["boxes"].copy(), "scores": np.array([0.9])} for t in targets]
    else:
        preds = [{"boxes": np.array([[60.0, 60, 70, 70]]), "scores": np.array([0.9])} for _ in targets]
    return preds, targets


def test_paired_ap_and_compare_rows():
    good = [[_slices(True) for _ in range(4)] for _ in range(2)]
    bad = [[_slices(False) for _ in range(4)] for _ in range(2)]
    d = paired_ap(good, bad, bootstrap=200)
    assert (d.metric, d.row, d.baseline, d.verdict) == ("ap_paper", 1.0, 0.0, "better")
    assert paired_ap(good, good, bootstrap=200).verdict == "not distinguishable"
    rng = np.random.default_rng(4)
    out = compare_rows(_runs(2, 4, True, rng), _runs(2, 4, False, rng), good, bad, bootstrap=100)
    assert set(out) == {"cpm", "ap_paper"} and out["cpm"].to_dict()["verdict"] == "better"


def test_verdicts():
    assert (verdict(0.01, 0.2), verdict(-0.3, -0.01), verdict(-0.1, 0.1), verdict(0.0, 0.2)) == (
        "better", "worse", "not distinguishable", "not distinguishable")


def test_scans_needed_by_hand():
    # (z_0.975 + z_0.8)^2 = (1.95996 + 0.84162)^2 = 7.8489; * 0.2^2 / 0.05^2 = 125.58 -> 126
    assert scans_needed(0.2) == 126
    # power 0.5: 1.95996^2 * 16 = 61.46 -> 62 (the interval's half-width is then 0.05)
    assert scans_needed(0.2, power=0.5) == 62
    # a seed term 0.03^2 / 3 = 0.0003 eats most of the budget 0.05^2 / 7.8489 = 0.00031852:
    # n = 0.04 / 0.0000185164 = 2160.3 -> 2161
    assert scans_needed(0.2, per_seed_sd=0.03, seeds=3) == 2161
    assert scans_needed(0.2, per_seed_sd=0.05, seeds=3) is None
