import numpy as np

from noduledet.data.slices import Nodule, sample_planes, slice_targets, window
from noduledet.geometry import Geometry


def _ramp(direction_z=1):
    """A volume whose every voxel holds its world z (mm)."""
    g = Geometry((1.0, 1.0, 2.5), (0, 0, -100.0), (1, 0, 0, 0, 1, 0, 0, 0, direction_z), (20, 4, 5))
    z = np.array([g.voxel_to_world([k, 0, 0])[2] for k in range(20)])
    return np.broadcast_to(z[:, None, None], g.shape).copy(), g


def test_channels_sit_at_fixed_world_offsets():
    vol, g = _ramp()
    planes = sample_planes(vol, 8, (-5.0, 0.0, 3.0), g)
    np.testing.assert_allclose(planes[:, 0, 0], [-80 - 5, -80, -80 + 3])  # 3 mm = 1.2 slices: interpolated


def test_channel_order_follows_world_z_when_z_is_flipped():
    vol, g = _ramp(direction_z=-1)
    planes = sample_planes(vol, 8, (-5.0, 0.0, 5.0), g)
    np.testing.assert_allclose(planes[:, 0, 0], [-120 - 5, -120, -120 + 5])


def test_offsets_past_the_ends_repeat_the_edge_slice():
    vol, g = _ramp()
    np.testing.assert_allclose(sample_planes(vol, 0, (-5.0, 0.0), g)[:, 0, 0], [-100, -100])


def test_window_maps_lung_to_soft_tissue():
    np.testing.assert_allclose(window(np.array([-1200, -1000, -300, 400, 900])), [0, 0, 0.5, 1, 1])


def test_sphere_targets_in_a_region_frame():
    n = Nodule(np.array([10.0, 20.0, 30.0]), 9.0)
    t = slice_targets([n], 10, (0.5, 0.5, 2.0), slice(10, 60), slice(20, 70), masks=True)
    # radius 4.5 mm = 9 px around pixel centre (30.5, 20.5); the region starts at x=20, y=10
    np.testing.assert_allclose(t["boxes"], [[1.5, 1.5, 19.5, 19.5]])
    ys, xs = np.nonzero(t["masks"][0])
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (1, 1, 20, 20)  # pixel centres within 9 px


def test_outline_targets_use_the_outline():
    mask = np.zeros((2, 3, 4), dtype=bool)
    mask[1, 1:3, 0:2] = True
    n = Nodule(np.array([5.0, 5, 5]), 4.0, mask=(4, 10, 20, mask))  # outline patch at z 4..5, y 10.., x 20..
    t = slice_targets([n], 5, (1, 1, 1), slice(0, 40), slice(0, 40), masks=True)
    np.testing.assert_allclose(t["boxes"], [[20, 11, 22, 13]])
    assert t["masks"][0, 11:13, 20:22].all() and t["masks"].sum() == 4
    assert len(slice_targets([n], 4, (1, 1, 1), slice(0, 40), slice(0, 40))["boxes"]) == 0
