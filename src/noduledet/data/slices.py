"""2.5D slice samples: channels at fixed physical z offsets, windowed to [0, 1], with boxes.

A sample centred on slice k stacks the planes at world z offsets ``offsets_mm`` around it
(default -5, 0, +5 mm), interpolated linearly between slices, so a 0.625 mm and a 2.5 mm scan
show the model the same anatomy. Channel order follows world z (inferior to superior) whatever
the sign of the scan's z direction. In-plane, every sample is resampled to one working pixel
spacing (``resample``), so a nodule is the same number of pixels on every scanner.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from noduledet.boxes import clip_boxes, shift_boxes, sphere_box, sphere_section
from noduledet.geometry import Geometry

OFFSETS_MM = (-5.0, 0.0, 5.0)
WINDOW_HU = (-1000.0, 400.0)  # lung parenchyma to soft tissue; bone saturates


def window(hu: np.ndarray, lo: float = WINDOW_HU[0], hi: float = WINDOW_HU[1]) -> np.ndarray:
    """Map HU to [0, 1] float32: ``lo`` -> 0, ``hi`` -> 1, clipped."""
    out = (np.asarray(hu, dtype=np.float32) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def working_shape(shape_hw, spacing_xy, pixel_mm: float) -> tuple[int, int]:
    """(h, w) of an (H, W) region resampled to ``pixel_mm`` pixels (0: kept as it is)."""
    h, w = int(shape_hw[0]), int(shape_hw[1])
    if not pixel_mm:
        return h, w
    return max(1, int(round(h * spacing_xy[1] / pixel_mm))), max(1, int(round(w * spacing_xy[0] / pixel_mm)))


def resample(image, size_hw: tuple[int, int]) -> torch.Tensor:
    """A (C, H, W) image resampled bilinearly (anti-aliased when it shrinks) to ``size_hw``.

    Pixel edges map onto pixel edges (``align_corners=False``), so a box in the source frame is
    the resampled frame's box times (w / W, h / H): ``boxes.scale_boxes``.
    """
    t = torch.as_tensor(image, dtype=torch.float32)
    if tuple(t.shape[-2:]) == tuple(size_hw):
        return t
    return F.interpolate(t[None], size=tuple(size_hw), mode="bilinear", align_corners=False, antialias=True)[0]


def resample_masks(masks, size_hw: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) binary masks resampled to ``size_hw`` (nearest), uint8."""
    t = torch.as_tensor(masks, dtype=torch.uint8)
    if tuple(t.shape[-2:]) == tuple(size_hw) or len(t) == 0:
        return t.reshape(len(t), *size_hw) if len(t) == 0 else t
    return F.interpolate(t[None].float(), size=tuple(size_hw), mode="nearest")[0].to(torch.uint8)


def sample_planes(hu: np.ndarray, z: int, offsets_mm, geometry: Geometry,
                  rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
    """HU planes at world offsets around slice ``z``, linearly interpolated, (C, H, W) float32.

    Args:
        hu: (Z, Y, X) volume (an array or a memory map; only the needed slices are read).
        z: centre slice index.
        offsets_mm: world z offsets of the channels.
        geometry: the volume's geometry (for slice spacing and z direction).
        rows, cols: the part of each plane to return.
    """
    step = geometry.z_index_per_mm
    nz = hu.shape[0]
    planes = []
    for off in offsets_mm:
        zf = min(max(z + off * step, 0.0), nz - 1.0)
        k0 = int(np.floor(zf))
        w = zf - k0
        plane = hu[k0, rows, cols].astype(np.float32)
        if w > 1e-6 and k0 + 1 < nz:
            plane = plane * (1 - w) + hu[k0 + 1, rows, cols].astype(np.float32) * w
        planes.append(plane)
    return np.stack(planes)


@dataclass
class Nodule:
    """A nodule of one scan in that scan's voxel frame (of a crop, once cropped).

    Attributes:
        center_zyx: continuous voxel centre.
        diameter_mm: volume-equivalent diameter.
        mask: optional (z0, y0, x0, bool (z, y, x) patch): the LIDC consensus outline.
    """

    center_zyx: np.ndarray
    diameter_mm: float
    mask: tuple[int, int, int, np.ndarray] | None = None

    def box(self, z: int, spacing_xyz, min_section: float = 0.5) -> list[float] | None:
        """Pixel box on slice ``z``: the outline's if it has one there, else the sphere's."""
        if self.mask is not None:
            z0, y0, x0, m = self.mask
            if 0 <= z - z0 < len(m) and m[z - z0].any():
                ys, xs = np.nonzero(m[z - z0])
                return [x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1.0, y0 + ys.max() + 1.0]
            return None
        return sphere_box(self.center_zyx, self.diameter_mm / 2, z, spacing_xyz, min_section)

    def raster(self, z: int, rows: slice, cols: slice, spacing_xyz, min_section: float = 0.5) -> np.ndarray | None:
        """(H, W) uint8 mask of the region ``rows`` x ``cols`` of slice ``z``: the outline, or
        the sphere's disc; None where the nodule is absent (or only its cap is cut)."""
        h, w = rows.stop - rows.start, cols.stop - cols.start
        out = np.zeros((h, w), dtype=np.uint8)
        if self.mask is not None:
            z0, y0, x0, m = self.mask
            if not (0 <= z - z0 < len(m) and m[z - z0].any()):
                return None
            ys, xs = np.nonzero(m[z - z0])
            ys, xs = ys + y0 - rows.start, xs + x0 - cols.start
            keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
            out[ys[keep], xs[keep]] = 1
            return out
        cut = sphere_section(self.center_zyx, self.diameter_mm / 2, z, spacing_xyz, min_section)
        if cut is None:
            return None
        (px, py), r = cut
        yy = (np.arange(rows.start, rows.stop) + 0.5 - py) * spacing_xyz[1]  # pixel centres, mm from the circle's
        xx = (np.arange(cols.start, cols.stop) + 0.5 - px) * spacing_xyz[0]
        out[(yy[:, None] ** 2 + xx[None, :] ** 2) <= r * r] = 1
        if not out.any():  # a disc narrower than a pixel: its centre pixel
            out[int(np.clip(np.floor(py) - rows.start, 0, h - 1)), int(np.clip(np.floor(px) - cols.start, 0, w - 1))] = 1
        return out


def slice_targets(nodules: list[Nodule], z: int, spacing_xyz, rows: slice, cols: slice,
                  masks: bool = False, min_section: float = 0.5) -> dict[str, np.ndarray]:
    """Boxes (N, 4) (and masks (N, H, W)) of the nodules on slice ``z``, in the frame of the
    region ``rows`` x ``cols`` (slices with explicit start and stop)."""
    h, w = rows.stop - rows.start, cols.stop - cols.start
    boxes, kept = [], []
    for n in nodules:
        b = n.box(z, spacing_xyz, min_section)
        if b is not None:
            boxes.append(b)
            kept.append(n)
    boxes_arr, keep = clip_boxes(shift_boxes(boxes, -cols.start, -rows.start), h, w)
    out = {"boxes": boxes_arr}
    if masks:
        ms = [n.raster(z, rows, cols, spacing_xyz, min_section) for n, ok in zip(kept, keep) if ok]
        out["masks"] = np.array([m if m is not None else np.zeros((h, w), np.uint8) for m in ms],
                                dtype=np.uint8).reshape(-1, h, w)
    return out
