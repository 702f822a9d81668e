"""One road: evaluate's candidates are predict's, and they land where the nodule is in the world."""

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from noduledet import checkpoint
from noduledet.cli import main
from noduledet.config import Config, EvalConfig
from noduledet.data.ct import CTVolume, read_ct, write_ct, write_dicom
from noduledet.data.luna16 import Luna16
from noduledet.geometry import Geometry
from noduledet.inference import Detector
from noduledet.merge import z_steps
from noduledet.models.detector import DetectorSpec
from noduledet.pipeline import Pipeline
from tests.conftest import flipped_xy


@pytest.fixture(params=[10.0, 20.0], ids=["default-margins", "margin-20mm"])
def run_dir(request, random_checkpoint, phantom_root, phantom_cache, tmp_path):
    """A run folder holding the untrained checkpoint (every box kept), with a test split."""
    ckpt = checkpoint.load(random_checkpoint)
    ckpt.config.data.root, ckpt.config.data.cache = str(phantom_root), str(phantom_cache)
    ckpt.config.data.margin_mm = request.param
    run = tmp_path / "run"
    run.mkdir()
    checkpoint.save(ckpt, run / "best.pt")
    uids = Luna16(phantom_root).uids
    (run / "splits.json").write_text(json.dumps({"train": uids[:2], "val": [], "test": uids[2:]}))
    return run


def test_evaluate_scores_exactly_what_predict_writes(run_dir, phantom_root, tmp_path, capsys):
    data = Luna16(phantom_root)
    test = json.loads((run_dir / "splits.json").read_text())["test"]
    assert main(["evaluate", "--checkpoint", str(run_dir / "best.pt"), "-o", str(tmp_path / "eval")]) == 0
    assert main(["predict", *[str(data.scan_path(u)) for u in test], "--checkpoint", str(run_dir / "best.pt"),
                 "-o", str(tmp_path / "pred"), "--no-pictures"]) == 0
    evaluated = (tmp_path / "eval" / "candidates.csv").read_text()
    assert evaluated.count("\n") > 10  # many candidates: the comparison is not trivially empty
    assert (tmp_path / "pred" / "candidates.csv").read_text() == evaluated
    (tmp_path / "scans.txt").write_text("\n".join(test))
    capsys.readouterr()
    assert main(["froc", "--annotations", str(data.csv_path("annotations.csv")), "--excluded",
                 str(data.csv_path("annotations_excluded.csv")), "--candidates", str(tmp_path / "pred" / "candidates.csv"),
                 "--scans", str(tmp_path / "scans.txt"), "--bootstrap", "0"]) == 0
    cpm = json.loads((tmp_path / "eval" / "metrics.json").read_text())["froc"]["cpm"]
    assert f"CPM {cpm:.4f}" in capsys.readouterr().out
    assert not (tmp_path / "eval" / "cache").exists()  # a cache made for the evaluation is not left behind


def test_with_every_stage_evaluate_still_scores_what_predict_writes(trained, phantom_root, tmp_path):
    """Stage one, the 3D proposer, the blob filter and stage two: the same candidates both ways,
    each naming the sources that proposed it."""
    data = Luna16(phantom_root)
    test = json.loads((trained / "splits.json").read_text())["test"]
    assert main(["evaluate", "--checkpoint", str(trained / "best.pt"), "-o", str(tmp_path / "eval")]) == 0
    assert main(["predict", *[str(data.scan_path(u)) for u in test], "--checkpoint", str(trained / "best.pt"),
                 "-o", str(tmp_path / "pred"), "--no-pictures", "--no-viewer"]) == 0
    evaluated = (tmp_path / "eval" / "candidates.csv").read_text()
    assert evaluated.count("\n") > 1 and (tmp_path / "pred" / "candidates.csv").read_text() == evaluated
    sources = [set(c["sources"]) for u in test for c in json.loads((tmp_path / "pred" / u / "scan.json").read_text())["candidates"]]
    assert sources and all(s and s <= {"stage1", "proposer", "blobs"} for s in sources)
    assert any("proposer" in s for s in sources)  # the proposer's peaks reached the list


class BrightBlobs(torch.nn.Module):
    """A detector without learning: every bright blob of the middle channel that does not touch
    the slice's border, boxed. Its answers depend on the pixels alone, so it tests the road
    from a slice's pixels to world millimetres."""

    variant = "blobs"
    spec = DetectorSpec()

    def forward(self, images):
        out = []
        for image in images:
            labels, n = ndimage.label(image[image.shape[0] // 2].numpy() > 0.6)
            boxes = []
            for k, (ys, xs) in enumerate(ndimage.find_objects(labels), start=1):
                h, w = labels.shape
                if ys.start > 0 and xs.start > 0 and ys.stop < h and xs.stop < w:
                    boxes.append([xs.start, ys.start, xs.stop, ys.stop])
            b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            out.append({"boxes": b, "scores": torch.full((len(b),), 0.9), "labels": torch.ones(len(b), dtype=torch.int64)})
        return out


def _chest_with_nodule(flipped: bool, spacing_z: float = 1.5, diameter: float = 8.0) -> tuple[CTVolume, np.ndarray]:
    """A body of soft tissue around air-filled lungs holding one solid nodule (``diameter`` mm), 60 mm
    of slices ``spacing_z`` apart; the nodule's world centre."""
    n, nz = 80, int(round(60 / spacing_z))
    spacing = (0.8, 0.8, spacing_z)
    yy, xx = np.mgrid[:n, :n]
    body = ((yy - 40) / 44) ** 2 + ((xx - 40) / 44) ** 2 <= 1  # wider than the image: it touches the border
    lungs = ((yy - 40) / 28) ** 2 + ((xx - 40) / 30) ** 2 <= 1
    plane = np.where(lungs, -850, np.where(body, 40, -1000)).astype(np.int16)
    hu = np.repeat(plane[None], nz, axis=0)
    hu[:3] = hu[-3:] = np.where(body, 40, -1000)  # closed at both ends
    centre_zyx = np.array([nz / 2, 30.0, 50.0])
    zz, yv, xv = np.mgrid[:nz, :n, :n]
    ball = ((zz - centre_zyx[0]) * spacing[2]) ** 2 + ((yv - centre_zyx[1]) * spacing[1]) ** 2 + \
        ((xv - centre_zyx[2]) * spacing[0]) ** 2 <= (diameter / 2) ** 2
    hu[ball] = 40
    g = Geometry(spacing, (-30.0, 12.0, -200.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), hu.shape)
    volume = CTVolume(hu, g)
    return (flipped_xy(volume) if flipped else volume), g.voxel_to_world(centre_zyx)


@pytest.mark.parametrize("flipped", [False, True], ids=["identity", "flipped"])
def test_candidates_land_on_the_nodule_in_world_mm_from_every_format(flipped, tmp_path):
    volume, world = _chest_with_nodule(flipped)
    pipeline = Pipeline(Detector(BrightBlobs(), (-5.0, 0.0, 5.0), (-1000.0, 400.0), channels_last=False),
                        EvalConfig(), Config())
    write_ct(volume, tmp_path / "scan.mhd")
    write_ct(volume, tmp_path / "scan.nii.gz")
    write_dicom(volume, tmp_path / "dicom")
    for path in ("scan.mhd", "scan.nii.gz", "dicom"):
        result = pipeline.run_volume(read_ct(tmp_path / path))
        assert len(result.candidates) == 1, (path, result.status)
        c = result.candidates[0]
        assert np.linalg.norm(c.world_xyz - world) < 0.8, (path, c.world_xyz, world)  # within a pixel
        np.testing.assert_allclose(volume.geometry.voxel_to_world(c.voxel_zyx), c.world_xyz, atol=1e-6)
        assert abs(c.diameter_mm - 8.0) < 1.7


@pytest.mark.parametrize("spacing_z", [0.625, 0.8, 1.7, 2.0])
def test_slices_3_mm_apart_link_into_one_candidate(spacing_z):
    """eval.slice_step_mm=3 (= link_mm) on these slice spacings rounded the step past the link
    gap: each slice looked at became a candidate of its own."""
    volume, world = _chest_with_nodule(False, spacing_z, diameter=12.0)
    pipeline = Pipeline(Detector(BrightBlobs(), (-5.0, 0.0, 5.0), (-1000.0, 400.0), channels_last=False),
                        EvalConfig(slice_step_mm=3.0, link_mm=3.0), Config())
    result = pipeline.run_volume(volume)
    assert len(result.candidates) == 1, result.status
    c = result.candidates[0]
    assert c.slices >= 2  # the looked-at slices through the nodule joined
    step_mm = z_steps(3.0, 3.0, spacing_z)[0] * spacing_z
    assert np.linalg.norm(c.world_xyz[:2] - world[:2]) < 1.0 and abs(c.world_xyz[2] - world[2]) <= step_mm  # within a step
