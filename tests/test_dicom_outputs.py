"""DICOM SR (TID 1500) and SEG of nodule findings: valid (dciodvfy), and read back to what was written."""

import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from scipy import ndimage

from noduledet import __version__
from noduledet.clinical import LUNG_RADS_NOTE, Finding, findings_from_candidates, size_category
from noduledet.clinical.seg import build_seg, label_volumes_mm3, read_seg, write_seg
from noduledet.clinical.source import REPORT_ATTRIBUTES, missing_for_reports, read_series_headers, series_headers
from noduledet.clinical.sr import read_sr, write_sr
from noduledet.data.ct import dicom_series_files, read_dicom, write_dicom
from noduledet.errors import UserError
from tests.clinical_helpers import dciodvfy_errors, rotated_volume, write_scanner_series


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("series") / "ct"
    write_scanner_series(folder)
    return folder


@pytest.fixture(scope="module")
def labelled(series):
    """The series as read_dicom stacks it, its two blobs labelled, and a finding for each."""
    volume = read_dicom(series)
    labels, n = ndimage.label(volume.hu > -200)
    assert n == 2
    centres = ndimage.center_of_mass(labels > 0, labels, [1, 2])
    volumes = label_volumes_mm3(labels, volume.geometry.spacing)
    candidates = [{"world_xyz": [round(float(v), 3) for v in volume.geometry.voxel_to_world(c)],
                   "diameter_mm": d, "probability": p} for c, d, p in zip(centres, (7.91, 12.4), (0.93751, 0.61))]
    return labels, findings_from_candidates(candidates, volumes_mm3=volumes)


def test_dicom_series_files_is_the_order_read_dicom_stacks(series):
    files = dicom_series_files(series)
    volume = read_dicom(series)
    assert [p.name for p in files] != sorted(p.name for p in files)  # the names run the other way
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        np.testing.assert_array_equal(ds.pixel_array.astype(np.int16), volume.hu[k])
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                                   volume.geometry.voxel_to_world([k, 0, 0]), atol=1e-4)


@pytest.mark.parametrize("diameter, code", [(0.0, "LT6MM"), (5.99, "LT6MM"), (6.0, "6TO8MM"), (7.99, "6TO8MM"),
                                            (8.0, "8TO15MM"), (14.99, "8TO15MM"), (15.0, "GE15MM"), (40.0, "GE15MM")])
def test_size_category_bands(diameter, code):
    assert size_category(diameter)[0] == code


def test_findings_from_candidates_rank_and_threshold():
    cands = [{"world_xyz": [1, 2, 3], "diameter_mm": 9.0, "probability": 0.9},
             {"world_xyz": [4, 5, 6], "diameter_mm": 5.0, "probability": 0.2},
             {"world_xyz": [7, 8, 9], "diameter_mm": 16.0, "probability": 0.6}]
    found = findings_from_candidates(cands, threshold=0.5, volumes_mm3={2: 100.0})
    assert [(f.rank, f.world_xyz, f.volume_mm3) for f in found] == [(1, (1.0, 2.0, 3.0), None),
                                                                    (2, (7.0, 8.0, 9.0), 100.0)]
    assert [f.size_category for f in found] == ["8 to below 15 mm", "15 mm and over"]
    assert found[0].tracking_uid != found[1].tracking_uid
    with pytest.raises(ValueError, match="probability"):
        Finding(1, (0, 0, 0), 5.0, 1.5)


def test_sr_reads_back_the_findings(series, labelled, tmp_path):
    _, findings = labelled
    sources = read_series_headers(series)
    path = write_sr(findings, sources, tmp_path / "sr.dcm")
    back = read_sr(path)
    assert [f.rank for f in back] == [1, 2]
    for a, b in zip(findings, back):
        np.testing.assert_allclose(b.world_xyz, a.world_xyz, atol=0.1)
        assert (b.diameter_mm, b.probability, b.volume_mm3, b.tracking_uid) == \
               (a.diameter_mm, a.probability, a.volume_mm3, a.tracking_uid)
    voxel = 0.7 * 0.8 * 2.5  # the blobs at [4:7, 20:28, 20:28] and [9:12, 36:46, 40:48]
    assert sorted(f.volume_mm3 for f in back) == pytest.approx([3 * 8 * 8 * voxel, 3 * 10 * 8 * voxel], rel=1e-5)


def test_sr_content_names_the_source_the_algorithm_and_the_size_band(series, labelled, tmp_path):
    import highdicom as hd

    _, findings = labelled
    sources = read_series_headers(series)
    sr = hd.sr.srread(write_sr(findings, sources, tmp_path / "sr.dcm"))
    assert (sr.StudyInstanceUID, sr.PatientID) == (sources[0].StudyInstanceUID, sources[0].PatientID)
    evidence = sr.get_evidence()
    assert {e[2] for e in evidence} == {s.SOPInstanceUID for s in sources}
    assert {e[1] for e in evidence} == {sources[0].SeriesInstanceUID}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    for f, g in zip(findings, groups):
        assert g.roi.frame_of_reference_uid == sources[0].FrameOfReferenceUID
        assert g.roi.source_series_for_segmentation.value == sources[0].SeriesInstanceUID
        assert g.finding_type == codes.SCT.Nodule and g.tracking_identifier == f"Nodule {f.rank}"
        band = g.get_qualitative_evaluations()[0].value
        assert (band.value, band.meaning) == size_category(f.diameter_mm)
        text = {str(item.TextValue) for item in g[0].ContentSequence if item.ValueType == "TEXT"}
        assert LUNG_RADS_NOTE in text and {"noduledet", __version__} <= text
    assert [g.get_qualitative_evaluations()[0].value.value for g in groups] == ["6TO8MM", "8TO15MM"]


def test_sr_passes_dciodvfy(series, labelled, tmp_path):
    path = write_sr(labelled[1], read_series_headers(series), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []


def test_seg_reads_back_voxel_for_voxel_on_the_source_instances(series, labelled, tmp_path):
    import highdicom as hd

    labels, findings = labelled
    sources = read_series_headers(series)
    path = write_seg(labels, findings, sources, tmp_path / "seg.dcm")
    back = read_seg(path, sources)
    assert back.shape == labels.shape
    np.testing.assert_array_equal(back, labels)
    seg = hd.seg.segread(path)
    assert [seg.get_segment_description(f.rank).tracking_uid for f in findings] == [f.tracking_uid for f in findings]
    geometry, by_uid = read_dicom(series).geometry, {s.SOPInstanceUID: s for s in sources}
    for frame, pixels in zip(seg.PerFrameFunctionalGroupsSequence, seg.pixel_array):
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(position, [float(v) for v in by_uid[ref].ImagePositionPatient], atol=1e-3)
        k = geometry.world_to_voxel(position)  # the frame sits where read_dicom's slice of its labels is
        np.testing.assert_allclose(k, [round(k[0]), 0, 0], atol=1e-3)
        number = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        np.testing.assert_array_equal(pixels, labels[round(k[0])] == number)


def test_seg_passes_dciodvfy(series, labelled, tmp_path):
    labels, findings = labelled
    path = write_seg(labels, findings, read_series_headers(series), tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []


def test_seg_refuses_labels_that_do_not_fit(series, labelled):
    labels, findings = labelled
    sources = read_series_headers(series)
    with pytest.raises(ValueError, match="does not match the series"):
        build_seg(labels[1:], findings, sources)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1"):
        build_seg(labels, findings[:1], sources)


def test_readers_refuse_other_files_in_one_line(series, tmp_path):
    ct = dicom_series_files(series)[0]
    for read in (read_sr, lambda p: read_seg(p, read_series_headers(series))):
        with pytest.raises(UserError) as err:
            read(ct)
        assert "\n" not in str(err.value) and str(ct) in str(err.value)


def test_series_without_frame_of_reference_is_refused(tmp_path):
    for path in write_dicom(rotated_volume(), tmp_path / "bare"):  # as some converters leave a series
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(UserError, match="no FrameOfReferenceUID"):
        read_series_headers(tmp_path / "bare")


@pytest.fixture(scope="module")
def phantom_dicom(phantom_root, tmp_path_factory):
    """A phantom scan as a DICOM series, and a Mask R-CNN checkpoint that reports every box."""
    from noduledet.data.ct import read_ct
    from noduledet.data.luna16 import Luna16
    from tests.conftest import write_random_checkpoint

    data, root = Luna16(phantom_root), tmp_path_factory.mktemp("dicom")
    write_dicom(read_ct(data.scan_path(data.uids[0])), root / "dicom")
    return root / "dicom", write_random_checkpoint(root / "mask.pt", masks=True)


def test_predict_writes_a_seg_equal_to_its_nifti_mask(phantom_dicom, tmp_path):
    """A Mask R-CNN checkpoint on a DICOM series: predict's seg.dcm, read back with highdicom on
    the source instances, is its mask.nii.gz voxel for voxel, and the SR lists the same findings."""
    from noduledet.cli import main
    from noduledet.data.ct import read_ct

    folder, ckpt = phantom_dicom
    assert main(["predict", str(folder), "--checkpoint", str(ckpt), "-o", str(tmp_path / "out"), "--no-pictures",
                 "--no-viewer", "--score-threshold", "0.0"]) == 0
    [scan] = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    mask = read_ct(scan / "mask.nii.gz").hu
    assert mask.max() > 0
    back = read_seg(scan / "seg.dcm", read_series_headers(folder))
    np.testing.assert_array_equal(back, mask)
    assert len(read_sr(scan / "sr.dcm")) >= mask.max()


def _without(folder, attribute: str, out):
    """A copy of the series at ``folder`` in ``out`` with ``attribute`` removed from every file, as
    converters and anonymisers leave some series."""
    out.mkdir()
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        delattr(ds, attribute)
        ds.save_as(out / path.name, enforce_file_format=True)
    return out


@pytest.mark.parametrize("attribute", [a for a in REPORT_ATTRIBUTES if a != "SeriesInstanceUID"])  # without it
def test_what_reports_need_is_named(series, attribute, tmp_path):  # no series is read at all (a one-line refusal)
    headers = series_headers(_without(series, attribute, tmp_path / "bare"))
    assert missing_for_reports(headers) == attribute and missing_for_reports(read_series_headers(series)) is None


def test_reports_never_block_detection(phantom_dicom, tmp_path, capsys, monkeypatch):
    """A series without FrameOfReferenceUID gets its candidates, pictures, mask and viewer; no SR or
    SEG, one warning line, the reason in scan.json; --store then stores nothing and says why."""
    from noduledet.cli import main
    from noduledet.clinical import dicomweb
    from noduledet.predict import PredictOptions, predict_dicomweb
    from noduledet.records import read_scan_record

    folder, ckpt = phantom_dicom
    bare, out = _without(folder, "FrameOfReferenceUID", tmp_path / "bare"), tmp_path / "out"
    assert main(["predict", str(bare), "--checkpoint", str(ckpt), "-o", str(out), "--score-threshold", "0.0",
                 "--top", "1"]) == 0
    [scan] = [p for p in out.iterdir() if p.is_dir()]
    why = "the series has no FrameOfReferenceUID, which an SR and a SEG need"
    assert [line for line in capsys.readouterr().out.splitlines() if "warning" in line] == [
        f"{scan.name}: warning: no SR or SEG: {why} (the candidates, pictures and viewer are written)"]
    summary, candidates = read_scan_record(scan)
    assert summary["reports"] == {"sr": False, "seg": False, "skipped": why} and summary["findings"] == len(candidates) > 0
    assert not (scan / "sr.dcm").exists() and not (scan / "seg.dcm").exists()
    for name in ("candidates.csv", "top1.png", "mask.nii.gz", "viewer.json"):
        assert (scan / name).is_file(), name
    assert (out / "index.html").is_file() and len((out / "findings.csv").read_text().splitlines()) == len(candidates) + 1

    no_study = _without(folder, "StudyInstanceUID", tmp_path / "no-study")
    monkeypatch.setattr(dicomweb, "fetch_series", lambda url, study, dest, series: no_study)
    monkeypatch.setattr(dicomweb, "store_files", lambda *a: pytest.fail("nothing may be stored"))
    lines = []
    predict_dicomweb("http://pacs.example", "1.2.3", None, ckpt, tmp_path / "pacs", store=True, log=lines.append,
                     overrides={"score_threshold": 0.0}, options=PredictOptions(pictures=False, viewer=False))
    assert lines[-1] == "nothing to store: the series has no StudyInstanceUID, which an SR and a SEG need"
