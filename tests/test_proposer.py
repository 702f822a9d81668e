"""The 3D proposer (noduledet.proposer, noduledet.models.proposer3d): peaks, targets, learning, world mm."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from noduledet.config import Config
from noduledet.data.ct import CTVolume
from noduledet.data.lung import segment_lungs
from noduledet.geometry import Geometry
from noduledet.models.proposer3d import NoduleProposer3D, ProposerSpec
from noduledet.proposer import GridScan, fit_proposer, heat_map, look, peaks, propose, targets
from tests.conftest import flipped_xy

SPEC = ProposerSpec(1.25, 4, (-1000.0, 400.0))


def test_the_network_keeps_half_the_input_size_and_every_parameter_learns():
    model = NoduleProposer3D(SPEC)
    out = model(torch.rand(2, 1, 16, 24, 32))
    assert out.shape == (2, 5, 8, 12, 16)
    out.abs().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert torch.sigmoid(model.eval()(torch.zeros(1, 1, 8, 8, 8))[0, 0]).mean().item() == pytest.approx(0.01, abs=0.005)


def test_peaks_decode_position_score_and_size_by_hand():
    maps = np.zeros((5, 6, 8, 10), dtype=np.float32)
    maps[0] = -10.0
    maps[0, 3, 4, 5] = 2.0  # the one local maximum above 0.01
    maps[1:4, 3, 4, 5] = [0.25, -0.5, 0.1]  # offset from the cell, in cells
    maps[4, 3, 4, 5] = np.log(0.8)  # 8 mm
    at, score, diameter = peaks(maps, 10, 0.01)
    np.testing.assert_allclose(at, [[6.5, 7.0, 10.2]])  # 2 x (cell + offset): cell k is centred on input voxel 2k
    np.testing.assert_allclose(score, [1 / (1 + np.exp(-2.0))], rtol=1e-6)
    np.testing.assert_allclose(diameter, [8.0], rtol=1e-6)
    assert len(peaks(maps, 10, 0.95)[0]) == 0


def test_targets_by_hand():
    t = targets(np.array([[8.0, 9.0, 7.0, 5.0]]), np.array([[20.0, 20.0, 20.0, -1.0]]), 32, 1.25)
    assert t["heat"].shape == (16, 16, 16)
    assert t["heat"][4, 4, 4] == 1.0 and t["heat"].max() == 1.0 and (t["heat"] == 1.0).sum() == 1  # round(9 / 2) = 4
    assert 0 < t["heat"][4, 4, 5] < 1  # a Gaussian around the centre
    np.testing.assert_allclose(t["regress"][:3, 4, 4, 4], [0.0, 0.5, -0.5])  # (8, 9, 7) / 2 - (4, 4, 4)
    np.testing.assert_allclose(t["regress"][:3, 3, 5, 4], [1.0, -0.5, -0.5])  # from a neighbouring cell
    np.testing.assert_allclose(t["regress"][3, 4, 4, 4], np.log(0.5))
    assert t["near"].sum() == 27
    assert t["weight"][10, 10, 10] == 0 and t["weight"][4, 4, 4] == 1  # nothing learnt on the excluded finding


class BrightCentres(NoduleProposer3D):
    """A proposer without learning: the centre of every blob brighter than soft tissue (> 120 HU),
    found by pooling, with its offset from the cell's centre; it tests the road from a scan's
    voxels to world millimetres."""

    def forward(self, x):
        bright = (x > 0.8).float()
        mass = F.avg_pool3d(bright, 7, 1, 3, count_include_pad=False)
        idx = [torch.arange(n, dtype=torch.float32) for n in x.shape[2:]]
        coords = torch.stack(torch.meshgrid(*idx, indexing="ij"))[None]  # (1, 3, D, H, W)
        centre = F.avg_pool3d(bright * coords, 7, 1, 3, count_include_pad=False) / mass.clamp(min=1e-6)
        cells = coords[:, :, ::2, ::2, ::2]
        heat = (mass[:, :, ::2, ::2, ::2] - 0.1) * 4 - ((centre[:, :, ::2, ::2, ::2] - cells) ** 2).sum(1, keepdim=True)
        offset = (centre[:, :, ::2, ::2, ::2] - cells) / 2
        return torch.cat([heat, offset, torch.full_like(heat, np.log(0.8))], dim=1)


def _chest(flipped: bool):
    """A body of soft tissue (40 HU) around lungs holding an 8 mm nodule free in the lung and a 16 mm
    one on the pleura (drawn in the lung only, as a reader outlines it), both at 200 HU; both
    nodules' world centres."""
    spacing, shape = (0.8, 0.8, 1.5), (50, 90, 90)
    zz, yy, xx = np.indices(shape).astype(np.float32)
    z, y, x = zz * spacing[2], yy * spacing[1], xx * spacing[0]
    body = ((y - 36) / 40) ** 2 + ((x - 36) / 40) ** 2 <= 1
    lungs = (((y - 36) / 28) ** 2 + ((x - 36) / 30) ** 2 <= 1) & (z > 5) & (z < 70)
    hu = np.where(lungs, -850, np.where(body, 40, -1000)).astype(np.int16)
    free = ((z - 35) ** 2 + (y - 30) ** 2 + (x - 40) ** 2 <= 4.0 ** 2)
    pleural = ((z - 40) ** 2 + (y - 36) ** 2 + (x - 60) ** 2 <= 8.0 ** 2) & lungs  # x = 66 is the lung's edge
    hu[free | pleural] = 200
    g = Geometry(spacing, (-30.0, 12.0, -200.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), shape)
    centres = [g.voxel_to_world(np.argwhere(m).mean(axis=0)) for m in (free, pleural)]
    volume = CTVolume(hu, g)
    return (flipped_xy(volume) if flipped else volume), centres


def test_a_nodule_on_the_pleura_is_in_the_lungs_closed_by_the_rolling_ball():
    volume, (_, pleural) = _chest(False)
    lungs = segment_lungs(volume)
    at = volume.geometry.world_to_voxel(pleural)
    cell = tuple((at / np.array(lungs.block)).astype(int))
    assert not lungs.coarse[cell]  # the nodule is a notch in the air ...
    assert lungs.contains(at[None], volume.geometry.spacing, reach_mm=0.0)[0]  # ... that the closing fills
    outside = volume.geometry.world_to_voxel(pleural + np.array([25.0, 0, 0]))  # in the chest wall, 25 mm out
    assert not lungs.contains(outside[None], volume.geometry.spacing)[0]


@pytest.mark.parametrize("flipped", [False, True], ids=["identity", "flipped"])
def test_the_proposers_peaks_land_on_the_nodules_in_world_mm(flipped):
    volume, centres = _chest(flipped)
    view = look(BrightCentres(SPEC).eval(), volume.hu, volume.geometry)
    found = propose(view, volume.geometry, segment_lungs(volume), count=5)
    for centre, radius in zip(centres, (4.0, 8.0)):  # the free one and the one on the pleura, each within
        d = [np.linalg.norm(c.world_xyz - centre) for c in found]  # half its radius (the FROC asks for the radius)
        assert min(d) < radius / 2, (centre, [c.world_xyz for c in found])
    for c in found:
        assert c.sources == ("proposer",) and c.proposer == c.probability
        np.testing.assert_allclose(volume.geometry.voxel_to_world(c.voxel_zyx), c.world_xyz, atol=1e-6)
    assert found[0].diameter_mm == pytest.approx(8.0, rel=1e-5)
    points = np.array([c.voxel_zyx for c in found] + [volume.geometry.world_to_voxel(centres[0] + [0, 0, 15.0])])
    heat = view.heat_at(points)  # any point's probability: a peak's own, and low 15 mm from a nodule
    np.testing.assert_allclose(heat[:-1], [c.probability for c in found], rtol=1e-6)
    assert heat[-1] < 0.1


def test_heat_map_pads_to_a_multiple_of_eight_and_cuts_the_padding_off():
    maps = heat_map(NoduleProposer3D(SPEC).eval(), np.full((13, 17, 9), -850, dtype=np.float32))
    assert maps.shape == (5, 7, 9, 5)


def _grid_scan(rng: np.random.Generator) -> GridScan:
    """Lung noise on a 2.5 mm grid with two 5-voxel balls (nodules) and two tubes (vessels)."""
    hu = rng.normal(-850, 20, (40, 40, 40)).astype(np.float32)
    idx = np.indices(hu.shape).astype(np.float32)
    nodules = []
    for _ in range(2):
        c = rng.uniform(8, 32, 3)
        hu[((idx - c[:, None, None, None]) ** 2).sum(0) <= 2.5 ** 2] = 30
        nodules.append([*c, 12.5])
    for axis in (0, 1):
        p = rng.uniform(8, 32, 2)
        others = [a for a in range(3) if a != axis]
        hu[(idx[others[0]] - p[0]) ** 2 + (idx[others[1]] - p[1]) ** 2 <= 1.5 ** 2] = 30
    lung = np.argwhere(hu < -500)[::50]
    return GridScan(hu.astype(np.int16), np.array(nodules), np.zeros((0, 4)), lung)


def test_the_proposer_learns_to_mark_balls_and_not_tubes():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    scans = [_grid_scan(rng) for _ in range(4)]
    cfg = Config()
    cfg.proposer = replace(cfg.proposer, spacing_mm=2.5, width=4, patch=24, batch_size=4, steps=60, lr=0.01,
                           synthetic=0.0, scale=0.0)
    model = fit_proposer(scans, cfg, torch.device("cpu"))
    test = _grid_scan(np.random.default_rng(99))
    at, score, _ = peaks(heat_map(model, test.hu.astype(np.float32)), 4, 0.0)
    first_two = at[:2]
    dist = np.linalg.norm(first_two[:, None] - test.nodules[None, :, :3], axis=-1)
    assert sorted(dist.argmin(axis=1)) == [0, 1] and dist.min(axis=1).max() < 2.0  # both balls first, within 5 mm
