"""kill -9 loses nothing: prepare, train, predict and compare, killed at a random point and run
again, end with the outputs of a run that was never interrupted; a full disk leaves the old state.

Each command first runs uninterrupted and is timed; the kills land at seeded random fractions of
that time, so they hit the command's middle on a slow machine and a fast one alike. Each command
runs twice or more, so the kills are slow tests (``python -m pytest -m slow``: four points each);
the full disks are in the default suite.
"""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from noduledet.cli import main

KILLS = [pytest.param(s, id=f"kill-{s + 1}", marks=pytest.mark.slow) for s in (0, 1, 2, 3)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "noduledet.cli", *map(str, args)]


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.perf_counter() - start


def _killed(cmd: list[str], after: float) -> None:
    """Start ``cmd`` and SIGKILL it ``after`` seconds later (if it is still running)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        proc.wait(timeout=after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _kill_point(seed: int, duration: float) -> float:
    return float(np.random.default_rng(seed).uniform(0.25, 0.9)) * duration


def _digest_tree(root: Path, skip=()) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip}


@pytest.mark.parametrize("seed", KILLS)
def test_prepare_killed_and_run_again_makes_the_same_cache(seed, phantom_root, tmp_path):
    duration = _timed(_cli("prepare", phantom_root, "--cache", tmp_path / "straight", "--workers", "1"))
    cmd = _cli("prepare", phantom_root, "--cache", tmp_path / "killed", "--workers", "1")
    _killed(cmd, _kill_point(seed, duration))
    _timed(cmd)
    straight, killed = _digest_tree(tmp_path / "straight"), _digest_tree(tmp_path / "killed")
    manifest = "manifest.json"
    assert {k: v for k, v in straight.items() if k != manifest} == {k: v for k, v in killed.items() if k != manifest}
    a, b = (json.loads((tmp_path / d / manifest).read_text()) for d in ("straight", "killed"))
    assert {k: v for k, v in a.items() if k != "data_root"} == {k: v for k, v in b.items() if k != "data_root"}


def _train_config(tmp_path: Path, phantom_root: Path, phantom_cache: Path, name: str) -> Path:
    from tests.conftest import tiny_config

    from noduledet.config import config_yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(config_yaml(tiny_config(phantom_root, phantom_cache, tmp_path / name, "train.threads=1")))
    return path


@pytest.mark.parametrize("seed", KILLS)
def test_train_killed_and_resumed_ends_bit_for_bit(seed, phantom_root, phantom_cache, tmp_path):
    duration = _timed(_cli("train", _train_config(tmp_path, phantom_root, phantom_cache, "straight")))
    cmd = _cli("train", _train_config(tmp_path, phantom_root, phantom_cache, "killed"))
    _killed(cmd, _kill_point(seed, duration))
    _timed(cmd + ["--resume"])
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("straight", "killed"))
    assert a["epoch"] == b["epoch"] and a["history"][-1]["loss"] == b["history"][-1]["loss"]
    for part in ("model", "stage2"):
        state_a = a[part] if part == "model" else a[part]["state"]
        state_b = b[part] if part == "model" else b[part]["state"]
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a), part
    assert a["operating_points"] == b["operating_points"]


@pytest.mark.parametrize("seed", KILLS)
def test_predict_killed_and_resumed_writes_the_same_csv(seed, phantom_root, random_checkpoint, tmp_path):
    args = [phantom_root, "--checkpoint", random_checkpoint, "--no-pictures"]
    duration = _timed(_cli("predict", *args, "-o", tmp_path / "straight"))
    cmd = _cli("predict", *args, "-o", tmp_path / "killed")
    _killed(cmd, _kill_point(seed, duration))
    _timed(cmd + ["--resume"])
    assert (tmp_path / "killed" / "candidates.csv").read_text() == (tmp_path / "straight" / "candidates.csv").read_text()
    assert not list((tmp_path / "killed").glob(".*.partial"))


@pytest.mark.parametrize("seed", KILLS)
def test_compare_killed_and_run_again_makes_the_same_table(seed, phantom_root, phantom_cache, tmp_path):
    def cmd(out):
        return _cli("compare", "--table", "3", "--data", phantom_root, "--cache", phantom_cache, "--epochs", "1",
                    "--variants", "res", "ccapm", "--size", "64", "-o", out, "data.patch=64", "train.batch_size=4",
                    "data.val_fraction=0.25", "data.pixel_mm=4.0", "train.threads=1", "stage2.enabled=false")

    duration = _timed(cmd(tmp_path / "straight"))
    _killed(cmd(tmp_path / "killed"), _kill_point(seed, duration))
    _timed(cmd(tmp_path / "killed"))
    rows = [[line.split(",")[:11] for line in (tmp_path / d / "table3.csv").read_text().splitlines()]
            for d in ("straight", "killed")]  # the metric columns; ms and the like are timings
    assert rows[0] == rows[1]


def test_a_full_disk_keeps_the_last_checkpoint_and_says_so(trained, tmp_path, monkeypatch, capsys):
    """Writing best.pt or last.pt fails for lack of space: the previous file stays whole, and the
    command stops with one line."""
    import shutil

    from noduledet import checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = (run / "last.pt").read_bytes()
    real = torch.save

    def full(obj, path, *args, **kwargs):
        real(obj, path, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    ckpt = checkpoint.load(run / "last.pt")
    from noduledet.errors import UserError

    with pytest.raises(UserError, match="no space left on the device; the previous version is kept"):
        checkpoint.save(ckpt, run / "last.pt")
    assert (run / "last.pt").read_bytes() == before and not list(run.glob(".last.pt.tmp*"))


def test_a_full_disk_while_predicting_leaves_no_half_scan(phantom_root, random_checkpoint, tmp_path, monkeypatch,
                                                         capsys):
    from noduledet import predict as predict_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(predict_module, "write_findings", full)
    out = tmp_path / "out"
    assert main(["predict", str(phantom_root), "--checkpoint", str(random_checkpoint), "-o", str(out),
                 "--no-pictures"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left on the device" in err
    assert not list(out.glob(".*.partial")) and not (out / "candidates.csv").exists()
    assert [p.name for p in out.iterdir()] == ["run.json"]  # resumable: --resume once there is space
