"""Synthetic nodules pasted into the second stage's training cubes.

A training set of a few dozen scans holds a few dozen nodules: the 3D classifier sees each of them
hundreds of times and learns those nodules rather than what makes a nodule. ``paste_nodule`` draws
a new one for every use — an ellipsoid of 3-20 mm at a random orientation with a lobulated outline,
solid, part-solid or ground glass, with a partial-volume edge and the blur of a thick slice — and
blends it into the cube of one of stage one's false positives near the centre, placed where
nodules are hard to find as often as free: on the chest wall, against a vessel, or free in the
lung (``place``). The nodules are deliberately generic (no outline from a phantom or from LIDC)
so that what the classifier learns from them carries over to other data. ``pasteable`` keeps the
cubes with enough lung near the centre: a nodule is centred on lung, never drawn into the chest
wall, where it would be invisible and teach the classifier that soft tissue is a nodule. The 3D
proposer's training patches take the same nodules (``noduledet.proposer``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from noduledet.data.kinds import LOCATIONS

DIAMETERS_MM = (3.0, 20.0)  # log-uniform between: as many 3-6 mm nodules as 6-12 mm ones
KINDS = {"solid": 0.7, "part-solid": 0.15, "ground-glass": 0.15}
VESSEL_RADII_MM = (1.0, 6.0)  # log-uniform: from the thinnest a candidate sits on to the hilar trunks
LUNG_HU = -500.0  # lung: a cube is pasteable when enough of its centre is below this; nodules are centred on it
DENSE_HU = -300.0  # the chest wall and vessels beside the lung
BROAD = 0.35  # dense over this fraction of the neighbourhood: a wall, not a vessel


def pasteable(cubes: np.ndarray, centre_mm: float, spacing_mm: float, fraction: float = 0.5) -> np.ndarray:
    """(N,) bool: the cubes (N, S, S, S) of HU whose central ``centre_mm`` cube is at least ``fraction`` lung."""
    s = cubes.shape[1]
    half = max(1, int(round(centre_mm / spacing_mm / 2)))
    core = cubes[:, s // 2 - half: s // 2 + half, s // 2 - half: s // 2 + half, s // 2 - half: s // 2 + half]
    return (core < LUNG_HU).reshape(len(cubes), -1).mean(axis=1) >= fraction


def nodule(spacing_mm: float, rng: np.random.Generator, diameter_mm: float | None = None,
           kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A random nodule on an isotropic grid: (occupancy in [0, 1], HU), both (B, B, B) with the
    nodule's centre at the middle voxel. Diameter and kind are drawn unless given."""
    if diameter_mm is None:
        diameter_mm = float(np.exp(rng.uniform(*np.log(DIAMETERS_MM))))
    if kind is None:
        kind = str(rng.choice(list(KINDS), p=list(KINDS.values())))
    radius = diameter_mm / 2 / spacing_mm  # voxels
    half = int(np.ceil(1.5 * radius)) + 2
    r = np.arange(-half, half + 1, dtype=np.float32)
    p = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    axes = rng.uniform(0.75, 1.25, 3)
    dist = np.linalg.norm((p @ q) / (axes / np.cbrt(axes.prod())), axis=-1)  # voxels; ``radius`` on the surface
    unit = p / np.maximum(np.linalg.norm(p, axis=-1, keepdims=True), 1e-6)
    bumps = 1.0  # lobulation: bumps along random directions
    for _ in range(3):
        angle = np.arccos(np.clip(unit @ _direction(rng), -1, 1))
        bumps = bumps + rng.uniform(0, 0.12) * np.cos(rng.integers(2, 5) * angle + rng.uniform(0, 2 * np.pi))
    dist = dist / bumps

    def occupancy(scale: float) -> np.ndarray:  # a one-voxel partial-volume edge
        return np.clip(0.5 + scale * radius - dist, 0, 1).astype(np.float32)

    occ = occupancy(1.0)  # then the size that gives the diameter's volume (LUNA16's definition)
    occ = occupancy(float(np.cbrt(np.pi / 6 * (2 * radius) ** 3 / max(occ.sum(), 1e-3))))
    occ = _blur(occ, rng)
    hu = np.full(occ.shape, rng.uniform(-80, 80) if kind == "solid" else rng.uniform(-700, -350), dtype=np.float32)
    if kind == "part-solid":
        hu[dist < rng.uniform(0.3, 0.6) * radius] = rng.uniform(-60, 60)
    hu += _texture(hu.shape, rng).astype(np.float32)
    return occ, hu


def paste_nodule(cube: np.ndarray, spacing_mm: float, rng: np.random.Generator, offset: float | None = 0.0,
                 where: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``cube`` (S, S, S) of HU with a random ``nodule`` blended in, and where it shows.

    Args:
        offset: the nodule's centre lies up to this many voxels from the cube's centre on each
            axis (None: anywhere its whole box fits in the cube).
        where: ``free`` in the lung, on the ``pleural`` wall or against a ``vascular`` structure
            (``noduledet.data.kinds.LOCATIONS``; drawn when None): the centre is a lung voxel that
            the placement allows (``place``; for a vascular one without a vessel nearby, a
            ``paste_vessel`` first); free when the cube offers no such voxel, and at a point drawn
            within ``offset`` of the centre when it has no lung there at all.

    Returns:
        The cube (float32; where the background is brighter than the nodule, a vessel through a
        ground-glass nodule or the chest wall beside one, the background stays) and the
        (z, y, x, diameter mm) of what shows of the nodule (its centroid and volume), or None when
        nothing shows.
    """
    occ, hu = nodule(spacing_mm, rng)
    half = occ.shape[0] // 2
    radius = float(np.cbrt(6 * occ.sum() / np.pi)) / 2
    where = str(rng.choice(LOCATIONS)) if where is None else where
    centre = place(cube, radius, rng, where, offset, half)
    if centre is None and where == "vascular":  # no vessel there: one is drawn past the point first
        cube = paste_vessel(cube, spacing_mm, rng, offset if offset is not None else 0.0)
        centre = place(cube, radius, rng, where, offset, half)
    if centre is None and where != "free":
        centre = place(cube, radius, rng, "free", offset, half)
    if centre is None:
        spread = offset if offset is not None else (cube.shape[0] - 1) / 2
        centre = np.rint((np.array(cube.shape) - 1) / 2 + rng.uniform(-spread, spread, 3)).astype(int)
    out = cube.astype(np.float32)
    dst, src = [], []
    for c, n in zip(centre, cube.shape):
        lo, hi = max(0, c - half), min(n, c + half + 1)
        dst.append(slice(lo, hi))
        src.append(slice(lo - (c - half), hi - (c - half)))
    before = out[tuple(dst)].copy()
    out[tuple(dst)] = _blend(before, occ[tuple(src)], hu[tuple(src)])
    shows = occ[tuple(src)] * (hu[tuple(src)] > before + 50)  # what the background does not hide
    if shows.sum() < 0.5:
        return out, None
    centroid = (np.indices(shows.shape).reshape(3, -1) * shows.reshape(-1)).sum(axis=1) / shows.sum()
    start = np.array([d.start for d in dst])
    return out, np.array([*(centroid + start), np.cbrt(6 * shows.sum() / np.pi) * spacing_mm])


def place(cube: np.ndarray, radius: float, rng: np.random.Generator, where: str, offset: float | None,
          margin: int = 0) -> np.ndarray | None:
    """A lung voxel (z, y, x) of ``cube`` to centre a nodule of ``radius`` voxels on, drawn at
    random among those that ``where`` allows: ``pleural`` within 0.7 radius of a broad dense area,
    the chest wall (so that the nodule touches it); ``vascular`` within it of a narrow one, a
    vessel (and not the wall); ``free`` further than 1.7 radius (lobulated, a nodule reaches that far) from both. Within ``offset`` voxels of the centre on
    each axis (None: at least ``margin`` from the border). None when no voxel qualifies."""
    n = cube.shape[0]
    lo, hi = ((n - 1) / 2 - offset, (n - 1) / 2 + offset) if offset is not None else (margin, n - 1 - margin)
    lo, hi = max(0, int(np.ceil(lo))), min(n - 1, int(np.floor(hi)))
    if hi < lo:
        return None
    dense = (np.asarray(cube) > DENSE_HU).astype(np.float32)
    wide = max(2, int(round(1.5 * radius)) + 1)
    wall = dense * (ndimage.uniform_filter(dense, size=2 * wide + 1, mode="nearest") > BROAD)

    def within(mask: np.ndarray, r: float) -> np.ndarray:  # voxels with one of ``mask`` within r voxels (each axis)
        return ndimage.maximum_filter(mask, size=2 * int(np.ceil(r)) + 1, mode="constant") > 0

    touching = 0.7 * radius  # from the centre: the nodule's surface reaches past it whatever its shape
    allowed = {"free": lambda: ~within(dense, 1.7 * radius + 1),
               "pleural": lambda: within(wall, touching),
               "vascular": lambda: within(dense - wall, touching) & ~within(wall, 1.7 * radius + 1)}[where]()
    allowed &= np.asarray(cube) < LUNG_HU
    box = allowed[lo:hi + 1, lo:hi + 1, lo:hi + 1]
    spots = np.argwhere(box)
    return spots[rng.integers(len(spots))] + lo if len(spots) else None


def paste_vessel(cube: np.ndarray, spacing_mm: float, rng: np.random.Generator, offset: float = 0.0) -> np.ndarray:
    """``cube`` (S, S, S) of HU with a random vessel blended in through a point up to ``offset``
    voxels from its centre: a tube of 1-6 mm radius across the whole cube, tapering, and on half of
    them a thinner branch leaving it near that point. The confounder that a nodule is told from."""
    s = cube.shape[0]
    r = np.arange(s, dtype=np.float32)
    p = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1) - ((s - 1) / 2 + rng.uniform(-offset, offset, 3))
    radius = float(np.exp(rng.uniform(*np.log(VESSEL_RADII_MM)))) / spacing_mm
    along = _direction(rng)
    occ = _tube(p, along, radius, rng.uniform(-0.3, 0.3) / s)
    if rng.random() < 0.5:
        fork = along * rng.uniform(-radius, radius)
        branch = _tube(p - fork, _direction(rng), radius * rng.uniform(0.5, 0.9), 0.0, one_way=True)
        occ = np.maximum(occ, branch)
    occ = _blur(occ, rng)
    return _blend(cube.astype(np.float32), occ, (rng.uniform(20, 80) + _texture(occ.shape, rng)).astype(np.float32))


def _blur(occ: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random thick slice's blur along z and a scanner's in-plane blur."""
    return ndimage.gaussian_filter(occ, (rng.uniform(0, 0.8), *([rng.uniform(0, 0.4)] * 2)))


def _texture(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Smooth HU noise of a random amplitude (up to 40 HU before smoothing)."""
    return ndimage.gaussian_filter(rng.normal(0, rng.uniform(0, 40), shape), 1.0)


def _blend(background: np.ndarray, occ: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """``hu`` blended into ``background`` by ``occ``; where the background is brighter, it stays."""
    return np.maximum(background, background * (1 - occ) + hu * occ)


def _tube(p: np.ndarray, along: np.ndarray, radius: float, taper: float, one_way: bool = False) -> np.ndarray:
    """Occupancy of a tube through the origin of ``p`` (..., 3) along ``along``, its radius growing
    by ``taper`` of itself per voxel; ``one_way``: only on the side ``along`` points to."""
    t = p @ along
    dist = np.linalg.norm(p - t[..., None] * along, axis=-1)
    occ = np.clip(0.5 + radius * (1 + taper * t) - dist, 0, 1)
    if one_way:
        occ = occ * np.clip(t + 0.5, 0, 1)
    return occ.astype(np.float32)


def _direction(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return (v / np.linalg.norm(v)).astype(np.float32)
