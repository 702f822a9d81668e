"""Boxes on one axial slice: ``[x1, y1, x2, y2]`` in pixel coordinates (torchvision's order).

Pixel coordinates put the edges of pixels on integers, so the voxel with index (y, x) covers
[x, x+1) x [y, y+1) (see ``geometry``). Every move of boxes between frames (a crop, a region,
a resampled slice) and every overlap goes through these functions.
"""

from __future__ import annotations

import numpy as np


def box_iou(a, b) -> np.ndarray:
    """(N, M) IoU of boxes (N, 4) and (M, 4)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def shift_boxes(boxes, dx: float, dy: float) -> np.ndarray:
    """(N, 4) boxes moved by (dx, dy) pixels: from a region's frame to its parent's when
    (dx, dy) is the region's top-left corner in the parent, and back with (-dx, -dy)."""
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4) + np.array([dx, dy, dx, dy], dtype=np.float32)


def scale_boxes(boxes, sx: float, sy: float) -> np.ndarray:
    """(N, 4) boxes with x scaled by ``sx`` and y by ``sy`` (a resampled slice's frame)."""
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * np.array([sx, sy, sx, sy], dtype=np.float32)


def clip_boxes(boxes, height: int, width: int, min_size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Clip (N, 4) boxes to the image; drop those narrower than ``min_size`` pixels.

    Returns:
        the kept boxes (M, 4) and the (N,) bool mask of which were kept.
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, width)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, height)
    keep = ((b[:, 2] - b[:, 0]) >= min_size) & ((b[:, 3] - b[:, 1]) >= min_size)
    return b[keep], keep


def sphere_section(center_zyx, radius_mm: float, z: float, spacing_xyz, min_section: float = 0.5):
    """The circle a sphere cuts from the axial plane through slice ``z``'s voxel centres.

    Args:
        center_zyx: continuous voxel index of the sphere's centre.
        radius_mm: its radius.
        z: slice index.
        spacing_xyz: voxel size (x, y, z) mm.
        min_section: a plane cutting a circle narrower than ``min_section * radius_mm`` (a cap)
            counts as missing the sphere.

    Returns:
        (centre x, centre y) in pixel coordinates and the circle's radius in mm, or None.
    """
    cz, cy, cx = (float(c) for c in center_zyx)
    dz = (z - cz) * float(spacing_xyz[2])
    r2 = radius_mm**2 - dz**2
    if r2 <= 0 or np.sqrt(r2) < min_section * radius_mm:
        return None
    return (cx + 0.5, cy + 0.5), float(np.sqrt(r2))


def sphere_box(center_zyx, radius_mm: float, z: float, spacing_xyz, min_section: float = 0.5):
    """[x1, y1, x2, y2] box (unclipped) of ``sphere_section``'s circle, or None."""
    cut = sphere_section(center_zyx, radius_mm, z, spacing_xyz, min_section)
    if cut is None:
        return None
    (px, py), r = cut
    sx, sy = float(spacing_xyz[0]), float(spacing_xyz[1])
    return [px - r / sx, py - r / sy, px + r / sx, py + r / sy]
