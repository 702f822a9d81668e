import json

import numpy as np
import pytest

from noduledet.cli import main
from noduledet.data.ct import read_ct
from noduledet.data.kinds import annotation_kinds
from noduledet.data.luna16 import Luna16
from noduledet.data.phantom import make_scan, shape_library


def test_layout_and_annotations_land_on_nodules(phantom_root):
    data = Luna16(phantom_root)
    ann = data.annotations()
    assert len(ann) >= 4
    summary = json.loads((phantom_root / "phantom.json").read_text())
    kinds = annotation_kinds(data)  # annotations_kinds.csv: a row for each annotation
    recorded = [(n["location"], n["texture"]) for s in summary["scans"] for n in s["nodules"]]
    assert recorded == list(zip(kinds["location"], kinds["texture"]))
    for i in range(len(ann)):
        vol = read_ct(data.scan_path(ann.uids[i]))
        z, y, x = np.round(vol.geometry.world_to_voxel(ann.xyz[i])).astype(int)
        core = vol.hu[z, y - 1:y + 2, x - 1:x + 2].mean()
        assert core > -750, (ann.uids[i], core)  # solid (~0 HU) or ground glass (-680..-380)
        assert 3 <= ann.value[i] <= 30
        if kinds["location"][i] != "pleural":  # a diameter away on either side in x: lung (a vessel may cross one side)
            r = int(np.ceil(ann.value[i] / vol.geometry.spacing[0]))
            sides = [vol.hu[z, y, x - r - 3:x - r], vol.hu[z, y, x + r:x + r + 3]]
            assert min(np.median(side) for side in sides) < -700, (ann.uids[i], sides)
    assert "not patient data" in summary["note"]
    assert (phantom_root / "annotations_excluded.csv").read_text().startswith("seriesuid,coordX")


def test_hounsfield_values_are_real():
    scan = make_scan(5, 0, 128, shape_library(), nodules=(1, 1), diameters=(15, 15))
    hu = scan.volume.hu
    mid = hu[hu.shape[0] // 2]
    assert hu[0, 0, 0] in (-1024, -2000, -3024)  # outside the reconstruction circle: the scanner's padding
    assert -1020 <= np.median(mid[:8, 60:68]) <= -960  # air above the patient (noise around -1000)
    assert hu.max() >= 500  # bone
    lungish = ((hu > -950) & (hu < -750)).mean()
    assert 0.05 < lungish < 0.5


def test_deterministic_per_seed():
    a = make_scan(11, 2, 64, shape_library(), nodules=(1, 2))
    b = make_scan(11, 2, 64, shape_library(), nodules=(1, 2))
    c = make_scan(12, 2, 64, shape_library(), nodules=(1, 2))
    np.testing.assert_array_equal(a.volume.hu, b.volume.hu)
    assert a.volume.hu.shape != c.volume.hu.shape or not np.array_equal(a.volume.hu, c.volume.hu)


def test_flipped_scan_puts_the_same_nodules_at_the_same_world_points():
    plain = make_scan(4, 0, 96, shape_library(), nodules=(2, 2), diameters=(10, 20), flip_fraction=0.0)
    flipped = make_scan(4, 0, 96, shape_library(), nodules=(2, 2), diameters=(10, 20), flip_fraction=1.0)
    assert flipped.volume.geometry.direction[0] == -1 and plain.volume.geometry.direction[0] == 1
    assert len(plain.nodules) == len(flipped.nodules) == 2
    for a, b in zip(plain.nodules, flipped.nodules):
        np.testing.assert_allclose(a.center_xyz, b.center_xyz, atol=1e-6)
        assert a.diameter_mm == pytest.approx(b.diameter_mm)


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["phantom", str(out), "--scans", "1", "--size", "48"]) == 0
    assert main(["phantom", str(out), "--scans", "1", "--size", "48"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["phantom", str(out), "--scans", "2", "--size", "48", "--force", "--preview", "--nodules", "1", "2"]) == 0
    assert len(Luna16(out).uids) == 2
    # each nodule at the centre of its panel, in the lung window: the grey of the voxel under it
    from PIL import Image

    from noduledet.data.phantom import write_preview
    from noduledet.plots import LUNG_WINDOW

    centres = write_preview(out, tmp_path / "again.png")
    data = Luna16(out)
    ann = data.annotations()
    with Image.open(out / "preview.png") as image:
        png = np.asarray(image.convert("L"), dtype=float)
    assert len(centres) == len(ann) > 0
    for (row, col), uid, xyz in zip(centres, ann.uids, ann.xyz):
        volume = read_ct(data.scan_path(uid))
        zf, yf, xf = volume.geometry.world_to_voxel(xyz)  # the slice shown and the pixel under the centre:
        z, y, x = int(round(zf)), int(np.floor(yf + 0.5)), int(np.floor(xf + 0.5))
        lo, hi = LUNG_WINDOW
        assert png[row, col] == pytest.approx(np.clip((volume.hu[z, y, x] - lo) / (hi - lo), 0, 1) * 255, abs=3)
    assert not list(tmp_path.glob(".*partial"))
