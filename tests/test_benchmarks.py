"""The benchmark scripts' measuring code measures what it says (their numbers live in docs/benchmarks.md)."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

from bench_variants import measure, overhead  # noqa: E402
from common import matmul_gflops  # noqa: E402

from noduledet.data.luna16 import Luna16  # noqa: E402
from noduledet.models import build_detector  # noqa: E402
from noduledet.models.detector import count_parameters  # noqa: E402
from noduledet.models.profile import count_flops  # noqa: E402


def test_variant_measurement_matches_the_model(monkeypatch):
    import bench_variants

    calls = []
    monkeypatch.setattr(bench_variants, "time_call", lambda fn, repeats: calls.append(fn()) or 0.02)  # 20 ms a call
    monkeypatch.setattr(bench_variants, "matmul_gflops", lambda: 50.0)
    row = measure("ccapm", "tiny", 64, repeats=1)
    model = build_detector("ccapm").eval()
    assert row["params_m"] == pytest.approx(count_parameters(model) / 1e6)
    # the untrained weights decide how many boxes the heads see: FLOPs agree to a few percent
    assert row["gflops"] == pytest.approx(count_flops(model, [torch.rand(3, 64, 64)]) / 1e9, rel=0.05)
    assert len(calls) == 2 and isinstance(calls[0], list)  # inference (boxes per image), then a training step
    assert row["infer_ms"] == pytest.approx(20.0) and row["train_ms_per_image"] == pytest.approx(10.0)  # a step: 2 images
    assert row["matmul_gflops"] == 50.0 and row["peak_mb"] >= row["infer_peak_mb"] > 0


def test_overhead_is_the_median_of_interleaved_ratios(monkeypatch):
    import bench_variants

    # per round: the variant's backbone, res's backbone, the variant's detector, res's detector
    times = iter([3.0, 2.0, 5.0, 4.0] + [6.0, 2.0, 5.0, 5.0] + [4.5, 3.0, 6.0, 4.0])
    monkeypatch.setattr(bench_variants, "time_call", lambda fn, repeats: next(times))
    r = overhead(["ccapm"], "tiny", 64, rounds=3)["ccapm"]
    assert set(r) == {"backbone", "detector"}
    assert r["backbone"][0] == pytest.approx(1.5) and r["detector"][0] == pytest.approx(1.25)  # medians of 1.5, 3, 1.5
    assert r["backbone"][1] == pytest.approx(0.75)  # interquartile range of (1.5, 3.0, 1.5): 2.25 - 1.5


def test_matmul_rate_is_the_rate_of_a_known_product(monkeypatch):
    import common

    clock = iter(np.arange(0.0, 100.0, 0.004))  # every reading 4 ms after the last: each product takes 4 ms
    monkeypatch.setattr(common.time, "perf_counter", lambda: float(next(clock)))
    assert matmul_gflops(n=200, repeats=3) == pytest.approx(2 * 200**3 / 0.004 / 1e9)  # 2 n^3 flops in 4 ms: 4 GFLOP/s


def test_table3_gpu_script_help_and_no_gpu_refusal(monkeypatch, capsys):
    import bench_table3_gpu

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


@pytest.mark.slow  # a 512x512 scan of the other generator: `python -m pytest -m slow`
def test_the_foreign_phantom_annotates_its_nodules_where_they_are(tmp_path):
    """The independent generator's LUNA16 files agree with its voxels: every annotated centre,
    taken through the scan's own geometry, lies on dense tissue inside the body, and the lung
    around it is air-dense."""
    import numpy as np
    from foreign_phantom import main as foreign

    from noduledet.data.ct import read_ct
    from noduledet.data.kinds import annotation_kinds

    assert foreign([str(tmp_path / "f"), "--scans", "1", "--seed", "3"]) == 0
    data = Luna16(tmp_path / "f")
    [uid] = data.uids
    volume = read_ct(data.scan_path(uid))
    nodules = data.annotations().for_scan(uid)
    assert len(nodules.uids) >= 1
    for xyz, d in zip(nodules.xyz, nodules.value):
        z, y, x = np.rint(volume.geometry.world_to_voxel(xyz)).astype(int)
        assert 3 <= d <= 40 and volume.hu[z, y, x] > -500, (xyz, d, volume.hu[z, y, x])
    assert np.median(volume.hu[volume.hu.shape[0] // 2]) < 0  # mostly air and lung, not solid
    kinds = annotation_kinds(data)  # annotations_kinds.csv: every nodule's location and texture
    assert len(kinds["location"]) == len(data.annotations())


def test_candidate_pool_counts_by_hand():
    from candidate_pool import pool_table, row_groups

    rows = [{"diameter": 4.0, "sources": {"blobs"}}, {"diameter": 5.0, "sources": {"stage1", "proposer"}},
            {"diameter": 8.0, "sources": set()}, {"diameter": 12.0, "sources": {"proposer"}}]
    kinds = {"location": np.array(["pleural", "free", "vascular", "pleural"]),
             "texture": np.array(["solid", "solid", "ground-glass", "solid"])}
    table = {r["group"]: r for r in pool_table(rows, row_groups(rows, kinds))}
    assert (table["all"]["nodules"], table["all"]["pool"]) == (4, 3)
    assert (table["all"]["stage1"], table["all"]["proposer"], table["all"]["blobs"]) == (1, 2, 1)
    assert (table["3-6 mm"]["nodules"], table["3-6 mm"]["pool"], table["6-10 mm"]["pool"]) == (2, 2, 0)
    assert (table["pleural"]["nodules"], table["pleural"]["pool"], table["pleural"]["proposer"]) == (2, 2, 1)
    assert (table["ground-glass"]["nodules"], table["ground-glass"]["pool"]) == (1, 0)


@pytest.mark.slow  # a benchmark over a trained run's scans: `python -m pytest -m slow`
def test_candidate_pool_on_a_trained_run(trained, phantom_root, phantom_cache, tmp_path, capsys):
    from candidate_pool import main

    assert main(["--checkpoint", str(trained / "best.pt"), "--cache", str(phantom_cache), "--data", str(phantom_root),
                 "--threads", "1"]) == 0
    rows = {line.split("|")[1].strip(): [int(v) for v in line.split("|")[2:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line.split("|")[2].strip().isdigit()}
    n, pool, *by_source = rows["all"]
    assert n == len(Luna16(phantom_root).annotations()) and max(by_source) <= pool <= n
    assert sum(rows[k][0] for k in ("free", "pleural", "vascular")) == n  # every nodule has a location
    assert main(["--checkpoint", str(trained / "best.pt"), "--cache", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no prepared cache here" in err


def test_operating_points_by_hand():
    from operating_points import realized

    from noduledet.metrics.froc import ScanOutcome

    validation = [ScanOutcome(np.array([0.95, 0.6]), np.array([0.9, 0.8])),
                  ScanOutcome(np.array([-np.inf]), np.array([0.7, 0.2]))]
    held_out = [ScanOutcome(np.array([0.85, 0.75]), np.array([0.8, 0.72, 0.1]))]
    listed = ([np.array([0.95, 0.9, 0.8, 0.6]), np.array([0.7, 0.2])], [np.array([0.85, 0.8, 0.75, 0.72, 0.1])])
    rows = realized(validation, held_out, listed, rates=(1.0,))
    # 1 FP/scan on two validation scans allows 2: the 2nd highest (0.8) passes one held-out false
    # positive and the 0.85 nodule; just above the 3rd (0.7) passes 0.8 and 0.72 and both nodules
    assert rows["calibrated"] == [{"rate": 1.0, "threshold": 0.8, "fp_per_scan": 1.0, "sensitivity": 0.5}]
    assert rows["lowest"][0]["fp_per_scan"] == 2.0 and rows["lowest"][0]["sensitivity"] == 1.0
    # at 0.8 the busiest validation scan lists 3 (0.95, 0.9, 0.8): the held-out scan's 0.85 and 0.8 pass anyway
    assert rows["limited"] == [{"rate": 1.0, "threshold": 0.8, "fp_per_scan": 1.0, "sensitivity": 0.5, "max_findings": 3}]
    busy = realized(validation, held_out, ([np.array([0.9, 0.8])], listed[1]), rates=(1.0,))
    assert busy["limited"][0] == {"rate": 1.0, "threshold": 0.8, "fp_per_scan": 1.0, "sensitivity": 0.5,
                                  "max_findings": 2}
    capped = realized(validation, held_out, ([np.array([0.9])], listed[1]), rates=(1.0,))["limited"][0]
    assert (capped["max_findings"], capped["fp_per_scan"], capped["sensitivity"]) == (1, 0.0, 0.5)  # the 0.85 nodule only


@pytest.mark.slow  # a benchmark over a trained run's scans: `python -m pytest -m slow`
def test_operating_points_on_a_trained_run(trained, phantom_cache, capsys):
    from operating_points import main

    assert main(["--checkpoint", str(trained / "best.pt"), str(trained / "best.pt"), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    table = [line.split("|") for line in out.splitlines() if line.startswith(("| calibrated", "| lowest", "| limited"))]
    assert len(table) == 3 and all(len(row) == 7 for row in table)
    assert all(" ± 0.00 " in cell for row in table for cell in row[2:6])  # the same run twice: no spread
    calibrated, lowest, capped = ([float(cell.split("±")[0]) for cell in row[2:6]] for row in table)
    assert calibrated == sorted(calibrated) and all(c <= w for c, w in zip(calibrated, lowest))
    assert all(c <= w for c, w in zip(capped, calibrated))
    assert out.count("(at most ") == 8  # each run's four limits, printed beside its rows
    assert main(["--checkpoint", str(trained / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.pt" in err


def test_training_benchmark_compares_the_same_work_before_and_after():
    from bench_training import batch, bench_augment, bench_cubes, bench_maxima, bench_pool, with_torchvision_pool

    from noduledet.models import build_detector

    images, targets = batch(0, size=64, images=2)
    grads = []
    for swap in (False, True):
        torch.manual_seed(0)
        model = build_detector("ccapm", "tiny").train()
        model = with_torchvision_pool(model) if swap else model
        torch.manual_seed(1)  # the heads' sampling of proposals
        sum(model(images, targets).values()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert bench_cubes(3)["max_diff_hu"] < 1e-2
    assert bench_augment(3)["max_diff"] < 1e-3  # float32 rounding
    assert bench_maxima((6, 7, 8))["max_diff"] == 0 and bench_pool(2)["max_diff"] == 0


@pytest.mark.slow  # two child processes training: `python -m pytest -m slow`
def test_malloc_benchmark_runs_glibc_defaults_beside_the_clis_thresholds(monkeypatch):
    from bench_malloc import bench

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")  # a parent's own setting: not passed on to the children
    result = bench(rounds=1, samples=32, steps=1)  # raises SystemExit if the tuned child could not set them
    assert result["tuned"]["faults"] < result["default"]["faults"]


def test_robustness_changes_by_hand():
    from robustness import changed

    from noduledet.data.ct import CTVolume
    from noduledet.geometry import Geometry

    hu = np.zeros((5, 4, 4), dtype=np.int16) + np.array([-1000, 0, 100, 300, 40], dtype=np.int16)[:, None, None]
    for direction in ((1, 0, 0, 0, 1, 0, 0, 0, 1), (1, 0, 0, 0, 1, 0, 0, 0, -1)):  # z up and z flipped
        g = Geometry((0.7, 0.7, 1.0), (-10.0, 5.0, 30.0), direction, hu.shape)
        volume = CTVolume(hu, g)
        assert changed(volume, "offset", 0).hu[:, 0, 0].tolist() == [-950, 50, 150, 350, 90]
        assert changed(volume, "gain", 0).hu[:, 0, 0].tolist() == [-900, 0, 90, 270, 36]
        assert changed(volume, "smooth", 0).hu[:, 0, 0].tolist() == hu[:, 0, 0].tolist()  # uniform slices stay
        thick = changed(volume, "thick", 0)
        assert thick.hu[:, 0, 0].tolist() == [-500, 200] and thick.geometry.spacing == (0.7, 0.7, 2.0)
        # each thick slice lies midway between the two it averages, in world mm
        for k in range(2):
            between = (g.voxel_to_world([2 * k, 1, 2]) + g.voxel_to_world([2 * k + 1, 1, 2])) / 2
            np.testing.assert_allclose(thick.geometry.voxel_to_world([k, 1, 2]), between)
    coarse = CTVolume(hu, Geometry((0.7, 0.7, 2.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), hu.shape))
    assert changed(coarse, "thick", 0).hu.shape == hu.shape  # already thick: left as it is
    flat = CTVolume(np.zeros((4, 64, 64), dtype=np.int16), coarse.geometry.crop((0, 0, 0), (4, 64, 64)))
    noisy = changed(flat, "noise", 3).hu
    assert 20 < noisy.std() < 30 and abs(noisy.mean()) < 1
    assert (noisy == changed(flat, "noise", 3).hu).all() and not (noisy == changed(flat, "noise", 4).hu).all()


@pytest.mark.slow  # a benchmark over a trained run's scans: `python -m pytest -m slow`
def test_robustness_on_a_trained_run(trained, phantom_root, tmp_path, capsys):
    from robustness import main

    argv = ["--checkpoint", str(trained / "best.pt"), "--data", str(phantom_root), "--threads", "1"]
    assert main(argv + ["--scans", "2", "--changes", "none,offset,thick"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "/" in line][1:]
    assert [r[1].strip() for r in rows] == ["none", "offset", "thick"] and rows[0][3].strip() == "+0.000"
    assert all(0 <= float(r[2]) <= 1 for r in rows)
    assert main(argv + ["--changes", "none,blur"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'none,blur'" in err and "choose from" in err
    assert main(argv[:2] + ["--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err
    broken = tmp_path / "broken"
    shutil.copytree(phantom_root, broken)
    raw = sorted(broken.glob("subset*/*.raw"))[0]
    raw.unlink()
    assert main(argv[:2] + ["--data", str(broken), "--changes", "none"]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines()[-1].startswith("error: ") and raw.name in err.splitlines()[-1] and "| none" not in out
