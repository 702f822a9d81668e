"""Isotropic 3D patches around points in the world, for the false-positive-reduction stage.

A patch is a cube of ``size`` voxels of ``spacing_mm`` each, centred on a world point and
aligned with the world axes (index order z, y, x of world z, y, x), sampled from a scan's
(z, y, x) HU array through its ``Geometry`` with trilinear interpolation. A scan stored with
flipped axes or another voxel size gives the same patch of the same anatomy. Points beyond the
array repeat its edge voxels (the scan region holds the lungs plus a margin).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from noduledet.geometry import Geometry


def patch_offsets(size: int, spacing_mm: float) -> np.ndarray:
    """(size,) world offsets (mm) of a patch's voxel centres from its centre."""
    return (np.arange(size) - (size - 1) / 2) * spacing_mm


def extract_patches(hu: np.ndarray, geometry: Geometry, centres_xyz, size: int = 32,
                    spacing_mm: float = 1.0) -> np.ndarray:
    """HU patches around world points.

    Args:
        hu: (Z, Y, X) HU array (an array or a memory map) with ``geometry``.
        centres_xyz: (N, 3) world centres, mm.
        size: voxels along each edge.
        spacing_mm: voxel size of the patch.

    Returns:
        (N, size, size, size) float32 HU, axes world z, y, x.
    """
    centres = np.asarray(centres_xyz, dtype=float).reshape(-1, 3)
    off = patch_offsets(size, spacing_mm)
    zz, yy, xx = np.meshgrid(off, off, off, indexing="ij")
    grid = np.stack([xx, yy, zz], axis=-1).reshape(-1, 3)  # world x, y, z offsets
    out = np.empty((len(centres), size, size, size), dtype=np.float32)
    shape = np.asarray(hu.shape)
    for i, c in enumerate(centres):
        voxels = geometry.world_to_voxel(grid + c)  # (size^3, 3) z, y, x
        lo = np.clip(np.floor(voxels.min(0)).astype(int) - 1, 0, shape - 1)
        hi = np.clip(np.ceil(voxels.max(0)).astype(int) + 2, lo + 1, shape)
        block = np.asarray(hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
        out[i] = ndimage.map_coordinates(block, (voxels - lo).T, order=1, mode="nearest").reshape(size, size, size)
    return out
