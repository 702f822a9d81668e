import numpy as np

from noduledet.data.ct import CTVolume, read_ct
from noduledet.data.luna16 import Luna16
from noduledet.data.lung import segment_lungs
from noduledet.geometry import Geometry


def test_lungs_hold_every_nodule(phantom_root):
    data = Luna16(phantom_root)
    ann = data.annotations()
    for uid in data.uids:
        vol = read_ct(data.scan_path(uid))
        lungs = segment_lungs(vol)
        slices = set(lungs.slices().tolist())
        y0, x0, y1, x1 = lungs.box_yx(margin_px=2)
        assert 0 < len(slices) < vol.hu.shape[0]  # the scan reaches beyond the lungs
        for xyz in ann.for_scan(uid).xyz:
            z, y, x = np.round(vol.geometry.world_to_voxel(xyz)).astype(int)
            assert z in slices and y0 <= y < y1 and x0 <= x < x1


def test_empty_scan_has_no_lung():
    hu = np.full((5, 32, 32), -1000, dtype=np.int16)
    lungs = segment_lungs(CTVolume(hu, Geometry((1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1), hu.shape)))
    assert lungs.empty and len(lungs.slices()) == 0
    assert lungs.box_yx() == (0, 0, 32, 32)


def test_body_air_is_not_lung():
    hu = np.full((6, 40, 40), -1000, dtype=np.int16)
    hu[:, 5:35, 5:35] = 40  # body
    hu[:, 10:20, 10:30] = -850  # one lung
    lungs = segment_lungs(CTVolume(hu, Geometry((3, 3, 3), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1), hu.shape)), coarse_mm=3)
    full = lungs.full()
    assert full[:, 12, 15].all() and not full[:, 2, 2].any() and not full[:, 25, 20].any()
