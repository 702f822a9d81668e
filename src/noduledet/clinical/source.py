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


def read_series_headers(folder: str | Path, series: str | None = None) -> list[pydicom.Dataset]:
    """The headers (no pixel data) of one DICOM series, in the order ``read_dicom`` stacks the
    slices: ``headers[k]`` is slice ``k`` of the volume.

    Patient and study attributes of Type 2 that the files lack are set empty (in memory only), as
    DICOM allows, so that derived objects can copy them. A series without FrameOfReferenceUID is
    refused: nothing could be placed in its patient frame.
    """
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in dicom_series_files(Path(folder), series)]
    if not headers[0].get("FrameOfReferenceUID"):
        raise UserError(f"{folder}: the series has no FrameOfReferenceUID, so no report can place "
                        "its findings in the patient frame")
    for ds in headers:
        for keyword in PATIENT_STUDY_TYPE2:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return headers
