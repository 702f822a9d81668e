"""The benchmark scripts' measuring code runs (their numbers live in docs/benchmarks.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

from bench_variants import measure, overhead  # noqa: E402
from common import matmul_gflops  # noqa: E402


def test_variant_measurement_has_every_column():
    row = measure("ccapm", "tiny", 64, repeats=1)
    assert row["gflops"] > 0 and row["infer_ms"] > 0 and row["train_ms_per_image"] > 0
    assert row["peak_mb"] >= row["infer_peak_mb"] > 0 and 1.0 < row["params_m"] < 3.0


def test_overhead_reports_backbone_and_detector_ratios():
    r = overhead(["ccasm"], "tiny", 64, rounds=1)["ccasm"]
    assert set(r) == {"backbone", "detector"} and all(med > 0 for med, _ in r.values())


def test_matmul_rate_is_positive():
    assert matmul_gflops(n=128, repeats=2) > 0
