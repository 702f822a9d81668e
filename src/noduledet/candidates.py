"""What stage one finds on a slice and what the pipeline finds in a scan: the core types.

``SliceDetections`` are one slice's boxes in the volume's pixel frame (``noduledet.boxes``);
``merge`` joins them across slices into ``Candidate``s in world mm (``noduledet.geometry``),
which stage two rescores and every output (CSV, ``scan.json``, SR, SEG, viewer) writes. They live
here, apart from the algorithms that make them, so that readers and writers need no algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass
class SliceDetections:
    """One slice's detections in the volume's pixel frame.

    Attributes:
        z: slice index.
        boxes: (N, 4) x1, y1, x2, y2 pixels.
        scores: (N,).
        masks: optional (N, H, W) bool, in the frame of the region the slice was cut to ...
        origin_yx: ... whose top-left pixel is this pixel of the slice.
    """

    z: int
    boxes: np.ndarray
    scores: np.ndarray
    masks: np.ndarray | None = None
    origin_yx: tuple[int, int] = (0, 0)


@dataclass
class Candidate:
    """A 3D nodule candidate.

    Attributes:
        voxel_zyx: continuous voxel centre in the volume's frame.
        world_xyz: the centre in world mm.
        probability: the final probability (stage two's when it rescored the candidate).
        diameter_mm: the peak box's size (the peak's or spot's estimate for the other sources).
        slices: slices whose detections joined (0 for a proposer's peak or a blob-filter spot).
        z_range: the first and last of those slices.
        members: (index into the detections list, box index) of each joined detection.
        stage1: the detector's probability, when a second stage rescored the candidate.
        sources: who proposed it: stage1, proposer, blobs (``noduledet.pipeline.SOURCES``).
        proposer: the 3D proposer's probability at the candidate, when the pipeline has one.
    """

    voxel_zyx: np.ndarray
    world_xyz: np.ndarray
    probability: float
    diameter_mm: float
    slices: int
    z_range: tuple[int, int]
    members: list[tuple[int, int]]
    stage1: float | None = None
    sources: tuple[str, ...] = ("stage1",)
    proposer: float | None = None

    def to_dict(self) -> dict:
        out = {"world_xyz": [round(float(v), 3) for v in self.world_xyz],
               "voxel_zyx": [round(float(v), 3) for v in self.voxel_zyx],
               "slice": int(round(self.voxel_zyx[0])), "probability": round(float(self.probability), 5),
               "diameter_mm": round(float(self.diameter_mm), 2), "slices": self.slices,
               "z_range": list(self.z_range)}
        if self.stage1 is not None:
            out["stage1_probability"] = round(float(self.stage1), 5)
        if self.proposer is not None:
            out["proposer_probability"] = round(float(self.proposer), 5)
        out["sources"] = list(self.sources)
        return out

    def moved(self, offset_zyx) -> Candidate:
        """The same candidate with its voxel indices in a frame where this one's origin sits at
        ``offset_zyx`` (a region's candidates in the whole scan's frame); world is unchanged."""
        offset = np.asarray(offset_zyx, dtype=float)
        return replace(self, voxel_zyx=self.voxel_zyx + offset,
                       z_range=(self.z_range[0] + int(offset[0]), self.z_range[1] + int(offset[0])))
