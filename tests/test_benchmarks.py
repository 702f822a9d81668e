"""The benchmark scripts' measuring code measures what it says (their numbers live in docs/benchmarks.md)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

from bench_variants import measure, overhead  # noqa: E402
from common import matmul_gflops  # noqa: E402

from noduledet.models import build_detector  # noqa: E402
from noduledet.models.detector import count_parameters  # noqa: E402
from noduledet.models.profile import count_flops  # noqa: E402


def test_variant_measurement_matches_the_model():
    row = measure("ccapm", "tiny", 64, repeats=1)
    model = build_detector("ccapm").eval()
    assert row["params_m"] == pytest.approx(count_parameters(model) / 1e6)
    # the untrained weights decide how many boxes the heads see: FLOPs agree to a few percent
    assert row["gflops"] == pytest.approx(count_flops(model, [torch.rand(3, 64, 64)]) / 1e9, rel=0.05)
    assert row["infer_ms"] > 0 and row["train_ms_per_image"] > 0  # times: docs/benchmarks.md, not tests
    assert row["peak_mb"] >= row["infer_peak_mb"] > 0


def test_overhead_of_a_model_against_itself_is_one():
    r = overhead(["res"], "tiny", 64, rounds=3)["res"]
    assert set(r) == {"backbone", "detector"}
    backbone, spread = r["backbone"]
    assert 0.7 < backbone < 1.4 and spread >= 0  # the same network: equal up to timing noise


def test_matmul_rate_is_the_rate_of_a_known_product():
    rate = matmul_gflops(n=256, repeats=3)
    assert 0.5 < rate < 1e5  # GFLOP/s of 2 n^3 flops: between a slow laptop and a large GPU
