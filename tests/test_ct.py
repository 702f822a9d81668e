import numpy as np
import pydicom
import pytest

from noduledet.data.ct import CTVolume, read_ct, read_mhd_geometry, write_ct, write_dicom
from noduledet.errors import NoSpaceError, UserError
from noduledet.geometry import Geometry
from noduledet.staging import staged_dir


def _volume(direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)) -> CTVolume:
    rng = np.random.default_rng(1)
    hu = rng.integers(-1024, 1500, size=(7, 16, 20)).astype(np.int16)
    return CTVolume(hu, Geometry((0.7, 0.8, 2.5), (120.5, 200.25, -300.0), direction, hu.shape))


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1)])
def test_same_scan_as_mhd_dicom_nifti_reads_back_the_same(tmp_path, direction):
    vol = _volume(direction)
    write_ct(vol, tmp_path / "scan.mhd")
    write_ct(vol, tmp_path / "scan.nii.gz")
    write_dicom(vol, tmp_path / "dicom")
    probe = np.array([[0, 0, 0], [6, 15, 19], [3, 7.5, 2.25]])
    for path in ("scan.mhd", "scan.nii.gz", "dicom"):
        back = read_ct(tmp_path / path)
        assert back.hu.dtype == np.int16
        np.testing.assert_array_equal(back.hu, vol.hu, err_msg=path)
        np.testing.assert_allclose(back.geometry.voxel_to_world(probe), vol.geometry.voxel_to_world(probe),
                                   atol=1e-4, err_msg=path)


def test_mhd_header_geometry_matches_the_reader(tmp_path):
    th = 0.3  # a rotation that is not its own transpose: catches a row/column mix-up
    d = (np.cos(th), -np.sin(th), 0, np.sin(th), np.cos(th), 0, 0, 0, 1)
    write_ct(_volume(d), tmp_path / "r.mhd")
    np.testing.assert_allclose(read_mhd_geometry(tmp_path / "r.mhd").direction, read_ct(tmp_path / "r.mhd").geometry.direction)


def test_dicom_rescale_is_applied(tmp_path):
    vol = _volume()
    write_dicom(vol, tmp_path / "d", intercept=-2048.0, slope=2.0)
    vol.hu[:] = (vol.hu // 2) * 2  # slope 2 stores even values exactly
    write_dicom(vol, tmp_path / "e", intercept=-2048.0, slope=2.0)
    ds = pydicom.dcmread(tmp_path / "e" / "0000.dcm")
    assert float(ds.RescaleSlope) == 2.0 and float(ds.RescaleIntercept) == -2048.0
    np.testing.assert_array_equal(read_ct(tmp_path / "e").hu, vol.hu)


def test_dicom_files_in_any_order(tmp_path):
    vol = _volume()
    paths = write_dicom(vol, tmp_path / "d")
    for i, p in enumerate(paths):  # names no longer follow position
        p.rename(p.with_name(f"x{(3 * i) % len(paths)}.dcm"))
    (tmp_path / "d" / "README.txt").write_text("not dicom")
    np.testing.assert_array_equal(read_ct(tmp_path / "d").hu, vol.hu)


def test_dicom_missing_slice_is_named(tmp_path):
    paths = write_dicom(_volume(), tmp_path / "d")
    paths[3].unlink()
    with pytest.raises(UserError, match=r"1 missing slice\(s\) between 0002.dcm .* and 0004.dcm"):
        read_ct(tmp_path / "d")


def test_dicom_uneven_spacing_is_refused(tmp_path):
    paths = write_dicom(_volume(), tmp_path / "d")
    ds = pydicom.dcmread(paths[4])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.9
    ds.save_as(paths[4])
    with pytest.raises(UserError, match="uneven spacing"):
        read_ct(tmp_path / "d")


def test_dicom_several_series_need_a_choice(tmp_path):
    vol = _volume()
    write_dicom(vol, tmp_path / "d", series_uid="1.2.3.4")
    other = CTVolume(vol.hu[:3].copy(), Geometry(vol.geometry.spacing, vol.geometry.origin, vol.geometry.direction, (3, 16, 20)))
    for p in write_dicom(other, tmp_path / "tmp", series_uid="1.2.3.5"):
        p.rename(tmp_path / "d" / f"b{p.name}")
    with pytest.raises(UserError, match=r"2 series in one folder: 1\.2\.3\.4 \(7 images\), 1\.2\.3\.5 \(3 images\); choose one with --series"):
        read_ct(tmp_path / "d")
    assert read_ct(tmp_path / "d", series="1.2.3.5").hu.shape == (3, 16, 20)


def test_empty_dicom_folder(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="no DICOM images"):
        read_ct(tmp_path / "d")


def test_missing_raw_is_named(tmp_path):
    write_ct(_volume(), tmp_path / "s.mhd")
    (tmp_path / "s.raw").unlink()
    with pytest.raises(UserError, match=r"s\.raw: missing \(the data file named by s\.mhd\)"):
        read_ct(tmp_path / "s.mhd")


def test_truncated_raw_is_named(tmp_path):
    write_ct(_volume(), tmp_path / "s.mhd")
    raw = tmp_path / "s.raw"
    raw.write_bytes(raw.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"s\.raw: truncated, 1000 bytes where s\.mhd needs 4480"):
        read_ct(tmp_path / "s.mhd")


def test_wrong_path_and_unknown_format(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        read_ct(tmp_path / "nope.mhd")
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(UserError, match="unknown CT format"):
        read_ct(tmp_path / "a.png")


def test_a_full_disk_while_writing_a_scan_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def full(*args, **kwargs):  # what ITK raises when the device is full
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: itkMetaImageIO.cxx:1110:\n"
                           "ITK ERROR: MetaImageIO: File cannot be written: s.mhd\nReason: No space left on device")

    monkeypatch.setattr("noduledet.data.ct.sitk.WriteImage", full)
    with pytest.raises(NoSpaceError, match=r"out: no space left on the device; nothing half-written is left"):
        with staged_dir(tmp_path / "out") as tmp:
            write_ct(_volume(), tmp / "s.mhd")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
