"""A second, untrained source of candidates for stage two: round bright spots in the lungs.

Stage one is a 2D detector trained on a few dozen scans; what it has not learnt (small nodules,
other scanners' textures) it never proposes, and stage two can only rescore what it is shown.
A 3D blob filter needs no training and answers to shape alone, so it proposes the same spots on
any scan:

1. the scan region is resampled to ``grid_mm`` isotropic voxels, HU clipped to [-1000, 150]
   (bone and contrast count as soft tissue, so they do not outshine nodules);
2. a difference of Gaussians over ``SIGMAS_MM`` (radius about sigma times sqrt(3), so 1.7-14 mm)
   finds bright spots at every scale: the local maxima of each scale's response, each placed
   between grid points by the parabola through it and its neighbours on each axis (a 3 mm
   nodule is hit only within 1.5 mm of its centre, and a grid point can be 0.9 mm off it), then
   mapped back to the scan's voxels (``data.patches.isotropic_grid``);
3. at each maximum, the Hessian of that scale tells a blob (three strongly negative eigenvalues)
   from a vessel (one eigenvalue near zero, along the vessel) or a wall (two near zero); the
   score is the scale-normalised eigenvalue closest to zero, the "dot" measure of Li et al.,
   Med. Phys. 2003, so tubes and plates score about nothing however bright they are;
4. maxima outside the lungs (the coarse mask of ``noduledet.data.lung``, closed by a rolling ball
   and dilated by 6 mm so that nodules on the pleura stay in: ``LungMask.contains``) are dropped,
   and of spots closer together than the larger one's radius the stronger is kept.

On a 512x512x300 scan this takes a few seconds (docs/benchmarks.md). The spots join stage one's
candidates before stage two; their own stage-one probability is 0.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from noduledet.candidates import Candidate
from noduledet.data.ct import CTVolume
from noduledet.data.lung import LungMask, segment_lungs
from noduledet.data.patches import isotropic_grid
from noduledet.geometry import Geometry

SIGMAS_MM = (1.0, 1.4, 2.0, 2.8, 4.0, 5.6, 8.0)  # each 1.4 times the last
MIN_RESPONSE_HU = 20.0  # a difference-of-Gaussians peak weaker than this is texture
REACH_MM = 2.5  # two spots closer than this (or than the larger radius) are one


def _hessian_dot(smooth: np.ndarray, points: np.ndarray, sigma: float) -> np.ndarray:
    """Scale-normalised Hessian eigenvalue closest to zero, negated, at ``points`` (K, 3) of a
    smoothed grid (clipped at 0: not a bright blob). Central differences, one voxel apart."""
    z, y, x = points.T

    def at(dz: int, dy: int, dx: int) -> np.ndarray:
        return smooth[z + dz, y + dy, x + dx].astype(np.float64)

    c = at(0, 0, 0)
    h = np.empty((len(points), 3, 3))
    h[:, 0, 0] = at(1, 0, 0) - 2 * c + at(-1, 0, 0)
    h[:, 1, 1] = at(0, 1, 0) - 2 * c + at(0, -1, 0)
    h[:, 2, 2] = at(0, 0, 1) - 2 * c + at(0, 0, -1)
    h[:, 0, 1] = h[:, 1, 0] = (at(1, 1, 0) - at(1, -1, 0) - at(-1, 1, 0) + at(-1, -1, 0)) / 4
    h[:, 0, 2] = h[:, 2, 0] = (at(1, 0, 1) - at(1, 0, -1) - at(-1, 0, 1) + at(-1, 0, -1)) / 4
    h[:, 1, 2] = h[:, 2, 1] = (at(0, 1, 1) - at(0, 1, -1) - at(0, -1, 1) + at(0, -1, -1)) / 4
    closest_to_zero = np.linalg.eigvalsh(h)[:, 2]
    return np.maximum(0.0, -closest_to_zero) * sigma ** 2


def _peak_offsets(response: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Sub-voxel position of each local maximum (K, 3) of ``response``: per axis, the top of the
    parabola through the maximum and its two neighbours (within half a voxel)."""
    centre = response[tuple(points.T)].astype(np.float64)
    out = np.zeros(points.shape)
    for axis, step in enumerate(np.eye(3, dtype=int)):
        before = response[tuple((points - step).T)].astype(np.float64)
        after = response[tuple((points + step).T)].astype(np.float64)
        curvature = before - 2 * centre + after
        with np.errstate(divide="ignore", invalid="ignore"):
            out[:, axis] = np.where(curvature < 0, 0.5 * (before - after) / curvature, 0.0)
    return np.clip(out, -0.5, 0.5)


def _maximum_3x3x3(volume: np.ndarray) -> np.ndarray:
    """``ndimage.maximum_filter(volume, size=3)``: each voxel's maximum over its 3x3x3
    neighbourhood (the volume's edge repeats), one axis at a time by shifted ``np.maximum``; the
    same values, 2.7 times faster than scipy's filter (benchmarks/bench_training.py; 0.27 -> 0.07 s
    on a demo scan's response)."""
    out = volume
    for axis in range(volume.ndim):
        before = tuple(slice(None, -1) if a == axis else slice(None) for a in range(volume.ndim))
        after = tuple(slice(1, None) if a == axis else slice(None) for a in range(volume.ndim))
        wider = out.copy()
        np.maximum(wider[after], out[before], out=wider[after])
        np.maximum(wider[before], out[after], out=wider[before])
        out = wider
    return out


def blob_points(hu: np.ndarray, spacing_zyx, grid_mm: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blob centres of a volume as continuous voxel indices of ``hu`` (K, 3), their scores and
    radii in mm, strongest first (steps 1-3 of the module docstring; no lung mask, no merging)."""
    grid, to_voxel = isotropic_grid(np.clip(np.asarray(hu, dtype=np.float32), -1000, 150), spacing_zyx, grid_mm)
    ratio = SIGMAS_MM[1] / SIGMAS_MM[0]
    points, scores, radii = [], [], []

    def blur(sigma: float) -> np.ndarray:
        return ndimage.gaussian_filter(grid, sigma / grid_mm, mode="nearest", truncate=3.0)

    # scipy's filters use one core and release the GIL: the next two scales are blurred on two
    # more threads while this one's maxima are found (the same numbers; the blurs are most of the work)
    with ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(blur, sigma) for sigma in SIGMAS_MM[:3]]
        finer = pending.pop(0).result()
        for k, sigma in enumerate(SIGMAS_MM[:-1]):
            coarser = pending.pop(0).result()
            if k + 3 < len(SIGMAS_MM):
                pending.append(pool.submit(blur, SIGMAS_MM[k + 3]))
            response = (finer - coarser) / (ratio - 1)
            peaks = (response == _maximum_3x3x3(response)) & (response > MIN_RESPONSE_HU)
            peaks[[0, -1]] = peaks[:, [0, -1]] = peaks[:, :, [0, -1]] = False  # room for the differences
            at = np.argwhere(peaks)
            if len(at):
                points.append(at + _peak_offsets(response, at))
                scores.append(_hessian_dot(finer, at, sigma / grid_mm))
                radii.append(np.full(len(at), sigma * np.sqrt(3)))
            finer = coarser
    if not points:
        return np.zeros((0, 3)), np.zeros(0), np.zeros(0)
    at, score, radius = np.concatenate(points), np.concatenate(scores), np.concatenate(radii)
    keep = score > 0
    order = np.argsort(-score[keep], kind="stable")
    return at[keep][order] * to_voxel, score[keep][order], radius[keep][order]


def suppress(world: np.ndarray, radius: np.ndarray, count: int) -> list[int]:
    """Indices of up to ``count`` of the points (strongest first), skipping any closer to a kept
    one than the larger of the two radii (and than ``REACH_MM``)."""
    kept: list[int] = []
    for i in range(len(world)):
        if len(kept) >= count:
            break
        d = np.linalg.norm(world[kept] - world[i], axis=1)
        if (d < np.maximum(np.maximum(radius[kept], radius[i]), REACH_MM)).any():
            continue
        kept.append(i)
    return kept


def find_blobs(hu: np.ndarray, geometry: Geometry, count: int, lungs: LungMask | None = None,
               grid_mm: float = 1.0) -> list[Candidate]:
    """Up to ``count`` blob candidates in the lungs of a scan region (``lungs``: its mask, when
    already made), strongest first. Voxel indices in the region's frame."""
    if count <= 0:
        return []
    hu = np.asarray(hu)
    lungs = lungs if lungs is not None else segment_lungs(CTVolume(hu, geometry))
    if lungs.empty:
        return []
    sx, sy, sz = geometry.spacing
    at, score, radius = blob_points(hu, (sz, sy, sx), grid_mm)
    inside = lungs.contains(at, geometry.spacing)
    at, score, radius = at[inside], score[inside], radius[inside]
    world = geometry.voxel_to_world(at).reshape(-1, 3)
    out = []
    for i in suppress(world, radius, count):
        half = int(np.ceil(radius[i] / sz))
        z = int(round(at[i][0]))
        out.append(Candidate(at[i], world[i], 0.0, float(2 * radius[i]), 0, (z - half, z + half), [], sources=("blobs",)))
    return out
