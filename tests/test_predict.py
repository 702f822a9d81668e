import json

import numpy as np
import pytest

from noduledet.cli import main
from noduledet.data.ct import read_ct, write_ct, write_dicom
from noduledet.data.luna16 import PREDICTION_COLUMNS, Luna16, read_findings
from noduledet.predict import expand_inputs
from tests.conftest import flipped_xy, write_random_checkpoint


@pytest.fixture(scope="module")
def three_formats(phantom_root, tmp_path_factory):
    """A phantom scan flipped in x and y on purpose, as .mhd, as DICOM and as NIfTI."""
    data = Luna16(phantom_root)
    uid = data.uids[0]
    original = read_ct(data.scan_path(uid))
    vol = flipped_xy(original)
    assert vol.geometry.direction[0] == -original.geometry.direction[0] and \
        vol.geometry.direction[4] == -original.geometry.direction[4]
    root = tmp_path_factory.mktemp("formats")
    write_ct(vol, root / f"{uid}.mhd")
    write_ct(vol, root / "scan.nii.gz")
    write_dicom(vol, root / "dicom", series_uid=uid)
    return root, uid


def test_same_candidates_from_mhd_dicom_and_nifti(three_formats, random_checkpoint, tmp_path, capsys):
    root, uid = three_formats
    out = tmp_path / "pred"
    assert main(["predict", str(root / f"{uid}.mhd"), str(root / "dicom"), str(root / "scan.nii.gz"),
                 "--checkpoint", str(random_checkpoint), "-o", str(out), "--top", "2"]) == 0
    cand = read_findings(out / "candidates.csv", PREDICTION_COLUMNS)
    names = sorted(set(cand.uids.tolist()))
    assert names == sorted([uid, f"{uid}_2", "scan"])  # DICOM's name is its SeriesInstanceUID
    ref = cand.for_scan(uid)
    assert len(ref) > 0
    for other in (f"{uid}_2", "scan"):
        got = cand.for_scan(other)
        np.testing.assert_allclose(got.xyz, ref.xyz, atol=1e-3)
        np.testing.assert_allclose(got.value, ref.value, atol=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 3 and all("detector_s" in s["timings"] for s in summary)
    scan = json.loads((out / uid / "scan.json").read_text())
    assert scan["status"] == f"{len(scan['candidates'])} candidates, " + \
        f"{sum(c['probability'] >= 0.5 for c in scan['candidates'])} with probability >= 0.5"
    assert (out / uid / "top2.png").exists() and not (out / uid / "top3.png").exists()
    # top1.png shows the candidate's slice in the lung window: at its centre in the zoomed panel, the
    # grey of the voxel there, as plots.candidate lays it out
    from PIL import Image

    from noduledet.candidates import Candidate
    from noduledet.plots import LUNG_WINDOW
    from noduledet.predict import draw_candidate

    c = scan["candidates"][0]
    volume = read_ct(root / f"{uid}.mhd")
    best = Candidate(np.array(c["voxel_zyx"]), np.array(c["world_xyz"]), c["probability"], c["diameter_mm"],
                     c["slices"], tuple(c["z_range"]), [])
    _, (row, col) = draw_candidate(volume, best, 1, tmp_path / "again.png")
    with Image.open(out / uid / "top1.png") as image:
        shown = float(np.asarray(image.convert("L"))[row, col])
    z, y, x = np.floor(np.array(c["voxel_zyx"]) + [0.5, 0.5, 0.5]).astype(int)  # the voxel under the centre
    lo, hi = LUNG_WINDOW
    assert shown == pytest.approx(np.clip((volume.hu[z, y, x] - lo) / (hi - lo), 0, 1) * 255, abs=3)


def test_candidates_are_world_coordinates(three_formats, random_checkpoint, tmp_path):
    """Candidate voxel and world coordinates agree through the scan's (flipped) geometry."""
    root, uid = three_formats
    out = tmp_path / "p"
    assert main(["predict", str(root / f"{uid}.mhd"), "--checkpoint", str(random_checkpoint), "-o", str(out),
                 "--no-pictures"]) == 0
    g = read_ct(root / f"{uid}.mhd").geometry
    scan = json.loads((out / uid / "scan.json").read_text())
    assert scan["slices"] > 0 and scan["candidates"]
    for c in scan["candidates"]:
        np.testing.assert_allclose(g.voxel_to_world(c["voxel_zyx"]), c["world_xyz"], atol=0.01)


def test_a_scan_without_lung_is_reported_not_an_error(random_checkpoint, tmp_path, capsys):
    from noduledet.data.ct import CTVolume
    from noduledet.geometry import Geometry

    hu = np.full((8, 64, 64), 40, dtype=np.int16)  # all soft tissue: no lung
    write_ct(CTVolume(hu, Geometry((1, 1, 2), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1), hu.shape)), tmp_path / "leg.mhd")
    assert main(["predict", str(tmp_path / "leg.mhd"), "--checkpoint", str(random_checkpoint), "-o", str(tmp_path / "o")]) == 0
    assert "no lung found" in capsys.readouterr().out
    assert (tmp_path / "o" / "candidates.csv").read_text().strip() == "seriesuid,coordX,coordY,coordZ,probability"


def test_bad_inputs_and_existing_output(random_checkpoint, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nope.mhd"), "--checkpoint", str(random_checkpoint), "-o", str(tmp_path / "o")]) == 2
    assert "nope.mhd: no such file or folder" in capsys.readouterr().err
    (tmp_path / "x.txt").write_text("hi")
    assert main(["predict", str(tmp_path / "x.txt"), "--checkpoint", str(random_checkpoint), "-o", str(tmp_path / "o")]) == 2
    assert "unknown CT format" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    assert main(["predict", str(tmp_path), "--checkpoint", str(random_checkpoint), "-o", str(tmp_path / "o")]) == 2
    assert not list(tmp_path.glob(".o.partial"))


def test_mask_rcnn_writes_an_aligned_nifti_mask(phantom_root, tmp_path):
    ckpt = write_random_checkpoint(tmp_path / "m.pt", "ccapm", masks=True)
    uid = Luna16(phantom_root).uids[0]
    scan = Luna16(phantom_root).scan_path(uid)
    assert main(["predict", str(scan), "--checkpoint", str(ckpt), "-o", str(tmp_path / "o"),
                 "--score-threshold", "0.0", "--no-pictures"]) == 0
    mask = read_ct(tmp_path / "o" / uid / "mask.nii.gz")
    vol = read_ct(scan)
    assert mask.hu.shape == vol.hu.shape and mask.hu.max() >= 1
    np.testing.assert_allclose(mask.geometry.voxel_to_world([[1, 2, 3]]), vol.geometry.voxel_to_world([[1, 2, 3]]), atol=1e-3)


def test_expand_luna16_root(phantom_root):
    scans = expand_inputs([phantom_root])
    assert sorted(s.name for s in scans) == sorted(Luna16(phantom_root).uids)


def _torchrun(*args, timeout=300):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29519", "-m", "noduledet.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow  # two processes: `python -m pytest -m slow`
def test_predict_and_evaluate_shard_scans_under_torchrun(phantom_root, trained, tmp_path):
    """Two processes share the scans out and gather one CSV: the same as one process."""
    ckpt = trained / "best.pt"
    assert main(["predict", str(phantom_root), "--checkpoint", str(ckpt), "-o", str(tmp_path / "one"), "--no-pictures"]) == 0
    proc = _torchrun("predict", phantom_root, "--checkpoint", ckpt, "-o", tmp_path / "two", "--no-pictures")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = read_findings(tmp_path / "one" / "candidates.csv", PREDICTION_COLUMNS)
    two = read_findings(tmp_path / "two" / "candidates.csv", PREDICTION_COLUMNS)
    order_one, order_two = np.lexsort((one.value, one.uids)), np.lexsort((two.value, two.uids))
    assert sorted(one.scans()) == sorted(two.scans()) == sorted(Luna16(phantom_root).uids)
    np.testing.assert_allclose(one.xyz[order_one], two.xyz[order_two], atol=1e-3)
    assert len(json.loads((tmp_path / "two" / "summary.json").read_text())) == 4

    assert main(["evaluate", "--checkpoint", str(ckpt), "--split", "all", "-o", str(tmp_path / "e1")]) == 0
    proc = _torchrun("evaluate", "--checkpoint", ckpt, "--split", "all", "-o", tmp_path / "e2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    b = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert a["slices"] == b["slices"] and a["froc"]["cpm"] == pytest.approx(b["froc"]["cpm"])
    assert a["slice_metrics_all_lung_slices"]["ap50"] == pytest.approx(b["slice_metrics_all_lung_slices"]["ap50"], abs=1e-6)


def test_a_blob_spot_is_labelled_as_the_ball_of_its_size():
    from noduledet.candidates import Candidate
    from noduledet.predict import label_ball

    labels = np.zeros((40, 60, 60), dtype=np.int16)
    spacing = (0.5, 0.5, 1.25)  # x, y, z mm
    spot = Candidate(np.array([20.0, 30.0, 30.0]), np.zeros(3), 0.9, 8.0, 0, (17, 23), [])
    label_ball(labels, spot, spacing, 3)
    volume = (labels == 3).sum() * 0.5 * 0.5 * 1.25
    assert volume == pytest.approx(4 / 3 * np.pi * 4.0 ** 3, rel=0.1)
    assert labels[20, 30, 30] == 3 and labels[20, 30, 38] == 3 and labels[20, 30, 39] == 0  # 4 mm = 8 px in x
    assert labels[23, 30, 30] == 3 and labels[24, 30, 30] == 0  # 4 mm = 3.2 slices in z
    edge = Candidate(np.array([0.0, 0.0, 0.0]), np.zeros(3), 0.9, 8.0, 0, (0, 3), [])
    label_ball(labels, edge, spacing, 1)  # clipped at the volume's corner, the earlier label kept
    assert labels[0, 0, 0] == 1 and (labels == 3).sum() * 0.5 * 0.5 * 1.25 == pytest.approx(volume)
