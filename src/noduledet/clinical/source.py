"""The source CT series that a report or a segmentation refers to."""

from __future__ import annotations

from pathlib import Path

import pydicom

from noduledet.data.ct import dicom_series_files
from noduledet.errors import UserError

# Type 2 attributes of the Patient and General Study modules, which an SR or a SEG copies from its
# source: present in a scanner's images, often dropped by anonymisers and converters.
PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")


# What an SR or a SEG copies from every source instance, or places its findings with: a series
# without one of them (converters and anonymisers drop some) gets no report, its detection stands.
REPORT_ATTRIBUTES = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPClassUID", "SOPInstanceUID")


def series_headers(folder: str | Path, series: str | None = None) -> list[pydicom.Dataset]:
    """The headers (no pixel data) of one DICOM series, in the order ``read_dicom`` stacks the
    slices: ``headers[k]`` is slice ``k`` of the volume.

    Patient and study attributes of Type 2 that the files lack are set empty (in memory only), as
    DICOM allows, so that derived objects can copy them.
    """
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in dicom_series_files(Path(folder), series)]
    for ds in headers:
        for keyword in PATIENT_STUDY_TYPE2:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return headers


def missing_for_reports(headers: list[pydicom.Dataset]) -> str | None:
    """The first of ``REPORT_ATTRIBUTES`` that an instance of the series lacks, or None."""
    return next((k for k in REPORT_ATTRIBUTES if any(not ds.get(k) for ds in headers)), None)


def read_series_headers(folder: str | Path, series: str | None = None) -> list[pydicom.Dataset]:
    """``series_headers`` of a series that an SR or SEG can refer to; one lacking an attribute
    of ``REPORT_ATTRIBUTES`` is refused: nothing could be placed in its patient frame or study."""
    headers = series_headers(folder, series)
    missing = missing_for_reports(headers)
    if missing:
        raise UserError(f"{folder}: the series has no {missing}, so no report can refer to it "
                        f"and place its findings in the patient frame")
    return headers
