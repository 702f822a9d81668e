"""A nodule finding as a clinical report carries it, and the lung-screening size category.

Coordinates follow ``noduledet.geometry``: ``world_xyz`` is (x, y, z) mm in the LPS patient frame,
which is DICOM's patient coordinate system, so a finding's centre goes into a DICOM SCOORD3D as is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom.uid import generate_uid

# Upper bounds (mm, exclusive) of the size bands of lung-screening reports (Lung-RADS v2022 for
# solid nodules: < 6, 6 to < 8, 8 to < 15, >= 15 mm); the last band has no bound.
SIZE_CATEGORIES: tuple[tuple[str, str, float], ...] = (
    ("LT6MM", "below 6 mm", 6.0),
    ("6TO8MM", "6 to below 8 mm", 8.0),
    ("8TO15MM", "8 to below 15 mm", 15.0),
    ("GE15MM", "15 mm and over", float("inf")),
)

LUNG_RADS_NOTE = ("The size category is not a Lung-RADS score: the score also needs the nodule's type "
                  "(solid, part-solid or ground glass), which this detector does not report.")


def size_category(diameter_mm: float) -> tuple[str, str]:
    """(code, meaning) of the size band that ``diameter_mm`` falls in (6.0 mm is in "6 to below 8")."""
    if not diameter_mm >= 0:
        raise ValueError(f"diameter must be a non-negative number of mm, got {diameter_mm}")
    for code, meaning, upper in SIZE_CATEGORIES:
        if diameter_mm < upper:
            return code, meaning
    raise AssertionError("unreachable: the last band has no upper bound")


@dataclass(frozen=True)
class Finding:
    """One nodule finding.

    Attributes:
        rank: 1-based tracking number ("Nodule 1" is the most probable); also its SEG segment
            number and its label in a label volume.
        world_xyz: centre (x, y, z) mm, LPS patient frame.
        diameter_mm: long-axis diameter estimate, mm.
        probability: the detector's probability that this is a nodule, in [0, 1].
        volume_mm3: volume from a mask, when one exists.
        tracking_uid: DICOM UID that names this finding in the SR and the SEG of one run.
    """

    rank: int
    world_xyz: tuple[float, float, float]
    diameter_mm: float
    probability: float
    volume_mm3: float | None = None
    tracking_uid: str = field(default_factory=generate_uid)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank is 1-based, got {self.rank}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must lie in [0, 1], got {self.probability}")
        if len(self.world_xyz) != 3:
            raise ValueError(f"world_xyz must be (x, y, z), got {self.world_xyz}")

    @property
    def tracking_id(self) -> str:
        """The human-readable tracking identifier, "Nodule <rank>"."""
        return f"Nodule {self.rank}"

    @property
    def size_category(self) -> str:
        """The lung-screening size band, e.g. "6 to below 8 mm" (see ``LUNG_RADS_NOTE``)."""
        return size_category(self.diameter_mm)[1]


def findings_from_candidates(candidates: Iterable[dict], threshold: float = 0.0,
                             volumes_mm3: dict[int, float] | None = None) -> list[Finding]:
    """Findings from predict's candidate dicts (``world_xyz``, ``diameter_mm``, ``probability``).

    Args:
        candidates: most probable first, as in ``<name>.json``.
        threshold: candidates with a lower probability are left out.
        volumes_mm3: optional volume per rank (1-based), e.g. from ``seg.label_volumes_mm3``.

    Returns:
        findings ranked 1, 2, ... in the candidates' order.
    """
    kept = [c for c in candidates if float(c["probability"]) >= threshold]
    volumes = volumes_mm3 or {}
    return [Finding(rank, tuple(float(v) for v in c["world_xyz"]), float(c["diameter_mm"]),
                    float(c["probability"]), volumes.get(rank))
            for rank, c in enumerate(kept, start=1)]
