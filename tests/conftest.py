from pathlib import Path

import numpy as np
import pytest
import torch

# One thread: tiny tensors gain little from a second, and beside another process on 2 cores (a CI
# runner, a training run) two threads wait on each other: a 512x512 matrix product ran at 17
# GFLOP/s on two threads there against 110 on one.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def _glibc_malloc(monkeypatch):
    """In-process CLI calls leave malloc and the environment of later tests' subprocesses as they were."""
    monkeypatch.setattr("noduledet.cli.keep_freed_memory", lambda: False)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """A small phantom in the LUNA16 layout: 4 scans of 96x96 pixels, 1-2 nodules of 8-20 mm."""
    from noduledet.data.phantom import write_dataset

    root = tmp_path_factory.mktemp("phantom") / "luna"
    write_dataset(root, scans=4, seed=3, size=96, nodules=(1, 2), diameters=(8.0, 20.0))
    return root


@pytest.fixture(scope="session")
def phantom_cache(phantom_root, tmp_path_factory) -> Path:
    from noduledet.data.cache import prepare

    cache = tmp_path_factory.mktemp("cache") / "cache"
    prepare(phantom_root, cache)
    return cache


def flipped_xy(volume):
    """The same patient stored with x and y reversed (direction -1, -1, 1), as four LUNA16 scans are."""
    from noduledet.data.ct import CTVolume
    from noduledet.geometry import Geometry

    g = volume.geometry
    d = np.asarray(g.direction, dtype=float).reshape(3, 3) * [-1, -1, 1]  # columns: index axes x, y, z
    origin = g.voxel_to_world([0, g.shape[1] - 1, g.shape[2] - 1])
    flipped = Geometry(g.spacing, tuple(float(v) for v in origin), tuple(d.ravel()), g.shape)
    return CTVolume(np.ascontiguousarray(volume.hu[:, ::-1, ::-1]), flipped, volume.source)


def write_random_checkpoint(path: Path, variant: str = "res", masks: bool = False) -> Path:
    """A checkpoint of an untrained model that reports every box (score threshold 0): for
    testing the plumbing, whose outputs depend on the input alone. Its working pixel is 4 mm,
    about the test phantom's own (0.7 mm would look at every slice upsampled to 550 px)."""
    from noduledet import checkpoint
    from noduledet.config import Config
    from noduledet.models import build_detector

    torch.manual_seed(0)
    model = build_detector(variant, box_score_thresh=0.0, masks=masks)
    cfg = Config()
    cfg.model.variant, cfg.model.masks, cfg.data.pixel_mm = variant, masks, 4.0
    checkpoint.save(checkpoint.Checkpoint(variant, model.spec.to_dict(), cfg, model.state_dict()), path)
    return path


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pt")


def tiny_config(phantom_root, phantom_cache, out, *extra):
    """Two quick epochs on the test phantom."""
    from noduledet.config import load_config

    return load_config(None, [
        f"data.root={phantom_root}", f"data.cache={phantom_cache}", "data.patch=64",
        "data.test_fraction=0.25", "data.val_fraction=0.25", f"train.out={out}", "train.epochs=2",
        "train.batch_size=4", "train.warmup_iters=2", "train.threads=1", "stage2.epochs=1",
        "stage2.samples_per_epoch=32", "stage2.batch_size=16", "stage2.size=12", "stage2.spacing_mm=2.5",
        "stage2.width=4", "data.pixel_mm=4.0", "proposer.steps=2", "proposer.batch_size=2", "proposer.patch=16",
        "proposer.spacing_mm=4.0", "proposer.width=4", "proposer.candidates=5", "proposer.min_score=0.0", *extra])


@pytest.fixture(scope="session")
def trained(phantom_root, phantom_cache, tmp_path_factory) -> Path:
    """A run directory trained for two epochs on the test phantom."""
    from noduledet import engine

    out = tmp_path_factory.mktemp("runs") / "run"
    engine.train(tiny_config(phantom_root, phantom_cache, out), log=None)
    return out
