"""Per-slice detections -> 3D nodule candidates in world coordinates.

Detections on nearby slices (within ``link_mm`` in z) join when their boxes overlap (IoU >= 0.25)
or their centres lie within a quarter box of each other; the connected groups are candidates.
A candidate's probability is the group's highest score. Its peak is the widest detection
scoring at least 90% of that (a nodule's equator rather than the vessel it touches); its centre
is the score-weighted mean of the boxes within one radius (in z) of the peak — a vessel joining
the chain must not drag the centre off the nodule — and its diameter the peak box's size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from noduledet.boxes import box_iou
from noduledet.geometry import Geometry, pixel_to_voxel


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
    voxel_zyx: np.ndarray  # continuous voxel centre in the volume's frame
    world_xyz: np.ndarray  # mm
    probability: float
    diameter_mm: float
    slices: int  # slices whose detections joined
    z_range: tuple[int, int]
    members: list[tuple[int, int]]  # (index into the detections list, box index)
    stage1: float | None = None  # the detector's probability, when a second stage rescored the candidate

    def to_dict(self) -> dict:
        out = {"world_xyz": [round(float(v), 3) for v in self.world_xyz],
               "voxel_zyx": [round(float(v), 3) for v in self.voxel_zyx],
               "slice": int(round(self.voxel_zyx[0])), "probability": round(float(self.probability), 5),
               "diameter_mm": round(float(self.diameter_mm), 2), "slices": self.slices,
               "z_range": list(self.z_range)}
        if self.stage1 is not None:
            out["stage1_probability"] = round(float(self.stage1), 5)
        return out

    def moved(self, offset_zyx) -> Candidate:
        """The same candidate with its voxel indices in a frame where this one's origin sits at
        ``offset_zyx`` (a region's candidates in the whole scan's frame); world is unchanged."""
        offset = np.asarray(offset_zyx, dtype=float)
        return replace(self, voxel_zyx=self.voxel_zyx + offset,
                       z_range=(self.z_range[0] + int(offset[0]), self.z_range[1] + int(offset[0])))


def merge_slices(detections: list[SliceDetections], geometry: Geometry, link_mm: float = 3.0,
                 min_score: float = 0.05) -> list[Candidate]:
    """Group per-slice boxes into 3D candidates, most probable first."""
    items = [(k, i) for k, d in enumerate(detections) for i in np.nonzero(d.scores >= min_score)[0]]
    if not items:
        return []
    z = np.array([detections[k].z for k, _ in items])
    boxes = np.array([detections[k].boxes[i] for k, i in items], dtype=float)
    scores = np.array([detections[k].scores[i] for k, i in items], dtype=float)
    gap = max(1, int(np.floor(link_mm / geometry.spacing[2] + 1e-6)))
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    size = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    by_slice = {int(s): np.nonzero(z == s)[0] for s in np.unique(z)}
    rows, cols = [], []
    for s, a in by_slice.items():  # each slice against the next ``gap`` slices, all pairs at once
        for t in range(s + 1, s + gap + 1):
            b = by_slice.get(t)
            if b is None:
                continue
            dist = np.linalg.norm(centres[a][:, None] - centres[b][None], axis=-1)
            near = dist <= 0.25 * np.maximum(size[a][:, None], size[b][None])
            i, j = np.nonzero(near | (box_iou(boxes[a], boxes[b]) >= 0.25))
            rows += a[i].tolist()
            cols += b[j].tolist()
    n = len(items)
    _, label = connected_components(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)), directed=False)
    sx, sy, sz = geometry.spacing
    diam = ((boxes[:, 2] - boxes[:, 0]) * sx + (boxes[:, 3] - boxes[:, 1]) * sy) / 2
    out = []
    for g in range(label.max() + 1):
        idx = np.nonzero(label == g)[0]
        confident = idx[scores[idx] >= 0.9 * scores[idx].max()]
        peak = confident[np.argmax(diam[confident])]
        core = idx[np.abs(z[idx] - z[peak]) * sz <= max(diam[peak] / 2, sz)]
        w = scores[core]
        cx, cy = (centres[core] * w[:, None]).sum(0) / w.sum()
        cz = float((z[core] * w).sum() / w.sum())
        voxel = np.array([cz, *pixel_to_voxel([cx, cy])])
        out.append(Candidate(voxel, geometry.voxel_to_world(voxel), float(scores[idx].max()), float(diam[peak]),
                             len(set(z[idx].tolist())), (int(z[idx].min()), int(z[idx].max())),
                             [items[i] for i in idx]))
    out.sort(key=lambda c: -c.probability)
    return out
