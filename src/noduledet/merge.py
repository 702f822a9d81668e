"""Per-slice detections -> 3D nodule candidates in world coordinates.

Detections on nearby slices join when their boxes overlap (IoU >= ``LINK_IOU``) or their centres
lie within ``LINK_CENTRE`` of the larger box's size of each other; the connected groups are
candidates. Nearby: within ``link_mm`` in z, and always the next slice stage one looked at
(``z_steps``: one rule turns both distances into whole slices). A candidate's probability is the
group's highest score. Its peak is the widest detection scoring at least ``PEAK_SCORE`` of that (a
nodule's equator rather than the vessel it touches); its centre is the score-weighted mean of the
boxes within one radius (in z) of the peak — a vessel joining the chain must not drag the centre
off the nodule — and its diameter the peak box's size.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from noduledet.boxes import box_iou
from noduledet.candidates import Candidate, SliceDetections
from noduledet.geometry import Geometry, pixel_to_voxel

LINK_IOU = 0.25  # boxes on nearby slices overlapping this much join ...
LINK_CENTRE = 0.25  # ... or whose centres lie within this fraction of the larger box's size
PEAK_SCORE = 0.9  # the peak: the widest detection scoring at least this fraction of the group's best


def z_steps(step_mm: float, link_mm: float, spacing_z: float) -> tuple[int, int]:
    """Millimetres in z as whole slices, one rule for stage one's step and merge's link.

    Args:
        step_mm: how far apart the slices stage one looks at are (0: every slice).
        link_mm: how far apart in z detections may still join.
        spacing_z: the scan's slice spacing, mm.

    Returns:
        (step, gap): stage one looks at every ``step``-th slice (the nearest whole number to
        ``step_mm``, at least 1); a detection joins those up to ``gap`` slices on (the whole
        slices within ``link_mm``, and never fewer than ``step``: the next slice looked at is
        always in reach; 3 mm steps on 0.625, 0.8, 1.7 or 2.0 mm slices once linked nothing).
    """
    step = max(1, int(round(step_mm / spacing_z))) if step_mm else 1
    return step, max(step, int(np.floor(link_mm / spacing_z + 1e-6)))


def merge_slices(detections: list[SliceDetections], geometry: Geometry, link_mm: float = 3.0,
                 min_score: float = 0.05, step_mm: float = 0.0) -> list[Candidate]:
    """Group per-slice boxes into 3D candidates, most probable first.

    Args:
        detections: per-slice detections, boxes in the volume's pixel frame.
        link_mm: detections this far apart in z may join ...
        min_score: ... when they score at least this.
        step_mm: how far apart the slices stage one looked at are (``z_steps``; 0: every slice).
    """
    items = [(k, i) for k, d in enumerate(detections) for i in np.nonzero(d.scores >= min_score)[0]]
    if not items:
        return []
    z = np.array([detections[k].z for k, _ in items])
    boxes = np.array([detections[k].boxes[i] for k, i in items], dtype=float)
    scores = np.array([detections[k].scores[i] for k, i in items], dtype=float)
    gap = z_steps(step_mm, link_mm, geometry.spacing[2])[1]
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
            near = dist <= LINK_CENTRE * np.maximum(size[a][:, None], size[b][None])
            i, j = np.nonzero(near | (box_iou(boxes[a], boxes[b]) >= LINK_IOU))
            rows += a[i].tolist()
            cols += b[j].tolist()
    n = len(items)
    _, label = connected_components(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)), directed=False)
    sx, sy, sz = geometry.spacing
    diam = ((boxes[:, 2] - boxes[:, 0]) * sx + (boxes[:, 3] - boxes[:, 1]) * sy) / 2
    out = []
    for g in range(label.max() + 1):
        idx = np.nonzero(label == g)[0]
        confident = idx[scores[idx] >= PEAK_SCORE * scores[idx].max()]
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
