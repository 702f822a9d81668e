"""Synthetic nodules for both stages' training (noduledet.data.lesions)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from noduledet.config import Config
from noduledet.data.lesions import nodule, paste_nodule, paste_nodule_planes, paste_vessel, pasteable
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
    out = paste_nodule(lung, 1.25, rng, offset=2.0)
    assert out.dtype == np.float32 and out.shape == lung.shape
    assert (out >= lung).all()
    brighter = out > -700
    assert 3 <= brighter.sum() < out.size / 4
    centre = np.argwhere(brighter).mean(axis=0)
    assert np.abs(centre - 11.5).max() <= 3.5  # within the offset (and a lobulation) of the middle
    wall = np.full((24, 24, 24), 200, dtype=np.int16)  # brighter than any nodule: left as it was
    np.testing.assert_array_equal(paste_nodule(wall, 1.25, rng, 2.0), wall)


def test_pasting_near_the_border_stays_inside_the_cube():
    out = paste_nodule(np.full((10, 10, 10), -850, dtype=np.int16), 2.5, np.random.default_rng(4), offset=4.0)
    assert out.shape == (10, 10, 10) and out.max() > -700


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
    torch.set_num_threads(2)
    rng = np.random.default_rng(5)
    cubes = (-850 + rng.normal(0, 20, (40, 14, 14, 14))).astype(np.int16)
    model = fit(cubes, np.array([1, 1] + [0] * 38), cfg, torch.device("cpu"))
    plain = cubes[2:22, 1:13, 1:13, 1:13]
    pasted = np.stack([paste(c, 2.5, rng) for paste in (paste_nodule, paste_vessel) for c in plain])
    with torch.no_grad():
        p = torch.sigmoid(model(model.window(torch.from_numpy(pasted)))).numpy()
    assert p[:20].mean() > p[20:].mean() + 0.4


def _half_lung(h=80, w=80):
    """2.5D planes (3, h, w): lung on the left, chest wall from column 50."""
    planes = np.full((3, h, w), -850.0, dtype=np.float32)
    planes[:, :, 50:] = 40.0
    return planes


@pytest.mark.parametrize("spacing", [0.5, 0.9])
def test_a_nodule_pasted_into_planes_gets_the_box_of_its_section(spacing):
    rng = np.random.default_rng(6)
    planes = _half_lung()
    for _ in range(20):
        out, box, outline = paste_nodule_planes(planes, (spacing, spacing), (-5.0, 0.0, 5.0), rng)
        assert out.shape == planes.shape and (out >= planes).all()  # blended in, never darker
        x1, y1, x2, y2 = box
        ys, xs = np.nonzero(outline)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
        inside = np.zeros(outline.shape, dtype=bool)
        inside[int(y1):int(y2), int(x1):int(x2)] = True
        changed = np.abs(out[1] - planes[1]) > 100  # where the centre plane now shows the nodule
        assert changed[inside].sum() >= 0.5 * changed.sum() and (x2 - x1) * spacing <= 20 * 1.6
        assert x1 < 50 + (x2 - x1)  # centred on lung, so not deep in the wall


def test_planes_take_no_nodule_without_lung_room_and_keep_clear_of_real_ones():
    rng = np.random.default_rng(7)
    wall = np.full((3, 60, 60), 40.0, dtype=np.float32)
    assert paste_nodule_planes(wall, (0.7, 0.7), (-5.0, 0.0, 5.0), rng) is None
    planes = _half_lung()
    assert paste_nodule_planes(planes, (0.7, 0.7), (-5.0, 0.0, 5.0), rng, allowed=np.zeros((80, 80), bool)) is None
    allowed = np.zeros((80, 80), dtype=bool)
    allowed[:, :25] = True  # the lungs' own mask: only the left half of the lung
    for _ in range(10):
        _, box, _ = paste_nodule_planes(planes, (0.7, 0.7), (-5.0, 0.0, 5.0), rng, taken=[[0, 0, 25, 40]],
                                        allowed=allowed)
        centre_x, centre_y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        assert centre_x < 25 + 2 and centre_y > 40  # inside the allowed pixels, beside the real nodule's box


def test_half_the_pasted_nodules_lie_on_the_lung_edge():
    rng = np.random.default_rng(8)
    planes = np.full((3, 200, 200), 40.0, dtype=np.float32)
    planes[:, 20:180, 20:180] = -850.0  # a lung 112 mm wide at 0.7 mm
    centres = []
    for _ in range(60):
        _, box, _ = paste_nodule_planes(planes, (0.7, 0.7), (-5.0, 0.0, 5.0), rng)
        centres.append(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0]))
    near = [min(x - 20, 180 - x, y - 20, 180 - y) <= w for x, y, w in centres]  # within a diameter of the wall
    assert 0.35 <= np.mean(near) <= 0.85  # by area alone a fifth at most
