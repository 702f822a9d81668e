"""DICOM Segmentation (highdicom) of nodule findings, frame for frame on the source CT series.

A label volume (z, y, x) holds 0 for background and a finding's rank where the finding is; its
slice ``k`` lies on the source instance ``k`` of ``read_series_headers`` (the order in which
``read_dicom`` stacks the series), so the volume that predict computed on ``read_dicom``'s array
goes into the SEG as is. One BINARY segment per finding: segment number = rank, label and
tracking identifier "Nodule <rank>", the finding's tracking UID (the same as in the SR), property
"Morphologically Abnormal Structure" / "Nodule", region "Lung", algorithm "noduledet". Empty
frames are left out.
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
from noduledet.clinical.finding import Finding
from noduledet.errors import UserError

SEG_SERIES_NUMBER = 9002


def label_volumes_mm3(labels: np.ndarray, spacing_xyz: Sequence[float]) -> dict[int, float]:
    """Volume in mm3 of every non-zero label of a (z, y, x) label volume with voxel size ``spacing_xyz``."""
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    voxel = float(np.prod(spacing_xyz))
    return {int(v): float(c) * voxel for v, c in zip(values, counts)}


def _segment(f: Finding) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=f.rank, segment_label=f.tracking_id,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="noduledet", version=__version__, family=codes.cid7162.ArtificialIntelligence),
        tracking_uid=f.tracking_uid, tracking_id=f.tracking_id, anatomic_regions=[codes.SCT.Lung])


def _check(labels: np.ndarray, findings: Sequence[Finding], sources: Sequence[pydicom.Dataset]) -> None:
    expected = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    if labels.shape != expected:
        raise ValueError(f"label volume {labels.shape} does not match the series (z, y, x) {expected}")
    if [f.rank for f in findings] != list(range(1, len(findings) + 1)):
        raise ValueError(f"findings must be ranked 1..N in order, got {[f.rank for f in findings]}")
    if not findings:
        raise ValueError("a segmentation needs at least one finding")
    if labels.min() < 0 or labels.max() > len(findings):
        raise ValueError(f"labels must lie in 0..{len(findings)} (one per finding), got {labels.min()}..{labels.max()}")


def build_seg(labels: np.ndarray, findings: Sequence[Finding],
              sources: Sequence[pydicom.Dataset]) -> hd.seg.Segmentation:
    """A BINARY DICOM SEG with one segment per finding.

    Args:
        labels: (z, y, x) integer label volume, 0 background, ``f.rank`` inside finding ``f``;
            slice ``k`` lies on ``sources[k]``.
        findings: ranked 1..N in order.
        sources: headers of the source series (``read_series_headers``).
    """
    _check(labels, findings, sources)
    return hd.seg.Segmentation(
        source_images=list(sources), pixel_array=labels.astype(np.uint16),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment(f) for f in findings],
        series_instance_uid=generate_uid(), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="noduledet",
        manufacturer_model_name="noduledet", software_versions=__version__,
        device_serial_number=f"noduledet-{__version__}", series_description="noduledet lung nodules",
        omit_empty_frames=bool(labels.any()))  # a SEG needs a frame: keep the empty ones when all are


def write_seg(labels: np.ndarray, findings: Sequence[Finding], sources: Sequence[pydicom.Dataset],
              path: str | Path) -> Path:
    """Write ``build_seg(labels, findings, sources)`` to ``path`` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    build_seg(labels, findings, sources).save_as(path, enforce_file_format=True)
    return path


def read_seg(path: str | Path, sources: Sequence[pydicom.Dataset]) -> np.ndarray:
    """The (z, y, x) label volume (uint16, segment number = rank) of a SEG, on ``sources``' slices.

    Raises:
        UserError: not a segmentation, or one that does not lie on these source instances.
    """
    try:
        seg = hd.seg.segread(path)
        uids = [str(s.SOPInstanceUID) for s in sources]
        return seg.get_pixels_by_source_instance(uids, combine_segments=True,
                                                 assert_missing_frames_are_empty=True, dtype=np.uint16)
    except (OSError, ValueError, KeyError, AttributeError, pydicom.errors.InvalidDicomError) as err:
        raise UserError(f"{path}: not a segmentation of this series ({err})") from None
