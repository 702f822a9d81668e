"""The untrained blob filter that proposes candidates beside stage one (noduledet.blobs)."""

import numpy as np
import pytest
from scipy import ndimage

from noduledet.blobs import _maximum_3x3x3, blob_points, find_blobs, suppress
from noduledet.candidates import Candidate
from noduledet.geometry import Geometry
from noduledet.pipeline import join

BALLS = {"small": ((-10.0, 8.0, 30.0), 1.6), "large": ((15.0, -12.0, 40.0), 5.0)}  # world centre, radius mm


def _chest(spacing):
    """Lungs in a body at ``spacing`` (x, y, z mm): a 3.2 mm and a 10 mm ball and a 5 mm wide
    vessel running the length of the lung along z, all at 40 HU, placed in world mm."""
    sx, sy, sz = spacing
    shape = (int(70 / sz), int(84 / sy), int(84 / sx))
    g = Geometry(spacing, (-42.0, -42.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), shape)
    z, y, x = (np.indices(shape, dtype=np.float32).reshape(3, -1).T @ np.diag([sz, sy, sx])).T.reshape(3, *shape)
    x, y = x - 42.0, y - 42.0
    body = (x / 46) ** 2 + (y / 46) ** 2 <= 1  # wider than the image: touches the border
    lungs = ((x / 34) ** 2 + (y / 30) ** 2 <= 1) & (z > 6) & (z < 64)
    hu = np.where(lungs, -850, np.where(body, 40, -1000)).astype(np.float32)
    hu[lungs & ((x - 5) ** 2 + (y - 15) ** 2 <= 2.5 ** 2)] = 40  # the vessel, seen end-on in every slice
    for (cx, cy, cz), r in BALLS.values():
        hu[(x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= r ** 2] = 40
    return hu.astype(np.int16), g


@pytest.mark.parametrize("spacing", [(0.6, 0.6, 1.25), (1.0, 1.0, 0.7)], ids=["0.6mm", "1.0mm"])
def test_the_balls_come_first_and_the_vessel_not_at_all(spacing):
    hu, g = _chest(spacing)
    found = find_blobs(hu, g, count=10)
    assert len(found) >= 2
    centres = np.array([c for c, _ in BALLS.values()])
    first_two = np.array([c.world_xyz for c in found[:2]])
    dist = np.linalg.norm(first_two[:, None] - centres[None], axis=-1)
    assert sorted(dist.argmin(1)) == [0, 1] and dist.min(1).max() < 1.5  # each ball once, within 1.5 mm
    for c in found[:2]:
        (_, r) = list(BALLS.values())[int(np.linalg.norm(centres - c.world_xyz, axis=1).argmin())]
        assert r / 1.6 < c.diameter_mm / 2 < r * 1.6  # the scale that answered is about the ball's
        assert c.probability == 0.0 and c.slices == 0
    # centred inside the 5 mm tube (a 19 mm scale beside it answers to the tube and its surroundings together)
    along_vessel = [c for c in found if np.hypot(c.world_xyz[0] - 5, c.world_xyz[1] - 15) < 2.5 and 15 < c.world_xyz[2] < 55]
    assert not along_vessel  # a tube has an eigenvalue near zero: no blob, however bright (its ends may be)


def _partial_volume_ball(spacing_zyx, shape, centre_zyx_mm, radius_mm, supersample=4):
    """HU of a 40 HU ball in -850 HU lung, each voxel the mean over ``supersample``^3 points of
    its extent (voxel i is centred at i * spacing), so the centre needs no voxel grid."""
    inside = np.zeros(shape, dtype=np.float32)
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    idx = np.indices(shape, dtype=np.float32)
    for dz in offsets:
        for dy in offsets:
            for dx in offsets:
                d2 = sum(((i + d) * s - c) ** 2 for i, d, s, c in zip(idx, (dz, dy, dx), spacing_zyx, centre_zyx_mm))
                inside += d2 <= radius_mm ** 2
    return -850 + 890 * inside / supersample ** 3


@pytest.mark.parametrize("spacing, shape, tolerance", [((2.5, 0.5, 0.5), (120, 40, 40), 0.6),
                                                       ((1.25, 0.7, 0.7), (200, 30, 30), 0.15)],
                         ids=["2.5mm-slices", "1.25mm-slices"])
def test_a_small_ball_is_found_where_it_is_not_at_the_nearest_grid_point(spacing, shape, tolerance):
    # far along z, where a grid index taken as mm / spacing drifts from the zoomed grid's voxels,
    # and between grid points: the parabola through the response's maximum finds the centre
    for along_z, dy, dx in ((0.62, 0.3, -0.4), (0.78, -0.45, 0.2), (0.93, 0.1, 0.45)):
        centre = (shape[0] * spacing[0] * along_z, shape[1] * spacing[1] / 2 + dy, shape[2] * spacing[2] / 2 + dx)
        at, _, _ = blob_points(_partial_volume_ball(spacing, shape, centre, 1.8), spacing)
        assert np.linalg.norm(at[0] * spacing - centre) < tolerance


def test_the_voxel_centres_map_to_world_through_the_geometry():
    hu, g = _chest((0.6, 0.6, 1.25))
    for c in find_blobs(hu, g, count=2):
        assert np.allclose(g.voxel_to_world(c.voxel_zyx), c.world_xyz)


def test_spots_on_a_candidate_of_the_pool_join_it_and_count_zero():
    hu, g = _chest((1.0, 1.0, 0.7))
    (small, _), (large, _) = BALLS.values()
    taken = Candidate(np.zeros(3), np.array(large), 0.9, 10.0, 3, (0, 0), [])
    pool = join([taken], find_blobs(hu, g, count=11), 10)
    assert pool[0].sources == ("stage1", "blobs") and pool[0].world_xyz is taken.world_xyz  # found by both, kept in place
    assert all(np.linalg.norm(c.world_xyz - np.array(large)) > 5.0 for c in pool[1:])
    assert np.linalg.norm(pool[1].world_xyz - np.array(small)) < 1.5 and pool[1].sources == ("blobs",)
    assert find_blobs(hu, g, count=0) == []


def test_join_by_hand():
    def cand(x: float, d: float, source: str, p: float | None = None) -> Candidate:
        return Candidate(np.zeros(3), np.array([x, 0.0, 0.0]), 0.5, d, 0, (0, 0), [], sources=(source,), proposer=p)

    pool = [cand(0.0, 6.0, "stage1"), cand(30.0, 4.0, "stage1")]
    new = [cand(2.0, 2.0, "proposer", 0.9), cand(10.0, 4.0, "proposer", 0.8), cand(11.0, 4.0, "proposer", 0.7),
           cand(50.0, 4.0, "proposer", 0.6), cand(80.0, 4.0, "proposer", 0.5)]
    out = join(pool, new, 2)
    # 2 mm from the first (radius 3): joins it; 10 mm: new; 11 mm: within 2.5 mm of the one at 10; 50 mm: the
    # second new one; 80 mm: past the count
    assert [c.world_xyz[0] for c in out] == [0.0, 30.0, 10.0, 50.0]
    assert out[0].sources == ("stage1", "proposer") and out[0].proposer == 0.9 and out[1].sources == ("stage1",)
    assert pool[0].sources == ("stage1",)  # the pool given is left as it was


def test_no_lung_no_blobs():
    hu, g = _chest((1.0, 1.0, 0.7))
    solid = np.full_like(hu, 40)
    solid[20:24, 30:34, 30:34] = 300  # a bright spot in a body without air
    assert find_blobs(solid, g, count=10) == []


def test_blob_points_of_a_flat_volume_are_none():
    at, score, radius = blob_points(np.full((20, 20, 20), -850, dtype=np.int16), (1.0, 1.0, 1.0))
    assert at.shape == (0, 3) and len(score) == len(radius) == 0


def test_suppress_by_hand():
    world = np.array([[0.0, 0, 0], [1.0, 0, 0], [10.0, 0, 0], [12.0, 0, 0], [30.0, 0, 0]])
    radius = np.array([3.0, 1.0, 2.0, 1.0, 2.0])
    # point 1 lies within point 0's 3 mm; point 3 within 2.5 mm of point 2
    assert suppress(world, radius, 10) == [0, 2, 4]
    assert suppress(world, radius, 1) == [0]


@pytest.mark.parametrize("shape", [(5, 6, 7), (1, 4, 3), (2, 2, 2), (3, 1, 8)])
def test_the_3x3x3_maximum_is_scipys_filter(shape):
    rng = np.random.default_rng(0)
    for volume in (rng.normal(size=shape).astype(np.float32), rng.integers(0, 3, shape).astype(np.float32)):
        assert np.array_equal(_maximum_3x3x3(volume), ndimage.maximum_filter(volume, size=3))
    volume = np.zeros(shape, np.float32)
    volume[0, 0, 0] = 5.0  # spreads to its neighbours only, the input untouched
    expected = np.zeros(shape, np.float32)
    expected[:2, :2, :2] = 5.0
    assert np.array_equal(_maximum_3x3x3(volume), expected) and volume.sum() == 5.0
