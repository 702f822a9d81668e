"""Classical lung segmentation: threshold, connected components, morphology.

It runs on a coarse copy of the scan (about 3 mm voxels): its uses — skipping slices without
lung and cropping slices to the lung box — need the lungs' extent, not their edge, and at that
resolution every step is a few milliseconds.

Steps: air = HU < -400; drop air connected to the image's in-plane border (outside the body and
the scanner's padding outside the reconstruction circle); keep the air components of at least
10% of the largest (the lungs with the airways; not bowel gas); close small gaps and fill the
holes that vessels and nodules leave, slice by slice. Whether a candidate lies in the lungs is asked
of the mask closed by a rolling ball (``LungMask.contains``), so that a nodule on the pleura, a
notch in the air, counts as inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from noduledet.data.ct import CTVolume

AIR_HU = -400
COARSE_MM = 3.0
BALL_MM = 15.0  # the rolling ball that closes the lungs over nodules on the pleura (up to about 30 mm)
REACH_MM = 6.0  # candidates this close to the closed lungs count as in them


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
    _near: dict = field(default_factory=dict, repr=False, compare=False)  # closed_near's results

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

    def contains(self, points_zyx: np.ndarray, spacing_xyz, reach_mm: float = REACH_MM) -> np.ndarray:
        """(K,) bool: which full-resolution voxel points (K, 3) lie in the lungs closed by a ball of
        ``BALL_MM`` (classical CAD's rolling ball: a nodule on the pleura sits in a notch of the air,
        which the closing fills) or within ``reach_mm`` of them."""
        points = np.asarray(points_zyx, dtype=float).reshape(-1, 3)
        if self.empty:
            return np.zeros(len(points), dtype=bool)
        near = self.closed_near(tuple(float(v) for v in spacing_xyz), reach_mm)
        cell = np.clip((points / np.array(self.block)).astype(int), 0, np.array(near.shape) - 1)
        return near[tuple(cell.T)]

    def closed_near(self, spacing_xyz: tuple[float, float, float], reach_mm: float) -> np.ndarray:
        """The coarse mask closed by a ball of ``BALL_MM``, then dilated by ``reach_mm`` (distance
        transforms in mm on the coarse grid; computed once per mask and reach)."""
        key = (spacing_xyz, reach_mm)
        if key not in self._near:
            sampling = np.array(self.block) * np.array(spacing_xyz[::-1])
            dilated = ndimage.distance_transform_edt(~self.coarse, sampling) <= BALL_MM
            # beyond the volume's edge counts as outside, so the closing does not grow out to it
            closed = ndimage.distance_transform_edt(np.pad(dilated, 1), sampling)[1:-1, 1:-1, 1:-1] > BALL_MM
            self._near[key] = ndimage.distance_transform_edt(~(closed | self.coarse), sampling) <= reach_mm
        return self._near[key]

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
