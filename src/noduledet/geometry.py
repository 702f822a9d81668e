"""Coordinates, written down once.

- world: (x, y, z) millimetres, ITK/LPS physical points, as in LUNA16's CSVs.
- voxel: (z, y, x) indices into the array of ``sitk.GetArrayFromImage(image)``; continuous
  values are allowed, and integer values are voxel centres.
- pixel: continuous (x, y) on one axial slice whose pixel edges are integers: the voxel with
  index (y, x) covers [x, x+1) x [y, y+1), so its centre is at (x + 0.5, y + 0.5).
- boxes: [x1, y1, x2, y2] in pixel coordinates, 0 <= x1 < x2 <= W (torchvision order).

world = origin + D @ (spacing * index_xyz), with D the 3x3 direction matrix whose columns are the
world directions of the index axes x, y, z. Never assume D is the identity: four LUNA16 scans
have x and y flipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Where a (z, y, x) voxel array lies in the world.

    Attributes:
        spacing: (x, y, z) voxel size in mm.
        origin: (x, y, z) world position of the centre of voxel (0, 0, 0), mm.
        direction: 3x3 row-major direction matrix (ITK's GetDirection()), columns = index axes.
        shape: (z, y, x) array shape.
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    shape: tuple[int, int, int]

    def __post_init__(self):
        d = np.asarray(self.direction, dtype=float)
        if d.shape != (9,) or abs(abs(np.linalg.det(d.reshape(3, 3))) - 1) > 1e-3:
            raise ValueError(f"direction must be 9 numbers of an orthonormal 3x3 matrix, got {self.direction}")
        if min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing}")

    @property
    def matrix(self) -> np.ndarray:
        """(3, 3) D * diag(spacing): index_xyz -> world offset."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3) * np.asarray(self.spacing, dtype=float)

    def voxel_to_world(self, voxel_zyx) -> np.ndarray:
        """(N, 3) or (3,) voxel (z, y, x) -> world (x, y, z) mm."""
        v = np.asarray(voxel_zyx, dtype=float)
        xyz = v[..., ::-1]
        return np.asarray(self.origin) + xyz @ self.matrix.T

    def world_to_voxel(self, world_xyz) -> np.ndarray:
        """(N, 3) or (3,) world (x, y, z) mm -> continuous voxel (z, y, x)."""
        w = np.asarray(world_xyz, dtype=float) - np.asarray(self.origin)
        xyz = w @ np.linalg.inv(self.matrix).T
        return xyz[..., ::-1]

    def crop(self, start_zyx, shape_zyx) -> Geometry:
        """Geometry of the sub-array starting at voxel ``start_zyx`` with ``shape_zyx``."""
        origin = self.voxel_to_world(np.asarray(start_zyx, dtype=float))
        return Geometry(self.spacing, tuple(float(o) for o in origin), self.direction,
                        tuple(int(s) for s in shape_zyx))

    def to_dict(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]), tuple(d["shape"]))


def voxel_to_pixel(voxel_yx) -> np.ndarray:
    """Voxel (y, x) indices -> pixel (x, y) continuous coordinates (centre at +0.5)."""
    v = np.asarray(voxel_yx, dtype=float)
    return v[..., ::-1] + 0.5


def sphere_box(center_zyx, radius_mm: float, z: int, spacing_xyz, min_section: float = 0.5):
    """Box of a sphere cut by the axial plane through voxel centres of slice ``z``.

    Args:
        center_zyx: continuous voxel index of the sphere centre.
        radius_mm: sphere radius.
        z: slice index.
        spacing_xyz: voxel size (x, y, z) mm.
        min_section: slices whose cut circle has a radius below ``min_section * radius_mm``
            (the caps) get no box.

    Returns:
        [x1, y1, x2, y2] pixel box (unclipped), or None when the plane misses the sphere or
        cuts only its cap.
    """
    cz, cy, cx = (float(c) for c in center_zyx)
    sx, sy, sz = (float(s) for s in spacing_xyz)
    dz = (z - cz) * sz
    r2 = radius_mm**2 - dz**2
    if r2 <= 0 or np.sqrt(r2) < min_section * radius_mm:
        return None
    r = np.sqrt(r2)
    px, py = cx + 0.5, cy + 0.5
    return [px - r / sx, py - r / sy, px + r / sx, py + r / sy]


def clip_boxes(boxes: np.ndarray, height: int, width: int, min_size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Clip (N, 4) boxes to the image; drop those narrower than ``min_size`` pixels.

    Returns:
        the kept boxes (M, 4) and the (N,) bool mask of which were kept.
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, width)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, height)
    keep = ((b[:, 2] - b[:, 0]) >= min_size) & ((b[:, 3] - b[:, 1]) >= min_size)
    return b[keep], keep
