"""Outputs for the places where CT is read: DICOM SR and SEG, DICOMweb, an offline viewer.

``finding`` (what a report says about one nodule), ``source`` (the series it refers to), ``sr``
(TID 1500 measurement report), ``seg`` (DICOM segmentation), ``dicomweb`` (QIDO/WADO/STOW),
``viewer`` (one self-contained HTML page). highdicom and the HTTP client load only with the
module that needs them.
"""

from noduledet.clinical.finding import (LUNG_RADS_NOTE, SIZE_CATEGORIES, Finding, findings_from_candidates,
                                        size_category)

__all__ = ["LUNG_RADS_NOTE", "SIZE_CATEGORIES", "Finding", "findings_from_candidates", "size_category"]
