import json

import numpy as np
import pytest
import torch

from noduledet.cli import main
from noduledet.config import DataConfig
from noduledet.data.cache import SliceCache, prepare
from noduledet.data.dataset import SliceDataset, collate
from noduledet.data.luna16 import Luna16
from noduledet.data.splits import split_scans
from noduledet.errors import UserError


def test_cache_places_nodules_in_crop_voxels(phantom_root, phantom_cache):
    cache = SliceCache(phantom_cache)
    ann = Luna16(phantom_root).annotations()
    assert sorted(cache.uids) == sorted(set(Luna16(phantom_root).uids))
    for uid in cache.uids:
        g = cache.geometry(uid)
        vol = cache.volume(uid)
        assert vol.dtype == np.int16 and vol.shape == g.shape
        for n, xyz in zip(cache.nodules(uid), ann.for_scan(uid).xyz):
            np.testing.assert_allclose(g.voxel_to_world(n.center_zyx), xyz, atol=1e-6)
            z, y, x = np.round(n.center_zyx).astype(int)
            assert vol[z, y, x] > -750


def test_prepare_resumes_and_refuses_other_settings(phantom_root, tmp_path):
    cache = tmp_path / "c"
    prepare(phantom_root, cache)
    victim = sorted((cache / "scans").glob("*.json"))[0]
    stamp = {p.name: p.stat().st_mtime_ns for p in (cache / "scans").glob("*.json") if p != victim}
    victim.unlink()  # as if interrupted before this scan finished
    prepare(phantom_root, cache)
    assert victim.exists()
    assert {p.name: p.stat().st_mtime_ns for p in (cache / "scans").glob("*.json") if p != victim} == stamp
    with pytest.raises(UserError, match=r"a cache made with data\.margin_mm=10\.0 \(the config: 20\); use another --cache"):
        prepare(phantom_root, cache, DataConfig(margin_mm=20))
    prepare(phantom_root, cache, DataConfig(margin_mm=20), force=True)
    assert json.loads((cache / "manifest.json").read_text())["settings"]["margin_mm"] == 20


def test_incomplete_cache_is_refused(phantom_cache, tmp_path):
    manifest = json.loads((phantom_cache / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(UserError, match="incomplete"):
        SliceCache(tmp_path)
    with pytest.raises(UserError, match="no prepared cache here"):
        SliceCache(tmp_path / "nothing")


def test_prepare_cli(phantom_root, tmp_path, capsys):
    assert main(["prepare", str(phantom_root), "--cache", str(tmp_path / "c"), "--workers", "1"]) == 0
    assert "cache ready: 4 scans" in capsys.readouterr().out


def test_training_items(phantom_cache):
    cache = SliceCache(phantom_cache)
    ds = SliceDataset(cache, cache.uids, train=True, patch=64, negatives=1.0, masks=True, seed=1)
    assert len(ds.positives) > 0 and len(ds) == 2 * len(ds.positives)
    for i in range(len(ds)):
        image, target, info = ds[i]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        b = target["boxes"]
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]) & (b >= 0).all(1) & (b[:, 2:] <= 64).all(1)).all()
        assert target["masks"].shape == (len(b), 64, 64)
        if i < len(ds.positives):  # augmented too: shifts, zooms, flips and turns keep the nodule in the patch
            assert len(b) >= 1


def test_positive_patches_hold_their_nodule(phantom_cache):
    cache = SliceCache(phantom_cache)
    ds = SliceDataset(cache, cache.uids, train=True, patch=64, augment=False, masks=True)
    for i in range(len(ds.positives)):
        image, target, _ = ds[i]
        assert len(target["boxes"]) >= 1
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert xs.min() >= int(box[0]) - 1 and xs.max() < int(np.ceil(float(box[2]))) + 1
            assert ys.min() >= int(box[1]) - 1 and ys.max() < int(np.ceil(float(box[3]))) + 1


def test_items_depend_on_seed_epoch_index_only(phantom_cache):
    cache = SliceCache(phantom_cache)
    a = SliceDataset(cache, cache.uids, patch=64, seed=5)
    b = SliceDataset(cache, cache.uids, patch=64, seed=5)
    a.set_epoch(2), b.set_epoch(2)
    for i in (0, len(a) - 1):
        torch.testing.assert_close(a[i][0], b[i][0])
    b.set_epoch(3)
    assert not torch.equal(a[len(a) - 1][0], b[len(b) - 1][0])


def test_eval_items_are_whole_lung_slices(phantom_cache):
    cache = SliceCache(phantom_cache)
    uid = cache.uids[0]
    ds = SliceDataset(cache, [uid], train=False)
    assert len(ds) == len(cache.meta(uid)["lung_slices"])
    images, targets, infos = collate([ds[0], ds[1]])
    assert images[0].shape[1:] == cache.volume(uid).shape[1:]
    assert infos[1]["z"] == cache.meta(uid)["lung_slices"][1]


def test_splits_never_share_a_scan():
    uids = [f"s{i}" for i in range(40)]
    subset = {u: i % 10 for i, u in enumerate(uids)}
    s = split_scans(uids, subset, test_fraction=0.25, val_fraction=0.1, seed=0)
    assert len(s["test"]) == 10 and len(s["val"]) == 4 and len(s["train"]) == 26
    assert not (set(s["train"]) & set(s["test"])) and not (set(s["train"]) & set(s["val"]))
    assert sorted(s["train"] + s["val"] + s["test"]) == sorted(uids)
    folds = split_scans(uids, subset, test_subsets=(9,), val_subsets=(8,))
    assert all(subset[u] == 9 for u in folds["test"]) and all(subset[u] not in (8, 9) for u in folds["train"])
    with pytest.raises(UserError, match="both validation and test"):
        split_scans(uids, subset, test_subsets=(9,), val_subsets=(9,))
