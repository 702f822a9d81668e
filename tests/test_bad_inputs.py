"""The bad-input battery (issue 14): a user's mistake ends in exit code 2 and one line on stderr
that names the file (or value) and the problem, with no traceback and no output that looks
complete; an input that is odd but valid gives the right result.

Each case builds a tiny input in ``tmp_path`` and calls ``main`` in process, one parametrized
test per verb: ``predict`` for scans, checkpoints and output paths, ``froc`` for the CSVs,
``train`` for configs, ``prepare`` for dataset layouts. ``capfd`` rather than ``capsys``: it
also catches what ITK's C++ code writes straight to the terminal.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from noduledet.cli import main
from noduledet.data.ct import CTVolume, read_ct, to_sitk, write_ct, write_dicom
from noduledet.geometry import Geometry
from tests.conftest import write_random_checkpoint

AXIAL = (1, 0, 0, 0, 1, 0, 0, 0, 1)
SAGITTAL = (0, 0, 1, 1, 0, 0, 0, -1, 0)  # columns: index x -> world y, y -> -z, z -> x
CORONAL = (1, 0, 0, 0, 0, 1, 0, -1, 0)  # columns: index x -> world x, y -> -z, z -> y


def chest(slices: int = 8, size: int = 32, direction=AXIAL, lung: bool = True) -> CTVolume:
    """A tiny chest, 9 mm pixels: a soft-tissue body in air holding two lungs on all but the end
    slices (all soft tissue when not ``lung``)."""
    hu = np.full((slices, size, size), -1000, np.int16)
    y, x = (np.mgrid[:size, :size] + 0.5) / size - 0.5
    hu[:, (y / 0.42) ** 2 + (x / 0.46) ** 2 < 1] = 40
    if lung:
        hu[1:-1, (y / 0.28) ** 2 + ((np.abs(x) - 0.2) / 0.14) ** 2 < 1] = -850
    return CTVolume(hu, Geometry((9.0, 9.0, 5.0), (-150.0, -150.0, -20.0), direction, hu.shape))


def _mhd(d: Path, volume: CTVolume | None = None, name: str = "s.mhd") -> Path:
    write_ct(volume or chest(), d / name)
    return d / name


def _edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text, text
    path.write_text(text.replace(old, new))
    return path


def _dicom(d: Path, volume: CTVolume | None = None, edit=None, **kw) -> Path:
    """A DICOM series folder; ``edit(k, ds)`` changes slice ``k`` before it is saved again."""
    paths = write_dicom(volume or chest(), d / "dicom", **kw)
    for k, p in enumerate(paths if edit else []):
        ds = pydicom.dcmread(p)
        edit(k, ds)
        ds.save_as(p)
    return d / "dicom"


def _write_sitk(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def refused(code: int, capfd, verb: str, named, problem: str) -> str:
    """Assert the one-line refusal; return the line."""
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, err
    lines = [x for x in err.splitlines() if not re.match(r"\w+: \d+/\d+ \w+, \d+ s$", x)]  # progress
    assert code == 2 and len(lines) == 1, f"exit {code}, stderr:\n{err}"
    line = lines[0]
    assert line.startswith(f"noduledet {verb}: error: "), line
    assert str(named) in line, f"{named} not named in: {line}"
    assert re.search(problem, line), f"{problem!r} not in: {line}"
    return line


def _case(table: list, problem: str, xfail: str | None = None):
    """Register the decorated builder in ``table`` as a case expecting ``problem`` (a regex)."""
    def add(build):
        marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
        table.append(pytest.param(build, problem, id=build.__name__.replace("_", "-"), marks=marks))
        return build
    return add


# ---- scans (predict) -------------------------------------------------------------------------
# each builder returns (the inputs and options for predict, what the message must name)

SCANS: list = []


@_case(SCANS, r"missing \(the data file named by s\.mhd\)")
def missing_raw(d):
    p = _mhd(d)
    (d / "s.raw").unlink()
    return [p], d / "s.raw"


@_case(SCANS, r"truncated, 1000 bytes where s\.mhd needs 16384")
def truncated_raw(d):
    p = _mhd(d)
    (d / "s.raw").write_bytes((d / "s.raw").read_bytes()[:1000])
    return [p], d / "s.raw"


@_case(SCANS, "no such file or folder")
def wrong_path(d):
    return [d / "nope.mhd"], d / "nope.mhd"


@_case(SCANS, r"unknown CT format \(expected \.mhd, \.nii")
def unknown_file_type(d):
    (d / "scan.png").write_bytes(b"\x89PNG\r\n")
    return [d / "scan.png"], d / "scan.png"


@_case(SCANS, r"not a MetaImage header \(no DimSize line\)")
def mhd_that_is_not_a_header(d):
    (d / "s.mhd").write_bytes(bytes(range(256)) * 4)
    return [d / "s.mhd"], d / "s.mhd"


@_case(SCANS, r"1 missing slice\(s\) between 0002\.dcm .* and 0004\.dcm")
def dicom_missing_slice(d):
    folder = _dicom(d)
    (folder / "0003.dcm").unlink()
    return [folder], folder


@_case(SCANS, r"same position as 0002\.dcm \(duplicate slice\)")
def dicom_duplicate_slice(d):
    folder = _dicom(d)
    shutil.copy(folder / "0002.dcm", folder / "0002b.dcm")
    return [folder], folder / "0002b.dcm"


@_case(SCANS, r"2 series in one folder: 1\.2\.3 \(8 images\), 1\.2\.4 \(8 images\); choose one with --series")
def dicom_two_series(d):
    folder = _dicom(d, series_uid="1.2.3")
    for p in write_dicom(chest(), d / "other", series_uid="1.2.4"):
        p.rename(folder / f"b{p.name}")
    return [folder], folder


@_case(SCANS, r"no series 9\.9; found \['1\.2\.3'\]")
def dicom_series_not_in_folder(d):
    return [_dicom(d, series_uid="1.2.3"), "--series", "9.9"], "9.9"


@_case(SCANS, r"16x16 pixels where 0000\.dcm has 32x32")
def dicom_mixed_image_sizes(d):
    def smaller(k, ds):
        if k == 3:
            ds.Rows = ds.Columns = 16
            ds.PixelData = np.zeros((16, 16), np.int16).tobytes()
    return [_dicom(d, edit=smaller)], d / "dicom" / "0003.dcm"


@_case(SCANS, r"modality MR, not CT")
def dicom_mr_modality(d):
    return [_dicom(d, edit=lambda k, ds: setattr(ds, "Modality", "MR"))], d / "dicom" / "0000.dcm"


@_case(SCANS, r"DICOM image without usable geometry")
def dicom_without_orientation(d):
    def drop(k, ds):
        if k == 5:
            del ds.ImageOrientationPatient
    return [_dicom(d, edit=drop)], d / "dicom" / "0005.dcm"


@_case(SCANS, r"gantry tilt of 15\.0 degrees")
def dicom_gantry_tilt(d):
    def tilt(k, ds):  # each slice 5 mm further in z and 5 * tan(15 deg) mm further in y
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.6f}", f"{y + k * 5.0 * np.tan(np.radians(15)):.6f}", f"{z:.6f}"]
    return [_dicom(d, edit=tilt)], d / "dicom"


@_case(SCANS, r"not an axial scan \(the slice axis is 90\.0 degrees from the patient's z axis\)")
def dicom_coronal(d):
    return [_dicom(d, chest(direction=CORONAL))], d / "dicom"


@_case(SCANS, r"not an axial scan \(the slice axis is 90\.0 degrees from the patient's z axis\)")
def mhd_sagittal(d):
    return [_mhd(d, chest(direction=SAGITTAL))], d / "s.mhd"


@_case(SCANS, r"too few slices \(2; a CT volume needs at least 3\)")
def dicom_two_slices(d):
    return [_dicom(d, chest(slices=2))], d / "dicom"


@_case(SCANS, r"too few slices \(1; a CT volume needs at least 3\)")
def mhd_one_slice(d):
    return [_mhd(d, chest(slices=1))], d / "s.mhd"


@_case(SCANS, r"too few slices \(2; a CT volume needs at least 3\)")
def mhd_two_slices(d):
    return [_mhd(d, chest(slices=2))], d / "s.mhd"


@_case(SCANS, r"no DICOM images")
def empty_dicom_folder(d):
    (d / "empty").mkdir()
    return [d / "empty"], d / "empty"


@_case(SCANS, r"the image is empty \(DimSize = 32 32 0\)")
def mhd_empty_image(d):
    return [_edit(_mhd(d), "DimSize = 32 32 8", "DimSize = 32 32 0")], d / "s.mhd"


def _float_mhd(d: Path, value: float) -> Path:
    volume = chest()
    image = sitk.GetImageFromArray(volume.hu.astype(np.float32))
    image[5, 6, 3] = value  # (x, y, z)
    image.CopyInformation(to_sitk(volume))
    return _write_sitk(image, d / "f.mhd")


@_case(SCANS, r"1 of 8192 voxels are NaN or infinite")
def nan_voxel(d):
    return [_float_mhd(d, float("nan"))], d / "f.mhd"


@_case(SCANS, r"1 of 8192 voxels are NaN or infinite")
def inf_voxel(d):
    return [_float_mhd(d, float("-inf"))], d / "f.mhd"


@_case(SCANS, r"ElementSpacing = 0 9 5; every spacing must be positive")
def zero_spacing(d):
    return [_edit(_mhd(d), "ElementSpacing = 9 9 5", "ElementSpacing = 0 9 5")], d / "s.mhd"


@_case(SCANS, r"ElementSpacing = -9 9 5; every spacing must be positive")
def negative_spacing(d):
    return [_edit(_mhd(d), "ElementSpacing = 9 9 5", "ElementSpacing = -9 9 5")], d / "s.mhd"


@_case(SCANS, r"direction 1 0 0 0 2 0 0 0 1 is not a rotation")
def direction_not_a_rotation(d):
    return [_edit(_mhd(d), "TransformMatrix = 1 0 0 0 1 0 0 0 1", "TransformMatrix = 1 0 0 0 2 0 0 0 1")], d / "s.mhd"


@_case(SCANS, r"DimSize = '32 32 eight' is not a list of numbers")
def dimsize_not_numbers(d):
    return [_edit(_mhd(d), "DimSize = 32 32 8", "DimSize = 32 32 eight")], d / "s.mhd"


@_case(SCANS, r"ElementType MET_STRING is not supported; expected one of MET_UCHAR")
def element_type_string(d):
    return [_edit(_mhd(d), "MET_SHORT", "MET_STRING")], d / "s.mhd"


@_case(SCANS, r"ElementType INT16 is not supported")
def element_type_garbage(d):
    return [_edit(_mhd(d), "MET_SHORT", "INT16")], d / "s.mhd"


@_case(SCANS, r"not a MetaImage header \(no ElementDataFile line\)")
def no_element_data_file(d):
    return [_edit(_mhd(d), "ElementDataFile = s.raw", "")], d / "s.mhd"


@_case(SCANS, r"ElementDataFile = LIST names 0 files where DimSize 32 32 8 needs 8")
def element_data_file_list_of_nothing(d):
    return [_edit(_mhd(d), "ElementDataFile = s.raw", "ElementDataFile = LIST")], d / "s.mhd"


@_case(SCANS, r"missing \(the data file named by s\.mhd\)")
def element_data_file_list_missing_slice(d):
    p = _edit(_mhd(d), "ElementDataFile = s.raw", "ElementDataFile = LIST 2D\n" + "\n".join(f"z{k}.raw" for k in range(8)))
    for k, plane in enumerate(chest().hu[:7]):
        (d / f"z{k}.raw").write_bytes(plane.tobytes())
    return [p], d / "z7.raw"


@_case(SCANS, r"ElementDataFile \.\./s\.raw lies outside the header's folder")
def element_data_file_outside_its_folder(d):
    _mhd(d)
    (d / "sub").mkdir()
    shutil.move(d / "s.mhd", d / "sub" / "s.mhd")
    return [_edit(d / "sub" / "s.mhd", "ElementDataFile = s.raw", "ElementDataFile = ../s.raw")], d / "sub" / "s.mhd"


@_case(SCANS, r"expected a 3D image, got 2D")
def mhd_2d_image(d):
    return [_write_sitk(sitk.GetImageFromArray(chest().hu[4]), d / "flat.mhd")], d / "flat.mhd"


@_case(SCANS, r"expected one value per voxel, got 3")
def mhd_rgb(d):
    rgb = np.zeros((8, 32, 32, 3), np.uint8)
    return [_write_sitk(sitk.GetImageFromArray(rgb, isVector=True), d / "rgb.mhd")], d / "rgb.mhd"


@_case(SCANS, r"truncated, 40 bytes where c\.mhd needs \d+")
def truncated_zraw(d):
    sitk.WriteImage(to_sitk(chest()), str(d / "c.mhd"), useCompression=True)
    (d / "c.zraw").write_bytes((d / "c.zraw").read_bytes()[:40])
    return [d / "c.mhd"], d / "c.zraw"


@_case(SCANS, r"expected a 3D image, got 4D")
def nifti_4d(d):
    image = to_sitk(chest())
    return [_write_sitk(sitk.JoinSeries([image, image]), d / "t.nii")], d / "t.nii"


@_case(SCANS, r"not a NIfTI file \(a PNG image by its content\)")
def png_renamed_nii(d):
    _write_sitk(sitk.GetImageFromArray(np.zeros((16, 16), np.uint8)), d / "x.png").rename(d / "x.nii")
    return [d / "x.nii"], d / "x.nii"


@_case(SCANS, r"unreadable NIfTI \(Compressed file ended before the end-of-stream marker")
def truncated_nii_gz(d):
    write_ct(chest(), d / "s.nii.gz")
    (d / "s.nii.gz").write_bytes((d / "s.nii.gz").read_bytes()[:200])
    return [d / "s.nii.gz"], d / "s.nii.gz"


@_case(SCANS, r"truncated, 5000 bytes \(unzipped\) where its header needs 16736")
def truncated_nii(d):
    write_ct(chest(), d / "s.nii")
    (d / "s.nii").write_bytes((d / "s.nii").read_bytes()[:5000])
    return [d / "s.nii"], d / "s.nii"


@_case(SCANS, r"eval\.batch_size=0; it must be at least 1 \(--batch-size\)")
def batch_size_zero(d):
    return [_mhd(d, chest(lung=False)), "--batch-size", "0"], "batch"


@pytest.mark.parametrize("build, problem", SCANS)
def test_predict_refuses_the_scan(build, problem, random_checkpoint, tmp_path, capfd):
    args, named = build(tmp_path)
    out = tmp_path / "out"
    code = main(["predict", *map(str, args), "--checkpoint", str(random_checkpoint), "-o", str(out), "--no-pictures"])
    refused(code, capfd, "predict", named, problem)
    assert not (out / "summary.json").exists() and not (out / "candidates.csv").exists()
    assert not out.exists() or not list(out.glob(".*.partial"))  # no half-written scan folder either


def _predict(capfd, tmp_path: Path, checkpoint: Path, *inputs) -> tuple[list[dict], str]:
    """Predict that must succeed: the summaries and what it printed."""
    out = tmp_path / "out"
    code = main(["predict", *map(str, inputs), "--checkpoint", str(checkpoint), "-o", str(out), "--no-pictures"])
    printed, err = capfd.readouterr()
    assert code == 0 and "Traceback" not in printed + err, err
    return json.loads((out / "summary.json").read_text()), printed


def test_dicom_without_rescale_is_read_as_slope_1_intercept_0(random_checkpoint, tmp_path, caplog, capfd):
    def strip(k, ds):
        del ds.RescaleSlope, ds.RescaleIntercept
    volume = chest(lung=False)
    volume.hu[2:6, 10:20, 10:20] = np.arange(-1024, 2976, 10).reshape(4, 10, 10)  # every sort of HU
    folder = _dicom(tmp_path, volume, edit=strip)
    assert "RescaleSlope" not in pydicom.dcmread(folder / "0000.dcm")
    np.testing.assert_array_equal(read_ct(folder).hu, volume.hu)
    [summary], _ = _predict(capfd, tmp_path, random_checkpoint, folder)
    assert summary["shape_zyx"] == [8, 32, 32]
    assert f"{folder}: 8 of 8 images without RescaleSlope/RescaleIntercept; assuming slope 1 and intercept 0" \
        in caplog.text


def test_compressed_zraw_reads_and_predicts(random_checkpoint, tmp_path, capfd):
    volume = chest(slices=4)
    sitk.WriteImage(to_sitk(volume), str(tmp_path / "c.mhd"), useCompression=True)
    assert "CompressedData = True" in (tmp_path / "c.mhd").read_text() and (tmp_path / "c.zraw").is_file()
    np.testing.assert_array_equal(read_ct(tmp_path / "c.mhd").hu, volume.hu)
    [summary], _ = _predict(capfd, tmp_path, random_checkpoint, tmp_path / "c.mhd")
    assert summary["slices"] == 2 and "candidates" in summary["status"]  # the detector ran on both lung slices


def test_mhd_list_of_slice_files_reads(random_checkpoint, tmp_path, capfd):
    volume = chest(lung=False)
    p = _edit(_mhd(tmp_path, volume), "ElementDataFile = s.raw",
              "ElementDataFile = LIST 2D\n" + "\n".join(f"z{k}.raw" for k in range(8)))
    for k, plane in enumerate(volume.hu):
        (tmp_path / f"z{k}.raw").write_bytes(plane.tobytes())
    np.testing.assert_array_equal(read_ct(p).hu, volume.hu)
    [summary], _ = _predict(capfd, tmp_path, random_checkpoint, p)
    assert summary["shape_zyx"] == [8, 32, 32]


def test_scan_without_lung_says_so(random_checkpoint, tmp_path, capfd):
    [summary], printed = _predict(capfd, tmp_path, random_checkpoint, _mhd(tmp_path, chest(lung=False)))
    assert summary["status"] == "no lung found: nothing to search" and "no lung found" in printed
    assert (tmp_path / "out" / "candidates.csv").read_text().strip() == "seriesuid,coordX,coordY,coordZ,probability"


# ---- checkpoints and output paths (predict) ------------------------------------------------

CHECKPOINTS: list = []


@_case(CHECKPOINTS, "no such checkpoint")
def checkpoint_missing(d):
    return d / "nope.pt"


@_case(CHECKPOINTS, r"not a readable checkpoint \(")
def checkpoint_random_bytes(d):
    (d / "c.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    return d / "c.pt"


@_case(CHECKPOINTS, r"not a readable checkpoint \(")
def checkpoint_truncated(d):
    p = write_random_checkpoint(d / "c.pt")
    p.write_bytes(p.read_bytes()[:5000])
    return p


@_case(CHECKPOINTS, r"not a noduledet checkpoint \(no model and spec\)")
def checkpoint_of_something_else(d):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, d / "c.pt")
    return d / "c.pt"


@_case(CHECKPOINTS, r"checkpoint format 1, this noduledet .* reads format 2")
def checkpoint_older_format(d):
    torch.save({"model": {"w": torch.zeros(2)}, "spec": {}, "format": 1}, d / "c.pt")
    return d / "c.pt"


@_case(CHECKPOINTS, r"\(its config\): unknown key train\.bogus")
def checkpoint_config_with_unknown_key(d):
    raw = torch.load(write_random_checkpoint(d / "c.pt"), weights_only=True)
    raw["config"]["train"]["bogus"] = 1
    torch.save(raw, d / "c.pt")
    return d / "c.pt"


@_case(CHECKPOINTS, r"the weights do not fit the ccapm variant its spec describes")
def checkpoint_of_another_variant(d):
    raw = torch.load(write_random_checkpoint(d / "c.pt"), weights_only=True)
    raw["variant"] = raw["config"]["model"]["variant"] = "ccapm"  # the weights stay those of "res"
    torch.save(raw, d / "c.pt")
    return d / "c.pt"


@pytest.mark.parametrize("build, problem", CHECKPOINTS)
def test_predict_refuses_the_checkpoint(build, problem, tmp_path, capfd):
    ckpt = build(tmp_path)
    out = tmp_path / "out"
    code = main(["predict", str(_mhd(tmp_path, chest(lung=False))), "--checkpoint", str(ckpt), "-o", str(out)])
    refused(code, capfd, "predict", ckpt, problem)
    assert not out.exists()


def test_predict_refuses_an_output_path_that_is_a_file(random_checkpoint, tmp_path, capfd):
    (tmp_path / "out").write_text("keep me")
    code = main(["predict", str(_mhd(tmp_path)), "--checkpoint", str(random_checkpoint), "-o", str(tmp_path / "out")])
    refused(code, capfd, "predict", tmp_path / "out", "is a file, not a folder")
    assert (tmp_path / "out").read_text() == "keep me"


def test_predict_refuses_an_existing_output_without_force(random_checkpoint, tmp_path, capfd):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.json").write_text("[]")
    code = main(["predict", str(_mhd(tmp_path)), "--checkpoint", str(random_checkpoint), "-o", str(tmp_path / "out")])
    refused(code, capfd, "predict", tmp_path / "out", "exists; pass --force to replace it")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["summary.json"]
    assert (tmp_path / "out" / "summary.json").read_text() == "[]"


# ---- CSVs (froc) -----------------------------------------------------------------------------

ANNOTATIONS = "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.1,10,20,30,8\n1.2,-40,5,60,12\n"
CANDIDATES = ("seriesuid,coordX,coordY,coordZ,probability\n"
              "1.1,10,20,30,0.9\n1.1,60,60,60,0.7\n1.2,-40,5,61,0.6\n1.2,0,0,0,0.8\n")


def _files(d: Path, annotations: str = ANNOTATIONS, candidates: str = CANDIDATES, **more: str) -> list[str]:
    """froc's options for CSVs with these contents (``more``: other options' files)."""
    args = []
    for option, text in {"annotations": annotations, "candidates": candidates, **more}.items():
        (d / f"{option}.csv").write_text(text)
        args += [f"--{option}", str(d / f"{option}.csv")]
    return args + ["--bootstrap", "0"]


CSVS: list = []


@_case(CSVS, r":3: diameter_mm=-4; a nodule's diameter is positive")
def annotations_negative_diameter(d):
    return _files(d, ANNOTATIONS.replace("60,12", "60,-4")), d / "annotations.csv"


@_case(CSVS, r":3: diameter_mm=0; a nodule's diameter is positive \(-1: unknown\)")
def excluded_zero_diameter(d):
    return _files(d, excluded="seriesuid,coordX,coordY,coordZ,diameter_mm\n1.1,0,0,0,-1\n1.2,1,1,1,0\n"), \
        d / "excluded.csv"


@_case(CSVS, r":5: probability=nan is not a finite number")
def candidates_nan_probability(d):
    return _files(d, candidates=CANDIDATES.replace("\n1.2,-40", "\n\n1.2,-40").replace("0.6", "nan")), \
        d / "candidates.csv"  # the blank line before it is counted


@_case(CSVS, r":2: coordY=inf is not a finite number")
def candidates_infinite_coordinate(d):
    return _files(d, candidates=CANDIDATES.replace("1.1,10,20,30,0.9", "1.1,10,inf,30,0.9")), d / "candidates.csv"


@_case(CSVS, r":3: coordZ='thirty' is not a number")
def annotations_word_for_a_number(d):
    return _files(d, ANNOTATIONS.replace("-40,5,60", "-40,5,thirty")), d / "annotations.csv"


@_case(CSVS, r":2: fewer cells than the 5 of the header")
def candidates_short_row(d):
    return _files(d, candidates=CANDIDATES.replace("1.1,10,20,30,0.9", "1.1,10,20,30")), d / "candidates.csv"


@_case(CSVS, r":2: more cells than the 5 of the header")
def annotations_long_row(d):
    return _files(d, ANNOTATIONS.replace("1.1,10,20,30,8", "1.1,10,20,30,8,9")), d / "annotations.csv"


@_case(CSVS, r"missing column\(s\) \['probability'\]")
def candidates_wrong_columns(d):
    return _files(d, candidates=ANNOTATIONS), d / "candidates.csv"


@_case(CSVS, r"empty file \(expected the header seriesuid,coordX")
def annotations_empty(d):
    return _files(d, ""), d / "annotations.csv"


@_case(CSVS, r"not a text CSV \(byte \d+ is not UTF-8\)")
def candidates_binary(d):
    args = _files(d)
    (d / "candidates.csv").write_bytes(b"PK\x03\x04" + bytes(range(128, 256)))  # a spreadsheet, say
    return args, d / "candidates.csv"


@_case(CSVS, r"not a text list of seriesuids")
def scans_list_binary(d):
    (d / "scans.txt").write_bytes(bytes(range(128, 256)))
    return _files(d) + ["--scans", str(d / "scans.txt")], d / "scans.txt"


@_case(CSVS, r"not a picture file name; end it in one of .*\.png")
def plot_of_unknown_format(d):
    return _files(d) + ["--plot", str(d / "froc.txt")], d / "froc.txt"


@_case(CSVS, r"no folder .*nope to write it in")
def plot_into_a_missing_folder(d):
    return _files(d) + ["--plot", str(d / "nope" / "froc.png")], d / "nope" / "froc.png"


@_case(CSVS, "no such file")
def candidates_missing(d):
    return _files(d)[:2] + ["--candidates", str(d / "nope.csv")], d / "nope.csv"


@_case(CSVS, "no such file")
def scans_list_missing(d):
    return _files(d) + ["--scans", str(d / "nope.txt")], d / "nope.txt"


@_case(CSVS, "must be 0 or more")
def negative_max_candidates(d):
    return _files(d) + ["--max-candidates", "-5"], "--max-candidates -5"


@_case(CSVS, "must be 0 or more")
def negative_bootstrap(d):
    return _files(d)[:-1] + ["-3"], "--bootstrap -3"


@pytest.mark.parametrize("build, problem", CSVS)
def test_froc_refuses_the_csv(build, problem, tmp_path, capfd):
    args, named = build(tmp_path)
    refused(main(["froc", *args]), capfd, "froc", named, problem)


def _froc(capfd, *args) -> str:
    code = main(["froc", *args])
    out, err = capfd.readouterr()
    assert code == 0 and "Traceback" not in out + err, err
    return out


def _cpm(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("CPM"))


def test_froc_reads_columns_by_name_in_any_order(tmp_path, capfd):
    base = _froc(capfd, *_files(tmp_path))
    shuffled = "seriesuid,diameter_mm,coordZ,coordX,coordY\n1.1,8,30,10,20\n1.2,12,60,-40,5\n"
    assert _froc(capfd, *_files(tmp_path, shuffled)) == base
    assert "2 nodules, 2 hit by a candidate" in base and _cpm(base) != "CPM 0.0000"


def test_froc_reads_a_spreadsheets_byte_order_mark(tmp_path, capfd):
    base = _froc(capfd, *_files(tmp_path))
    assert _froc(capfd, *_files(tmp_path, "\ufeff" + ANNOTATIONS, "\ufeff" + CANDIDATES)) == base


def test_froc_leaves_out_nodules_of_scans_not_evaluated(tmp_path, capfd):
    base = _froc(capfd, *_files(tmp_path))
    out = _froc(capfd, *_files(tmp_path, ANNOTATIONS + "9.9,0,0,0,6\n"))
    assert _cpm(out) == _cpm(base) and "2 nodules, 2 hit" in out
    assert f"{tmp_path / 'annotations.csv'}: 1 nodules in scans not evaluated, left out" in out


def test_froc_accepts_excluded_findings_without_a_diameter(tmp_path, capfd):
    base = _froc(capfd, *_files(tmp_path))
    out = _froc(capfd, *_files(tmp_path, excluded="seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2,0,0,0,-1\n"))
    assert "2 nodules, 2 hit" in out and _cpm(out) > _cpm(base)  # the FP at (0, 0, 0) is excluded


def test_froc_keeps_the_100_most_probable_candidates_per_scan(tmp_path, capfd):
    """150 candidates in one of 20 scans: the only hit is the 120th most probable, so it counts
    without the cap (119 FPs over 20 scans is below 8 per scan) and not with it."""
    probs = np.linspace(0.99, 0.01, 150)
    rows = [f"1.1,{200 + i},0,0,{p:.4f}" for i, p in enumerate(probs)]
    rows[119] = f"1.1,10,20,30,{probs[119]:.4f}"
    head = "seriesuid,coordX,coordY,coordZ,probability\n"
    scans = "".join(f"1.{i}\n" for i in range(1, 21))
    capped = _froc(capfd, *_files(tmp_path, ANNOTATIONS, head + "\n".join(rows) + "\n", scans=scans))
    assert "1 scans have more than 100 candidates: the 100 most probable of each count" in capped
    top100 = _froc(capfd, *_files(tmp_path, ANNOTATIONS, head + "\n".join(rows[:100]) + "\n", scans=scans))
    assert _cpm(capped) == _cpm(top100) == "CPM 0.0000" and "more than 100" not in top100
    uncapped = _froc(capfd, *_files(tmp_path, ANNOTATIONS, head + "\n".join(rows) + "\n", scans=scans),
                     "--max-candidates", "0")
    assert "1 hit by a candidate" in uncapped and _cpm(uncapped) != "CPM 0.0000"


# ---- configs (train) -------------------------------------------------------------------------

CONFIGS: list = []


@_case(CONFIGS, r"train\.epochs: expected int, got 'three'")
def config_wrong_type(d):
    (d / "c.yaml").write_text("train:\n  epochs: three\n")
    return [d / "c.yaml"], d / "c.yaml"


@_case(CONFIGS, r"unknown key train\.epoch; choose from")
def config_unknown_key(d):
    (d / "c.yaml").write_text("train:\n  epoch: 3\n")
    return [d / "c.yaml"], d / "c.yaml"


@_case(CONFIGS, r"unknown section 'trian'")
def config_unknown_section(d):
    (d / "c.yaml").write_text("trian:\n  epochs: 3\n")
    return [d / "c.yaml"], d / "c.yaml"


@_case(CONFIGS, r":3: not valid YAML")
def config_bad_yaml(d):
    (d / "c.yaml").write_text("train:\n  epochs: [3\n  lr: 0.1\n")
    return [d / "c.yaml"], d / "c.yaml"


@_case(CONFIGS, r"expected a mapping of sections")
def config_a_list(d):
    (d / "c.yaml").write_text("- train\n- epochs\n")
    return [d / "c.yaml"], d / "c.yaml"


@_case(CONFIGS, r"model\.variant='resnet'; choose from")
def config_unknown_variant(d):
    (d / "c.yaml").write_text("model:\n  variant: resnet\n")
    return [d / "c.yaml"], d / "c.yaml"


@_case(CONFIGS, r"stage2\.blobs=-1; it must be 0 \(none\) or more")
def config_negative_blobs(d):
    (d / "c.yaml").write_text("stage2:\n  blobs: -1\n")
    return [d / "c.yaml"], d / "c.yaml"


@_case(CONFIGS, r"stage2\.flips_top=-4; it must be 0 \(none\) or more")
def config_negative_flips(d):
    (d / "c.yaml").write_text("stage2:\n  flips_top: -4\n")
    return [d / "c.yaml"], d / "c.yaml"


@_case(CONFIGS, r"stage2\.epochs=0; it must be at least 1")
def config_no_stage2_epochs(d):
    (d / "c.yaml").write_text("stage2:\n  epochs: 0\n")
    return [d / "c.yaml"], d / "c.yaml"


@_case(CONFIGS, r"stage2\.synthetic=1\.5; it must be a fraction from 0 to 1")
def config_synthetic_over_one(d):
    (d / "c.yaml").write_text("stage2:\n  synthetic: 1.5\n")
    return [d / "c.yaml"], d / "c.yaml"


@_case(CONFIGS, r"proposer\.patch=20; it must be a multiple of 8, at least 16")
def config_proposer_patch_not_a_multiple_of_8(d):
    (d / "c.yaml").write_text("proposer:\n  patch: 20\n")
    return [d / "c.yaml"], d / "c.yaml"


@_case(CONFIGS, r"proposer\.hard=2\.0; it must be a fraction from 0 to 1")
def config_proposer_hard_over_one(d):
    (d / "c.yaml").write_text("proposer:\n  hard: 2\n")
    return [d / "c.yaml"], d / "c.yaml"


@_case(CONFIGS, r"stage2\.context=1; it must be 0 \(none\) or at least 2")
def config_context_of_one(d):
    (d / "c.yaml").write_text("stage2:\n  context: 1\n")
    return [d / "c.yaml"], d / "c.yaml"


def _config_case(problem: str, text: str) -> None:
    """A config battery case: ``text`` as c.yaml, refused with ``problem``."""
    def build(d):
        (d / "c.yaml").write_text(text)
        return [d / "c.yaml"], d / "c.yaml"

    build.__name__ = "config_" + re.sub(r"\W+", "_", text).strip("_")
    _case(CONFIGS, problem)(build)


for _problem, _text in [  # values that reached a ZeroDivisionError, a crash or a silent misreading later
    (r"train\.val_every=0; it must be at least 1", "train: {val_every: 0}\n"),
    (r"data\.eval_slice_stride=0; it must be at least 1", "data: {eval_slice_stride: 0}\n"),
    (r"stage2\.spacing_mm=0\.0; it must be more than 0", "stage2: {spacing_mm: 0}\n"),
    (r"data\.pixel_mm=-0\.7; it must be 0 or more", "data: {pixel_mm: -0.7}\n"),
    (r"eval\.link_mm=0; it must be more than 0", "eval: {link_mm: 0, slice_step_mm: 0}\n"),
    (r"eval\.min_score=1\.5; a probability is between 0 and 1", "eval: {min_score: 1.5}\n"),
    (r"data\.test_fraction=0\.5 and data\.val_fraction=0\.5; each from 0 and together below 1",
     "data: {test_fraction: 0.5, val_fraction: 0.5}\n"),
    (r"data\.min_section=1\.5; it must be from 0 to below 1", "data: {min_section: 1.5}\n"),
    (r"data\.window_hu=\[400, -1000\]; expected \[low, high\] HU with low < high", "data: {window_hu: [400, -1000]}\n"),
    (r"data\.window_hu=\[-1000\]; expected \[low, high\]", "data: {window_hu: [-1000]}\n"),
    (r"data\.offsets_mm=\[\]; expected a list of z offsets in mm", "data: {offsets_mm: []}\n"),
    (r"model\.options: unknown detector option\(s\) \['fpn_width'\]", "model: {options: {fpn_width: 32}}\n"),
    (r"model\.options\.masks: set by model\.masks, not here", "model: {options: {masks: true}}\n"),
    (r"model\.options\.in_channels: set by data\.offsets_mm", "model: {options: {in_channels: 5}}\n"),
    (r"model\.options\.neck='c5'; choose from", "model: {options: {neck: c5}}\n"),
]:
    _config_case(_problem, _text)


@_case(CONFIGS, "no such config file")
def config_missing(d):
    return [d / "nope.yaml"], d / "nope.yaml"


@_case(CONFIGS, "expected section.key=value")
def config_override_without_value(d):
    (d / "c.yaml").write_text("train:\n  epochs: 3\n")
    return [d / "c.yaml", "train.epochs"], "'train.epochs'"


@pytest.mark.parametrize("build, problem", CONFIGS)
def test_train_refuses_the_config(build, problem, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run folder, runs/run, must not appear
    args, named = build(tmp_path)
    refused(main(["train", *map(str, args)]), capfd, "train", named, problem)
    assert not (tmp_path / "runs").exists()


# ---- dataset layouts (prepare) ---------------------------------------------------------------

def _luna(d: Path, annotations: str = "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.1,0,0,0,8\n") -> Path:
    root = d / "luna"
    _mhd(root / "subset0", name="1.1.mhd")
    (root / "annotations.csv").write_text(annotations)
    return root


LAYOUTS: list = []


@_case(LAYOUTS, "no such folder")
def layout_missing(d):
    return d / "nope", d / "nope"


@_case(LAYOUTS, r"no scans \(expected subset0\.\.9/<seriesuid>\.mhd")
def layout_without_subsets(d):
    _mhd(d / "flat")
    return d / "flat", d / "flat"


@_case(LAYOUTS, r"no annotations\.csv \(looked in")
def layout_without_annotations(d):
    root = _luna(d)
    (root / "annotations.csv").unlink()
    return root, root


@_case(LAYOUTS, r":2: diameter_mm=-8; a nodule's diameter is positive")
def layout_negative_diameter(d):
    root = _luna(d, "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.1,0,0,0,-8\n")
    return root, root / "annotations.csv"


@_case(LAYOUTS, r"missing \(the data file named by 1\.1\.mhd\)")
def layout_scan_without_raw(d):
    root = _luna(d)
    (root / "subset0" / "1.1.raw").unlink()
    return root, root / "subset0" / "1.1.raw"


@pytest.mark.parametrize("build, problem", LAYOUTS)
def test_prepare_refuses_the_layout(build, problem, tmp_path, capfd):
    root, named = build(tmp_path)
    cache = tmp_path / "cache"
    code = main(["prepare", str(root), "data.lidc_masks=false", "--cache", str(cache), "--workers", "1"])
    refused(code, capfd, "prepare", named, problem)
    manifest = cache / "manifest.json"
    assert not manifest.exists() or not json.loads(manifest.read_text())["complete"]


def test_the_battery_has_at_least_30_cases():
    valid = [name for name in globals() if name.startswith("test_") and "refuses" not in name and "battery" not in name]
    assert len(SCANS) + len(CHECKPOINTS) + len(CSVS) + len(CONFIGS) + len(LAYOUTS) + len(valid) >= 30
