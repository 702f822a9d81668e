import numpy as np
import pytest

from noduledet.boxes import clip_boxes, sphere_box
from noduledet.geometry import Geometry, pixel_to_voxel, voxel_to_pixel

FLIPPED = Geometry((0.5, 0.8, 2.0), (100.0, -50.0, -300.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1), (10, 20, 30))


def test_known_voxel_to_world_with_flipped_direction():
    # x = 100 - 0.5 * 4 = 98; y = -50 - 0.8 * 3 = -52.4; z = -300 + 2 * 2 = -296
    np.testing.assert_allclose(FLIPPED.voxel_to_world([2, 3, 4]), [98.0, -52.4, -296.0])
    np.testing.assert_allclose(FLIPPED.world_to_voxel([98.0, -52.4, -296.0]), [2, 3, 4])


def test_world_voxel_round_trip_oblique():
    th = 0.4
    d = (np.cos(th), -np.sin(th), 0, np.sin(th), np.cos(th), 0, 0, 0, 1)
    g = Geometry((0.7, 0.7, 1.25), (-170.0, -200.0, -400.0), d, (50, 512, 512))
    v = np.random.default_rng(0).uniform(0, 50, (20, 3))
    np.testing.assert_allclose(g.world_to_voxel(g.voxel_to_world(v)), v, atol=1e-9)


def test_crop_keeps_world_positions():
    crop = FLIPPED.crop((3, 5, 7), (4, 6, 8))
    np.testing.assert_allclose(crop.voxel_to_world([1, 2, 3]), FLIPPED.voxel_to_world([4, 7, 10]))


def test_bad_direction_is_refused():
    with pytest.raises(ValueError, match="orthonormal"):
        Geometry((1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 0, 0, 0, 0, 1), (1, 1, 1))


def test_pixel_centres_are_half_integers():
    np.testing.assert_allclose(voxel_to_pixel([3, 7]), [7.5, 3.5])
    np.testing.assert_allclose(pixel_to_voxel(voxel_to_pixel([[3, 7], [0.25, 9]])), [[3, 7], [0.25, 9]])


def test_sphere_box_by_hand():
    # centre voxel (z, y, x) = (10, 20, 30), radius 5 mm, 0.5 mm pixels, 2 mm slices.
    # slice 11 is 2 mm from the centre: the cut circle has radius sqrt(25 - 4) = 4.583 mm = 9.165 px
    r = np.sqrt(21) / 0.5
    np.testing.assert_allclose(sphere_box((10, 20, 30), 5.0, 11, (0.5, 0.5, 2.0)),
                               [30.5 - r, 20.5 - r, 30.5 + r, 20.5 + r])
    assert sphere_box((10, 20, 30), 5.0, 13, (0.5, 0.5, 2.0)) is None  # 6 mm away: misses
    # 4.8 mm away cuts a circle of radius 1.4 mm < half the radius: a cap, no box
    assert sphere_box((10, 20, 30), 5.0, 12.4, (0.5, 0.5, 2.0)) is None


def test_clip_boxes_reports_what_it_kept():
    boxes, keep = clip_boxes(np.array([[-5, 2, 10, 8], [50, 50, 60, 60], [3, 3, 3.5, 9]]), 40, 40)
    np.testing.assert_allclose(boxes, [[0, 2, 10, 8]])
    assert keep.tolist() == [True, False, False]
