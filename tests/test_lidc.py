import pytest

from noduledet.data.lidc import LidcDatabase, compare_with_reference, derive_luna16
from noduledet.data.luna16 import REFERENCE, read_findings, read_uid_list


def test_lidc_derivation_reproduces_luna16_on_200_scans():
    """The LUNA16 list re-derived from the readers' contours: count, z and diameter agree."""
    uids = read_uid_list(REFERENCE / "luna16_seriesuids.csv")[:200]
    ref = read_findings(REFERENCE / "luna16_annotations.csv").for_scans(uids)
    report = compare_with_reference(derive_luna16(LidcDatabase(uids=uids), uids), ref)
    assert abs(report["count_difference"]) <= 0.01
    assert report["matched_fraction"] >= 0.99
    assert report["diameter_median_abs_diff_mm"] < 0.25
    assert abs(report["diameter_mean_ratio"] - 1) < 0.02


@pytest.mark.slow
def test_lidc_derivation_reproduces_all_of_luna16():
    uids = read_uid_list(REFERENCE / "luna16_seriesuids.csv")
    report = compare_with_reference(derive_luna16(LidcDatabase(), uids), read_findings(REFERENCE / "luna16_annotations.csv"))
    assert report["reference"] == 1186
    assert abs(report["count_difference"]) <= 0.01 and report["matched_fraction"] >= 0.99
    assert report["diameter_mean_abs_diff_mm"] < 0.25


def test_cache_takes_masks_from_lidc_for_a_luna16_scan(tmp_path):
    """A scan carrying a real LUNA16 seriesuid gets its nodule's consensus outline as mask."""
    import numpy as np

    from noduledet.data.cache import SliceCache, prepare
    from noduledet.data.ct import CTVolume, write_ct
    from noduledet.data.luna16 import write_findings
    from noduledet.geometry import Geometry

    ref = read_findings(REFERENCE / "luna16_annotations.csv")
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"
    row = ref.for_scan(uid).select(np.array([0]))
    db = LidcDatabase(uids=[uid])
    scan = db.by_uid[uid]
    nodule = min(db.nodules(scan), key=lambda n: abs(n.centroid[2] - row.xyz[0, 2]))
    x_px, y_px, _ = nodule.centroid
    ps = scan.pixel_spacing
    # place the 256x256 grid so that the outline's pixels land on LUNA16's world point
    origin = (row.xyz[0, 0] - x_px * ps, row.xyz[0, 1] - y_px * ps, scan.z_positions[0])
    hu = np.full((len(scan.z_positions), 256, 256), 40, dtype=np.int16)
    hu[:, :, :3] = -1000
    hu[:, 150:250, 10:120] = -850  # a lung around the nodule's pixels
    g = Geometry((ps, ps, scan.z_step), origin, (1, 0, 0, 0, 1, 0, 0, 0, 1), hu.shape)
    root = tmp_path / "luna"
    write_ct(CTVolume(hu, g), root / "subset0" / f"{uid}.mhd")
    write_findings(root / "annotations.csv", row)
    prepare(root, tmp_path / "cache")
    cache = SliceCache(tmp_path / "cache")
    n = cache.nodules(uid)[0]
    assert n.mask is not None
    z0, y0, x0, m = n.mask
    idx = np.argwhere(m) + [z0, y0, x0]
    centre = cache.geometry(uid).voxel_to_world(idx.mean(0))
    np.testing.assert_allclose(centre, row.xyz[0], atol=1.5)
    diameter = (6 * m.sum() * ps * ps * scan.z_step / np.pi) ** (1 / 3)
    assert abs(diameter - row.value[0]) / row.value[0] < 0.2
