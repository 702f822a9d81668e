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


def test_table3_gpu_script_help_and_no_gpu_refusal(monkeypatch, capsys):
    import bench_table3_gpu
    import pytest
    import torch

    with pytest.raises(SystemExit) as exc:
        bench_table3_gpu.main(["--help"])
    assert exc.value.code == 0 and "--minutes" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_table3_gpu.main(["--minutes", "0.01"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a CUDA GPU" in err


def test_table3_gpu_training_loop_runs_on_cpu():
    """The script's loop on the tiny preset, CPU, fp32, two timed steps: what the GPU run executes."""
    import random

    import torch
    from bench_table3_gpu import loss_curve, synthetic_batch, train_for

    from noduledet.models import build_detector

    images, targets = synthetic_batch(3, 64, random.Random(1), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert [im.shape for im in images] == [(3, 64, 64)] * 3 and all(0 <= im.min() and im.max() <= 1 for im in images)
    for t in targets:
        b = t["boxes"]
        assert b.shape[1] == 4 and (b[:, 2:] > b[:, :2]).all() and (b >= 0).all() and (b <= 64).all()
    model = build_detector("ccapm", neck="c4")
    r = train_for(model, torch.device("cpu"), seconds=60, batch=2, size=64, amp=False, max_steps=2, warmup_steps=1)
    assert r["steps"] == 2 and len(r["losses"]) == 3 and r["images_per_s"] > 0
    assert all(torch.isfinite(torch.tensor(r["losses"]))) and "loss_objectness" in r["last_terms"]
    assert loss_curve([4.0, 2.0, 1.0, 1.0], points=2) == [(2, 3.0), (4, 1.0)]
