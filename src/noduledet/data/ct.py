"""Read and write CT volumes: MetaImage (.mhd/.raw), a DICOM series folder, NIfTI (.nii, .nii.gz).

Every reader returns a ``CTVolume``: Hounsfield units as int16 in (z, y, x) order plus the
``Geometry`` that places it in the world (LPS mm, as ITK and LUNA16). Bad input raises
``UserError`` with a one-line message naming the file.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from noduledet.errors import UserError
from noduledet.geometry import Geometry

log = logging.getLogger(__name__)


@dataclass
class CTVolume:
    """A CT scan: ``hu`` (z, y, x) int16 Hounsfield units, and its ``geometry``."""

    hu: np.ndarray
    geometry: Geometry
    source: str = ""

    def __post_init__(self):
        if self.hu.ndim != 3:
            raise ValueError(f"expected a 3D (z, y, x) array, got shape {self.hu.shape}")
        if tuple(self.hu.shape) != tuple(self.geometry.shape):
            raise ValueError(f"array shape {self.hu.shape} != geometry shape {self.geometry.shape}")


def geometry_of(image: sitk.Image) -> Geometry:
    """Geometry of a 3D SimpleITK image."""
    size = image.GetSize()  # (x, y, z)
    return Geometry(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()),
                    (size[2], size[1], size[0]))


def to_sitk(volume: CTVolume) -> sitk.Image:
    """The volume as a SimpleITK image with its geometry."""
    image = sitk.GetImageFromArray(volume.hu)
    g = volume.geometry
    image.SetSpacing(g.spacing)
    image.SetOrigin(g.origin)
    image.SetDirection(g.direction)
    return image


def _to_hu(array: np.ndarray, source: str) -> np.ndarray:
    """HU as int16: integers as they are (clipped to int16), floats rounded; NaN or infinite
    voxels are refused, since no HU value stands for them."""
    if array.dtype == np.int16:
        return array
    if array.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise UserError(f"{source}: {bad} of {array.size} voxels are NaN or infinite; a CT holds finite HU values")
    return np.clip(np.rint(array), -32768, 32767).astype(np.int16)


MIN_SLICES = 3  # the 2.5D input samples slices on both sides of each slice


def _check_slices(count: int, source: str) -> None:
    if count < MIN_SLICES:
        raise UserError(f"{source}: too few slices ({count}; a CT volume needs at least {MIN_SLICES})")


def _geometry(spacing, origin, direction, shape, source: str) -> Geometry:
    """``Geometry``, with its refusals (zero or negative spacing, a direction that is not a
    rotation) as a ``UserError`` naming the file."""
    if min(spacing) <= 0:
        raise UserError(f"{source}: spacing {' '.join(f'{v:g}' for v in spacing)} mm; every spacing must be positive")
    try:
        return Geometry(tuple(spacing), tuple(origin), tuple(direction), tuple(shape))
    except ValueError:
        raise UserError(f"{source}: direction {' '.join(f'{v:g}' for v in direction)} is not a rotation "
                        f"(its columns must be orthonormal)") from None


def _from_sitk(image: sitk.Image, source: str) -> CTVolume:
    if image.GetDimension() != 3:
        raise UserError(f"{source}: expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{source}: expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()}")
    size = image.GetSize()  # (x, y, z)
    if 0 in size:
        raise UserError(f"{source}: the image is empty (size {size[0]} x {size[1]} x {size[2]})")
    _check_slices(size[2], source)
    geometry = _geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection(), (size[2], size[1], size[0]),
                         source)
    return CTVolume(_to_hu(sitk.GetArrayFromImage(image), source), geometry, source)


# ---- MetaImage ------------------------------------------------------------------------------

_MET_BYTES = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2, "MET_UINT": 4, "MET_INT": 4,
              "MET_FLOAT": 4, "MET_DOUBLE": 8, "MET_ULONG": 8, "MET_LONG": 8, "MET_ULONG_LONG": 8,
              "MET_LONG_LONG": 8}  # the scalar types; MET_STRING and the *_ARRAY types are not images


def read_mhd_header(path: Path) -> dict[str, str]:
    """The ``key = value`` lines of a MetaImage header, up to ElementDataFile."""
    header: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            for raw in f:
                line = raw.decode("latin-1").strip()
                if "=" not in line:
                    continue
                key, value = (s.strip() for s in line.split("=", 1))
                header[key] = value
                if key == "ElementDataFile":
                    break
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    for key in ("DimSize", "ElementType", "ElementDataFile"):
        if key not in header:
            raise UserError(f"{path}: not a MetaImage header (no {key} line)")
    return header


def _mhd_numbers(path: Path, header: dict[str, str], key: str, kind=float, default: str = "") -> list:
    value = header.get(key, default)
    try:
        return [kind(v) for v in value.split()]
    except ValueError:
        raise UserError(f"{path}: {key} = {value!r} is not a list of numbers") from None


def _mhd_list(path: Path) -> list[str]:
    """The file names on the lines after ``ElementDataFile = LIST``."""
    lines = path.read_bytes().decode("latin-1").splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("ElementDataFile"))
    return [line.strip() for line in lines[at + 1:] if line.strip()]


def _mhd_data_files(path: Path, header: dict[str, str], dims: list[int]) -> list[tuple[str, int | None]]:
    """The data files a header names (one; a LIST; a ``name%03d.raw first last step`` pattern),
    each with the bytes it must hold (compressed: CompressedDataSize, else None); none for LOCAL
    (the data follow the header in its own file)."""
    data = header["ElementDataFile"]
    words = data.split()
    item = _MET_BYTES[header["ElementType"]] * _mhd_numbers(path, header, "ElementNumberOfChannels", int, "1")[0]
    compressed = header.get("CompressedData", "False").lower() == "true"
    total = int(np.prod(dims))
    if data.upper() == "LOCAL":
        return []
    if words[0].upper() == "LIST":
        file_dims = int(words[1].rstrip("Dd")) if len(words) > 1 and words[1].rstrip("Dd").isdigit() else len(dims) - 1
        names, per_file = _mhd_list(path), int(np.prod(dims[:file_dims]))
    elif "%" in data and len(words) == 4 and all(w.lstrip("-").isdigit() for w in words[1:]):
        first, last, step = (int(w) for w in words[1:])
        names, per_file = [words[0] % i for i in range(first, last + 1, step or 1)], int(np.prod(dims[:-1]))
    else:
        packed = _mhd_numbers(path, header, "CompressedDataSize", int)  # what the writer wrote, when given
        return [(data, (packed[0] if packed else None) if compressed else total * item)]
    if len(names) * per_file != total:
        raise UserError(f"{path}: ElementDataFile = {data} names {len(names)} files where DimSize "
                        f"{' '.join(map(str, dims))} needs {total // per_file}")
    return [(n, None if compressed else per_file * item) for n in names]


def _beside(path: Path, name: str) -> Path:
    """The data file ``name`` of the header ``path``, refused when it lies outside its folder."""
    rel = Path(os.path.normpath(name))
    if rel.is_absolute() or rel.parts[:1] == ("..",):
        raise UserError(f"{path}: ElementDataFile {name} lies outside the header's folder; keep the data "
                        f"beside the .mhd")
    return path.parent / rel


def check_mhd(path: Path) -> None:
    """Refuse a header the reader would misread or fail on: an ElementType that is not a number
    type, a size or spacing that is not positive, data files missing, outside the header's
    folder, or shorter than DimSize says."""
    header = read_mhd_header(path)
    if header["ElementType"] not in _MET_BYTES:
        raise UserError(f"{path}: ElementType {header['ElementType']} is not supported; "
                        f"expected one of {', '.join(_MET_BYTES)}")
    dims = _mhd_numbers(path, header, "DimSize", int)
    if not dims or min(dims) <= 0:
        raise UserError(f"{path}: the image is empty (DimSize = {header['DimSize']})")
    spacing = _mhd_numbers(path, header, "ElementSpacing")
    if spacing and min(spacing) <= 0:
        raise UserError(f"{path}: ElementSpacing = {header['ElementSpacing']}; every spacing must be positive "
                        f"(a flipped axis belongs in TransformMatrix)")
    for name, need in _mhd_data_files(path, header, dims):
        raw = _beside(path, name)
        if not raw.is_file():
            raise UserError(f"{raw}: missing (the data file named by {path.name})")
        actual = raw.stat().st_size
        if need is not None and actual < need:
            raise UserError(f"{raw}: truncated, {actual} bytes where {path.name} needs {need}")


def read_mhd_geometry(path: Path) -> Geometry:
    """Geometry from a MetaImage header alone (no pixel data read)."""
    h = read_mhd_header(path)
    try:
        size = [int(v) for v in h["DimSize"].split()]
        spacing = [float(v) for v in h.get("ElementSpacing", "1 1 1").split()]
        origin = [float(v) for v in (h.get("Offset") or h.get("Origin") or h.get("Position") or "0 0 0").split()]
        direction = [float(v) for v in (h.get("TransformMatrix") or h.get("Rotation") or h.get("Orientation")
                                        or "1 0 0 0 1 0 0 0 1").split()]
        # MetaImage stores the matrix column by column (each index axis's direction in turn)
        d = np.array(direction).reshape(3, 3).T
    except (ValueError, IndexError) as err:
        raise UserError(f"{path}: bad MetaImage geometry ({err})") from None
    return _geometry(spacing, origin, d.ravel(), (size[2], size[1], size[0]), str(path))


def _read_itk(path: Path, image_io: str, what: str) -> CTVolume:
    """Read with ITK's ``image_io`` only (never another reader that recognises the content)."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO(image_io)
    reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise UserError(f"{path}: unreadable {what} ({_itk_reason(err)})") from None
    return _from_sitk(image, str(path))


def read_mhd(path: Path) -> CTVolume:
    check_mhd(path)
    return _read_itk(path, "MetaImageIO", "MetaImage")


# ---- NIfTI ----------------------------------------------------------------------------------

_SIGNATURES = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"II*\x00": "a TIFF image",
               b"MM\x00*": "a TIFF image", b"%PDF": "a PDF", b"PK\x03\x04": "a ZIP archive"}


def _nifti_bytes(path: Path) -> tuple[bytes, int]:
    """The first 540 bytes of a NIfTI file, unzipped when gzipped, and its whole (unzipped) size;
    a gzip stream is read to its end, since ITK reads a cut one without a word."""
    import gzip

    try:
        with open(path, "rb") as f:
            head = f.read(540)
        if head[:2] != b"\x1f\x8b":  # gzip, whatever the name says
            return head, path.stat().st_size
        with gzip.open(path, "rb") as g:
            head = g.read(540)
            size = len(head) + sum(len(chunk) for chunk in iter(lambda: g.read(1 << 22), b""))
        return head, size
    except (OSError, EOFError) as err:
        raise UserError(f"{path}: unreadable NIfTI ({getattr(err, 'strerror', None) or err})") from None


def check_nifti(path: Path) -> None:
    """Refuse a file that does not start as NIfTI-1 or NIfTI-2 does (a header of 348 or 540
    bytes, its size first, in either byte order), naming what it looks like instead, and one
    shorter than its header says."""
    head, size = _nifti_bytes(path)
    order = next((o for o in ("little", "big") if int.from_bytes(head[:4], o) in (348, 540)), None)
    if len(head) < 348 or order is None:
        kind = next((v for k, v in _SIGNATURES.items() if head.startswith(k)), None)
        raise UserError(f"{path}: not a NIfTI file" + (f" ({kind} by its content)" if kind else ""))
    two = int.from_bytes(head[:4], order) == 540
    if two and len(head) < 540:
        raise UserError(f"{path}: truncated NIfTI-2 header ({size} bytes)")

    def num(at: int, n: int) -> int:
        return int.from_bytes(head[at:at + n], order, signed=True)

    if two:  # NIfTI-2: bitpix int16 at 14, dim int64[8] at 16, vox_offset int64 at 168
        bitpix, dims, offset = num(14, 2), [num(16 + 8 * i, 8) for i in range(8)], num(168, 8)
    else:  # NIfTI-1: dim int16[8] at 40, bitpix int16 at 72, vox_offset float32 at 108
        bitpix, dims = num(72, 2), [num(40 + 2 * i, 2) for i in range(8)]
        offset = int(np.frombuffer(head[108:112], "<f4" if order == "little" else ">f4")[0])
    need = offset + int(np.prod([max(d, 1) for d in dims[1:1 + max(0, min(dims[0], 7))]])) * bitpix // 8
    if size < need:
        raise UserError(f"{path}: truncated, {size} bytes (unzipped) where its header needs {need}")


def read_nifti(path: Path) -> CTVolume:
    check_nifti(path)
    return _read_itk(path, "NiftiImageIO", "NIfTI")


# ---- DICOM ----------------------------------------------------------------------------------

@dataclass
class _Slice:
    path: Path
    series: str
    position: np.ndarray  # ImagePositionPatient (x, y, z)
    orientation: np.ndarray  # ImageOrientationPatient (6,)
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing)
    shape: tuple[int, int]
    modality: str = "CT"
    rescaled: bool = True  # carries RescaleSlope and RescaleIntercept


def _scan_dicom_folder(folder: Path) -> list[_Slice]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    slices = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError):
            continue  # not DICOM (a README, a DICOMDIR index, ...)
        if "ImagePositionPatient" not in ds or "Rows" not in ds:
            continue
        try:
            slices.append(_Slice(
                path, str(ds.SeriesInstanceUID),
                np.array([float(v) for v in ds.ImagePositionPatient]),
                np.array([float(v) for v in ds.ImageOrientationPatient]),
                (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
                (int(ds.Rows), int(ds.Columns)),
                str(ds.get("Modality", "CT")), "RescaleSlope" in ds and "RescaleIntercept" in ds,
            ))
        except (AttributeError, ValueError, IndexError, TypeError) as err:
            raise UserError(f"{path}: DICOM image without usable geometry ({err})") from None
    return slices


def _choose_series(folder: Path, slices: list[_Slice], series: str | None) -> list[_Slice]:
    """The slices of ``series``, or of the folder's only series."""
    if not slices:
        raise UserError(f"{folder}: no DICOM images")
    by_series: dict[str, list[_Slice]] = {}
    for s in slices:
        by_series.setdefault(s.series, []).append(s)
    if series is None and len(by_series) > 1:
        listing = ", ".join(f"{uid} ({len(v)} images)" for uid, v in sorted(by_series.items()))
        raise UserError(f"{folder}: {len(by_series)} series in one folder: {listing}; choose one with --series UID")
    if series is not None and series not in by_series:
        raise UserError(f"{folder}: no series {series}; found {sorted(by_series)}")
    return by_series[series or next(iter(by_series))]


def _check_alike(folder: Path, chosen: list[_Slice]) -> None:
    """Refuse a series that is not CT, too short, or whose images differ in size, orientation
    or pixel spacing."""
    first = chosen[0]
    other = next((s for s in chosen if s.modality != "CT"), None)
    if other is not None:
        raise UserError(f"{other.path}: modality {other.modality}, not CT; noduledet reads CT (Hounsfield units)")
    _check_slices(len(chosen), str(folder))
    for s in chosen:
        if s.shape != first.shape:
            raise UserError(f"{s.path}: {s.shape[0]}x{s.shape[1]} pixels where {first.path.name} has "
                            f"{first.shape[0]}x{first.shape[1]}; one series has one image size")
        if not np.allclose(s.orientation, first.orientation, atol=1e-4):
            raise UserError(f"{s.path}: orientation differs from {first.path.name}")
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-4):
            raise UserError(f"{s.path}: pixel spacing {s.pixel_spacing} mm differs from {first.path.name}'s "
                            f"{first.pixel_spacing}")


def _check_tilt(folder: Path, chosen: list[_Slice]) -> None:
    """Refuse slices that step obliquely to their normal (a gantry tilt): the voxels of such a
    series are sheared, which no orthonormal direction describes. Sideways drift over the whole
    series below half a pixel is rounding and passes."""
    first, last = chosen[0], chosen[-1]
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    step = last.position - first.position
    along = float(step @ normal)
    drift = float(np.linalg.norm(step - along * normal))
    if drift > 0.5 * min(first.pixel_spacing):
        angle = float(np.degrees(np.arctan2(drift, abs(along))))
        raise UserError(f"{folder}: gantry tilt of {angle:.1f} degrees (the slices drift {drift:.1f} mm sideways "
                        f"over {abs(along):.1f} mm); resample it to an untilted grid first")


def _series_slices(folder: Path, series: str | None) -> tuple[list[_Slice], float]:
    """One series' slices sorted along the slice normal, and its slice step in mm.

    A folder with no images, several series (unless ``series`` picks one), an image that is not
    CT, fewer than ``MIN_SLICES`` slices, slices of different size or orientation, a gantry tilt,
    a missing slice or uneven spacing is refused.
    """
    chosen = _choose_series(folder, _scan_dicom_folder(folder), series)
    _check_alike(folder, chosen)
    first = chosen[0]
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    chosen.sort(key=lambda s: float(s.position @ normal))
    z = np.array([s.position @ normal for s in chosen])
    gaps = np.diff(z)
    step = float(np.median(gaps))
    if step <= 1e-6 or gaps.min() <= 1e-6:
        i = int(np.argmin(gaps))
        raise UserError(f"{chosen[i + 1].path}: same position as {chosen[i].path.name} (duplicate slice)")
    bad = np.nonzero(np.abs(gaps - step) > max(0.01, 0.05 * step))[0]
    if len(bad):
        i = int(bad[0])
        missing = round(gaps[i] / step) - 1
        what = (f"{missing} missing slice(s)" if missing >= 1 and abs(gaps[i] - (missing + 1) * step) < 0.05 * step
                else f"uneven spacing ({gaps[i]:.3f} mm where the series steps {step:.3f} mm)")
        raise UserError(f"{folder}: {what} between {chosen[i].path.name} (at {z[i]:.2f} mm) and "
                        f"{chosen[i + 1].path.name} (at {z[i + 1]:.2f} mm)")
    _check_tilt(folder, chosen)
    return chosen, step


def dicom_series_files(folder: Path, series: str | None = None) -> list[Path]:
    """The files of one DICOM series in the order ``read_dicom`` stacks them: file ``k`` is
    slice ``k`` of the volume (sorted along the slice normal). Refuses what ``read_dicom`` refuses."""
    return [s.path for s in _series_slices(Path(folder), series)[0]]


def read_dicom(folder: Path, series: str | None = None) -> CTVolume:
    """Read one DICOM series from a folder.

    Slices are sorted by their position along the slice normal (``dicom_series_files``);
    rescale slope/intercept are applied. Images without them (a CT image must carry them) are
    read as slope 1, intercept 0, with a warning.
    """
    chosen, step = _series_slices(folder, series)
    unscaled = sum(not s.rescaled for s in chosen)
    if unscaled:
        log.warning(f"{folder}: {unscaled} of {len(chosen)} images without RescaleSlope/RescaleIntercept; "
                    f"assuming slope 1 and intercept 0 (stored values are HU)")
    first = chosen[0]
    row, col = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, col)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(s.path) for s in chosen])
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise UserError(f"{folder}: unreadable DICOM pixel data ({_itk_reason(err)})") from None
    hu = _to_hu(sitk.GetArrayFromImage(image), str(folder))
    direction = np.stack([row, col, normal], axis=1)  # columns: index axes x, y, z
    geometry = _geometry((first.pixel_spacing[1], first.pixel_spacing[0], step), first.position, direction.ravel(),
                         hu.shape, str(folder))
    return CTVolume(hu, geometry, str(folder))


def write_dicom(volume: CTVolume, folder: Path, series_uid: str | None = None,
                intercept: float = 0.0, slope: float = 1.0) -> list[Path]:
    """Write the volume as a DICOM CT series, one file per slice, with what a scanner's files
    carry for reports to refer to them (frame of reference, patient and study attributes).

    Stored values are (HU - intercept) / slope, as signed 16 bits when they fit, else unsigned.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    g = volume.geometry
    d = np.asarray(g.direction, dtype=float).reshape(3, 3)
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    stored = np.rint((volume.hu.astype(np.float64) - intercept) / slope)
    signed = stored.min() >= -32768 and stored.max() <= 32767
    if not signed and (stored.min() < 0 or stored.max() > 65535):
        raise ValueError("HU values do not fit 16 bits with this intercept and slope")
    stored = stored.astype(np.int16 if signed else np.uint16)
    paths = []
    for k in range(volume.hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "noduledet", k + 1
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "Phantom^noduledet", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "", "", "1", "", ""
        ds.SeriesNumber, ds.Manufacturer = 1, "noduledet (generated)"
        ds.Rows, ds.Columns = volume.hu.shape[1], volume.hu.shape[2]
        ds.PixelSpacing = [f"{g.spacing[1]:.6g}", f"{g.spacing[0]:.6g}"]
        ds.SliceThickness = f"{g.spacing[2]:.6g}"
        position = g.voxel_to_world([k, 0, 0])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in np.concatenate([d[:, 0], d[:, 1]])]
        ds.RescaleIntercept, ds.RescaleSlope = f"{intercept:g}", f"{slope:g}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, int(signed)
        ds.PixelData = stored[k].tobytes()
        path = folder / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ---- any format -----------------------------------------------------------------------------

def ct_kind(path: Path) -> str | None:
    """"mhd", "nifti", "dicom" (a folder) or None."""
    name = path.name.lower()
    if path.is_dir():
        return "dicom"
    if name.endswith(".mhd"):
        return "mhd"
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return "nifti"
    return None


MAX_TILT_DEG = 1.0  # slices whose axis leaves world z by more than this are not axial


def read_ct(path: str | os.PathLike, series: str | None = None) -> CTVolume:
    """Read an axial CT scan from a .mhd file, a .nii/.nii.gz file or a DICOM series folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    kind = ct_kind(path)
    if kind == "mhd":
        volume = read_mhd(path)
    elif kind == "nifti":
        volume = read_nifti(path)
    elif kind == "dicom":
        volume = read_dicom(path, series)
    else:
        raise UserError(f"{path}: unknown CT format (expected .mhd, .nii, .nii.gz or a DICOM folder)")
    tilt = volume.geometry.slice_tilt_deg()
    if tilt > MAX_TILT_DEG:
        raise UserError(f"{path}: not an axial scan (the slice axis is {tilt:.1f} degrees from the patient's "
                        f"z axis); noduledet reads axial CT")
    return volume


def write_ct(volume: CTVolume, path: str | os.PathLike) -> None:
    """Write .mhd (+ .raw beside it, uncompressed as LUNA16) or .nii/.nii.gz."""
    path = Path(path)
    if ct_kind(path) not in ("mhd", "nifti"):
        raise ValueError(f"{path}: write .mhd, .nii or .nii.gz (DICOM: write_dicom)")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sitk.WriteImage(to_sitk(volume), str(path), useCompression=path.name.endswith(".gz"))
    except RuntimeError as err:
        if "No space left on device" in str(err):  # ITK says so only in its message: make it the OSError it is
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


def _itk_reason(err: Exception) -> str:
    """The informative line of an ITK error (its messages run over several lines: where it was
    thrown, "ITK ERROR: ...", then "Reason: ..."): the reason, else the error line, else the first."""
    lines = [s.strip() for s in str(err).splitlines() if s.strip()]
    for prefix in ("Reason:", "ITK ERROR:"):
        for line in lines:
            reason = line[len(prefix):].split("): ", 1)[-1].strip()
            if line.startswith(prefix) and reason != "Success":  # errno 0: no reason after all
                return reason
    return lines[0] if lines else type(err).__name__
