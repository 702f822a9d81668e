"""Classical lung segmentation: threshold, connected components, morphology.

It runs on a coarse copy of the scan (about 3 mm voxels): its uses — skipping slices without
lung and cropping slices to the lung box — need the lungs' extent, not their edge, and at that
resolution every step is a few milliseconds.

Steps: air = HU < -400; drop air connected to the image's in-plane border (outside the body and
the scanner's padding outside the reconstruction circle); keep the air components of at least
10% of the largest (the lungs with the airways; not bowel gas); close small gaps and fill the
holes that vessels and nodules leave, slice by slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from noduledet.data.ct import CTVolume

AIR_HU = -400
COARSE_MM = 3.0


@dataclass(frozen=True)
class ScanRegion:
    """The part of a scan the detector looks at: the lungs' box plus margins.

    Attributes:
        start_zyx: the region's first voxel in the scan.
        shape_zyx: its size.
        lung_slices: the slices holding lung, as indices into the region (empty: no lung).
    """

    start_zyx: tuple[int, int, int]
    shape_zyx: tuple[int, int, int]
    lung_slices: tuple[int, ...]

    def index(self) -> tuple[slice, slice, slice]:
        """(z, y, x) slices that cut the region out of the scan's array."""
        return tuple(slice(a, a + n) for a, n in zip(self.start_zyx, self.shape_zyx))  # type: ignore[return-value]


@dataclass
class LungMask:
    """The lungs of one scan on a coarse grid, with the block size that maps it back.

    Attributes:
        coarse: (z', y', x') bool mask.
        block: (z, y, x) full-resolution voxels per coarse voxel.
        shape: full-resolution (z, y, x) shape.
    """

    coarse: np.ndarray
    block: tuple[int, int, int]
    shape: tuple[int, int, int]

    @property
    def empty(self) -> bool:
        return not self.coarse.any()

    def slices(self) -> np.ndarray:
        """Full-resolution slice indices that hold lung."""
        has = np.repeat(self.coarse.any(axis=(1, 2)), self.block[0])
        return np.nonzero(has[: self.shape[0]])[0]

    def box_yx(self, margin_px: int = 0) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) full-resolution box around the lungs of all slices, plus a margin."""
        if self.empty:
            return 0, 0, self.shape[1], self.shape[2]
        ys = np.nonzero(self.coarse.any(axis=(0, 2)))[0]
        xs = np.nonzero(self.coarse.any(axis=(0, 1)))[0]
        by, bx = self.block[1], self.block[2]
        return (max(0, int(ys[0]) * by - margin_px), max(0, int(xs[0]) * bx - margin_px),
                min(self.shape[1], (int(ys[-1]) + 1) * by + margin_px),
                min(self.shape[2], (int(xs[-1]) + 1) * bx + margin_px))

    def region(self, spacing_xyz, margin_mm: float = 10.0, z_margin_mm: float = 12.0) -> ScanRegion:
        """The lungs' box plus margins (the whole volume when there is no lung)."""
        if self.empty:
            return ScanRegion((0, 0, 0), self.shape, ())
        sx, sy, sz = spacing_xyz
        z = self.slices()
        zm = int(np.ceil(z_margin_mm / sz))
        y0, x0, y1, x1 = self.box_yx(int(np.ceil(margin_mm / min(sx, sy))))
        z0, z1 = max(0, int(z[0]) - zm), min(self.shape[0], int(z[-1]) + 1 + zm)
        return ScanRegion((z0, y0, x0), (z1 - z0, y1 - y0, x1 - x0), tuple(int(k) - z0 for k in z))

    def full(self) -> np.ndarray:
        """The mask at full resolution (nearest neighbour), (z, y, x) bool."""
        m = self.coarse
        for axis, b in enumerate(self.block):
            m = np.repeat(m, b, axis=axis)
        return m[: self.shape[0], : self.shape[1], : self.shape[2]]


def segment_lungs(volume: CTVolume, coarse_mm: float = COARSE_MM) -> LungMask:
    """Segment the lungs of ``volume`` on a grid of about ``coarse_mm`` voxels."""
    sx, sy, sz = volume.geometry.spacing
    block = (max(1, int(round(coarse_mm / sz))), max(1, int(round(coarse_mm / sy))), max(1, int(round(coarse_mm / sx))))
    shape = volume.hu.shape
    # every block-th voxel: lung is tens of millimetres wide, so sampling keeps it
    air = volume.hu[::block[0], ::block[1], ::block[2]] < AIR_HU
    labels, n = ndimage.label(air)
    if n == 0:
        return LungMask(np.zeros_like(air), block, shape)
    border = np.unique(np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
                                       labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    sizes = ndimage.sum_labels(air, labels, index=np.arange(1, n + 1))
    sizes[border[border > 0] - 1] = 0
    if sizes.max() == 0:
        return LungMask(np.zeros_like(air), block, shape)
    keep = np.nonzero(sizes >= 0.1 * sizes.max())[0] + 1
    lungs = np.isin(labels, keep)
    lungs = ndimage.binary_closing(lungs, structure=np.ones((1, 3, 3)), iterations=1)
    for k in range(len(lungs)):
        lungs[k] = ndimage.binary_fill_holes(lungs[k])
    return LungMask(lungs, block, shape)
