"""Synthetic nodules for the second stage's training (noduledet.data.lesions)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from noduledet.config import Config
from noduledet.data.lesions import nodule, paste_nodule, paste_vessel, pasteable
from noduledet.fpr import fit


@pytest.mark.parametrize("diameter", [3.0, 6.0, 12.0, 20.0])
def test_a_nodule_has_the_volume_of_its_diameter(diameter):
    rng = np.random.default_rng(int(diameter))
    for _ in range(3):
        occ, _ = nodule(1.25, rng, diameter, "solid")
        assert occ.shape[0] % 2 == 1 and occ.shape[0] == occ.shape[1] == occ.shape[2]
        equivalent = (6 * occ.sum() * 1.25 ** 3 / np.pi) ** (1 / 3)  # LUNA16's diameter: the sphere of equal volume
        assert equivalent == pytest.approx(diameter, rel=0.08)
        centroid = (np.indices(occ.shape) * occ).reshape(3, -1).sum(axis=1) / occ.sum()
        assert np.abs(centroid - occ.shape[0] // 2).max() <= max(1.0, diameter / 1.25 / 8)


@pytest.mark.parametrize("kind, lo, hi", [("solid", -90, 90), ("ground-glass", -710, -340)])
def test_a_nodule_has_the_density_of_its_kind(kind, lo, hi):
    rng = np.random.default_rng(1)
    for _ in range(5):
        occ, hu = nodule(1.0, rng, 10.0, kind)
        assert lo < hu[occ > 0.9].mean() < hi


def test_a_part_solid_nodule_has_a_solid_core_in_ground_glass():
    occ, hu = nodule(1.0, np.random.default_rng(2), 14.0, "part-solid")
    c = occ.shape[0] // 2
    assert hu[c, c, c] > -100 and np.median(hu[occ > 0.9]) < -300


def test_pasting_blends_a_nodule_into_lung_and_never_darkens():
    rng = np.random.default_rng(3)
    lung = np.full((24, 24, 24), -850, dtype=np.int16)
    out, shows = paste_nodule(lung, 1.25, rng, offset=2.0, where="free")
    assert out.dtype == np.float32 and out.shape == lung.shape
    assert (out >= lung).all()
    brighter = out > -700
    assert 3 <= brighter.sum() < out.size / 4
    centre = np.argwhere(brighter).mean(axis=0)
    assert np.abs(centre - 11.5).max() <= 3.5  # within the offset (and a lobulation) of the middle
    assert np.abs(shows[:3] - centre).max() < 1.0 and shows[3] > 2.0  # where it shows, and its size
    wall = np.full((24, 24, 24), 200, dtype=np.int16)  # brighter than any nodule: left as it was
    out, shows = paste_nodule(wall, 1.25, rng, 2.0)
    np.testing.assert_array_equal(out, wall)
    assert shows is None


def test_pasting_near_the_border_stays_inside_the_cube():
    out, _ = paste_nodule(np.full((10, 10, 10), -850, dtype=np.int16), 2.5, np.random.default_rng(4), offset=4.0)
    assert out.shape == (10, 10, 10) and out.max() > -700


def _wall_and_vessel():
    """Lung (-850 HU) with the chest wall (40 HU) filling x >= 50 and a 1.5 mm vessel along z at
    (y, x) = (10, 10), on a 1 mm grid: room for a free nodule of 20 mm."""
    cube = np.full((60, 60, 60), -850, dtype=np.int16)
    cube[:, :, 50:] = 40
    y, x = np.indices((60, 60))
    cube[:, (y - 10) ** 2 + (x - 10) ** 2 <= 1.5 ** 2] = 40
    return cube


@pytest.mark.parametrize("where", ["pleural", "vascular", "free"])
def test_a_nodule_is_placed_where_it_is_asked(where):
    cube = _wall_and_vessel()
    y, x = np.indices((60, 60))
    by_wall = np.broadcast_to(x >= 49, cube.shape)  # the voxel of lung before the wall
    by_vessel = np.broadcast_to(((y - 10) ** 2 + (x - 10) ** 2 <= 3.5 ** 2) & ((y - 10) ** 2 + (x - 10) ** 2 > 1.5 ** 2),
                                cube.shape)
    for seed in range(5):
        out, shows = paste_nodule(cube, 1.0, np.random.default_rng(seed), offset=None, where=where)
        nodule_voxels = (out > cube + 100) & (cube < -500)  # ground glass too
        assert shows is not None and cube[tuple(np.rint(shows[:3]).astype(int))] < -500  # centred in the lung
        touches = {"pleural": (nodule_voxels & by_wall).any(), "vascular": (nodule_voxels & by_vessel).any()}
        if where == "free":
            assert not any(touches.values())
        else:
            assert touches[where]
        assert out[:, :, 50:].min() >= 40  # the wall is never darkened


def test_a_vascular_nodule_without_a_vessel_gets_one():
    lung = np.full((30, 30, 30), -850, dtype=np.int16)
    out, shows = paste_nodule(lung, 1.0, np.random.default_rng(7), offset=3.0, where="vascular")
    assert shows is not None and (out > -300).sum() > 3 * (np.pi / 6 * shows[3] ** 3)  # a tube beside the nodule


def test_only_cubes_whose_centre_is_mostly_lung_take_a_nodule():
    cubes = np.full((3, 20, 20, 20), -850, dtype=np.int16)
    cubes[1] = 40  # chest wall
    cubes[2, :, :, 9:] = 40  # the pleura through the centre: 40% of the central 10 mm is lung
    np.testing.assert_array_equal(pasteable(cubes, 10.0, 1.0), [True, False, False])
    cubes[2, :, :, 9] = -850  # 50%
    assert pasteable(cubes, 10.0, 1.0)[2]


def test_the_classifier_learns_nodules_from_vessels_on_pasted_ones_alone():
    """Every cube of this training set is empty lung, the 'nodules' too: what the classifier
    learns, it learns from the pasted nodules and vessels."""
    cfg = Config()
    cfg.stage2 = replace(cfg.stage2, size=12, spacing_mm=2.5, width=4, epochs=8, samples_per_epoch=256,
                         batch_size=32, lr=0.01, synthetic=1.0, scale=0.0)
    rng = np.random.default_rng(5)
    cubes = (-850 + rng.normal(0, 20, (40, 14, 14, 14))).astype(np.int16)
    model = fit(cubes, np.array([1, 1] + [0] * 38), cfg, torch.device("cpu"))
    plain = cubes[2:22, 1:13, 1:13, 1:13]
    pasted = np.stack([paste_nodule(c, 2.5, rng)[0] for c in plain] + [paste_vessel(c, 2.5, rng) for c in plain])
    with torch.no_grad():
        p = torch.sigmoid(model(model.window(torch.from_numpy(pasted)))).numpy()
    assert p[:20].mean() > p[20:].mean() + 0.4
