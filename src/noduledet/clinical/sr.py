"""DICOM Structured Report of nodule findings: a TID 1500 Measurement Report (highdicom).

One TID 1411 Volumetric ROI group per ``Finding``, in the source series' frame of reference:

- tracking identifier "Nodule <rank>" and tracking UID (TID 4108);
- finding "Nodule" (SCT 27925004) at finding site "Lung" (SCT 39607008);
- the centre: "Volume Surface" SCOORD3D POINT (x, y, z) mm, geometric purpose "Center"
  (DCM 111010), with the source series;
- "Long axis" (SCT 103339001) in mm; "Volume" (SCT 118565006) in mm3 when known;
- "Certainty of Finding" (DCM 111012): the detector's probability, 0..1, unit "no units";
- the size category as a coded qualitative evaluation in our private scheme ``99NODULEDET``,
  and a "Comment" (DCM 121106) saying it is not a Lung-RADS score without the nodule type;
- algorithm identification (TID 4019): "noduledet" and its version.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from noduledet import __version__
from noduledet.clinical.finding import LUNG_RADS_NOTE, SIZE_CATEGORIES, Finding, size_category
from noduledet.errors import UserError

SCHEME = "99NODULEDET"  # private coding scheme (PS3.16 8.2: "99" prefix) for the size bands
SIZE_CATEGORY = hd.sr.CodedConcept("SIZECAT", SCHEME, "Lung nodule size category")
CT_CHEST = hd.sr.CodedConcept("24627-2", "LN", "CT Chest")
MM = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
MM3 = hd.sr.CodedConcept("mm3", "UCUM", "cubic millimeter")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
DEVICE_UID = generate_uid(entropy_srcs=["noduledet lung-nodule detector"])  # one UID per program
SR_SERIES_NUMBER = 9001


def _algorithm() -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name="noduledet", version=__version__)


def _measurements(f: Finding) -> list[hd.sr.Measurement]:
    items = [hd.sr.Measurement(codes.SCT.LongAxis, f.diameter_mm, MM),
             hd.sr.Measurement(codes.DCM.CertaintyOfFinding, f.probability, NO_UNITS, algorithm_id=_algorithm())]
    if f.volume_mm3 is not None:
        items.append(hd.sr.Measurement(codes.SCT.Volume, f.volume_mm3, MM3))
    return items


def _finding_group(f: Finding, series_uid: str, frame_of_reference: str):
    """The TID 1411 group of one finding."""
    centre = hd.sr.VolumeSurface(graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                                 graphic_data=np.array([f.world_xyz], dtype=float),
                                 frame_of_reference_uid=frame_of_reference,
                                 source_series=hd.sr.SourceSeriesForSegmentation(series_uid))
    code, meaning = size_category(f.diameter_mm)
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=f.tracking_uid, identifier=f.tracking_id),
        referenced_volume_surface=centre,
        geometric_purpose=codes.DCM.Center,
        finding_type=codes.SCT.Nodule,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
        algorithm_id=_algorithm(),
        measurements=_measurements(f),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(SIZE_CATEGORY, hd.sr.CodedConcept(code, SCHEME, meaning))],
    )
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=LUNG_RADS_NOTE, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def build_sr(findings: Sequence[Finding], sources: Sequence[pydicom.Dataset]) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR holding a TID 1500 Measurement Report of ``findings``.

    Args:
        findings: the findings to report, at least one (TID 1500 holds no empty measurement list;
            a scan without findings gets no report).
        sources: headers of the source CT series (``read_series_headers``); the report joins
            their study and patient and lists them as evidence.
    """
    if not findings:
        raise ValueError("no findings: a TID 1500 report needs at least one measurement group")
    first = sources[0]
    groups = [_finding_group(f, first.SeriesInstanceUID, first.FrameOfReferenceUID) for f in findings]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID, name="noduledet", model_name=f"noduledet {__version__}"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CT_CHEST, imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources, content=report[0], series_instance_uid=generate_uid(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="noduledet",
        is_complete=True, series_description="noduledet lung nodules")
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    return sr


def _private_scheme() -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.CodingSchemeDesignator = SCHEME
    ds.CodingSchemeName = "noduledet lung-nodule size categories"
    ds.CodingSchemeResponsibleOrganization = "noduledet"
    return ds


def write_sr(findings: Sequence[Finding], sources: Sequence[pydicom.Dataset], path: str | Path) -> Path:
    """Write ``build_sr(findings, sources)`` to ``path`` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    build_sr(findings, sources).save_as(path, enforce_file_format=True)
    return path


def _one_value(group, name) -> float | None:
    found = group.get_measurements(name=name)
    return float(found[0].value) if found else None


def _finding_from_group(group) -> Finding:
    """The ``Finding`` that ``_finding_group`` wrote, read back from a TID 1411 group."""
    label = group.tracking_identifier or ""
    if not label.startswith("Nodule ") or not label[7:].isdigit():
        raise ValueError(f"tracking identifier {label!r} is not 'Nodule <rank>'")
    centre = np.asarray(group.roi.graphic_data, dtype=float).reshape(-1, 3)[0]
    diameter, probability = _one_value(group, codes.SCT.LongAxis), _one_value(group, codes.DCM.CertaintyOfFinding)
    if diameter is None or probability is None:
        raise ValueError(f"{label}: no long axis or no certainty of finding")
    return Finding(int(label[7:]), tuple(float(v) for v in centre), diameter, probability,
                   _one_value(group, codes.SCT.Volume), str(group.tracking_uid))


def read_sr(path: str | Path) -> list[Finding]:
    """The nodule findings of a TID 1500 report written by ``write_sr``, by rank.

    Raises:
        UserError: the file is not such a report (one line naming the file and the problem).
    """
    try:
        sr = hd.sr.srread(path)
        if not isinstance(sr.content, hd.sr.MeasurementReport):
            raise ValueError("not a TID 1500 measurement report")
        groups = sr.content.get_volumetric_roi_measurement_groups(finding_type=codes.SCT.Nodule)
        findings = [_finding_from_group(g) for g in groups]
    except (OSError, ValueError, AttributeError, TypeError, RuntimeError, pydicom.errors.InvalidDicomError) as err:
        raise UserError(f"{path}: not a noduledet nodule report ({err})") from None
    return sorted(findings, key=lambda f: f.rank)
