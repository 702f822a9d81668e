"""Coordinates, written down once.

- world: (x, y, z) millimetres, ITK/LPS physical points, as in LUNA16's CSVs.
- voxel: (z, y, x) indices into the array of ``sitk.GetArrayFromImage(image)``; continuous
  values are allowed, and integer values are voxel centres.
- pixel: continuous (x, y) on one axial slice whose pixel edges are integers: the voxel with
  index (y, x) covers [x, x+1) x [y, y+1), so its centre is at (x + 0.5, y + 0.5)
  (``pixel_to_voxel`` and ``voxel_to_pixel``).
- boxes: [x1, y1, x2, y2] in pixel coordinates, 0 <= x1 < x2 <= W (torchvision order; the
  functions that move, clip and compare them are in ``boxes``).

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

    @property
    def z_index_per_mm(self) -> float:
        """Index change per +1 mm of world z along the slice axis (negative for a flipped z) of
        an axial volume (the readers refuse others: ``slice_tilt_deg``)."""
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)
        return float(d[2, 2]) / self.spacing[2]

    def slice_index(self, z_mm: float) -> int:
        """Index of the axial slice nearest world z (``z_mm``)."""
        return int(round(self.world_to_voxel([self.origin[0], self.origin[1], z_mm])[0]))

    def slice_tilt_deg(self) -> float:
        """Angle (degrees) between the slice axis and world z: 0 for an axial scan."""
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)
        return float(np.degrees(np.arccos(min(1.0, abs(d[2, 2])))))

    def to_dict(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]), tuple(d["shape"]))


def voxel_to_pixel(voxel_yx) -> np.ndarray:
    """Voxel (y, x) indices -> pixel (x, y) continuous coordinates (centre at +0.5)."""
    return np.asarray(voxel_yx, dtype=float)[..., ::-1] + 0.5


def pixel_to_voxel(pixel_xy) -> np.ndarray:
    """Pixel (x, y) continuous coordinates -> voxel (y, x) indices (the inverse)."""
    return np.asarray(pixel_xy, dtype=float)[..., ::-1] - 0.5
