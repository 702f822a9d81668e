"""A generated chest-CT dataset in the LUNA16 layout, so that everything runs with no download.

Each scan is built in world millimetres and sampled on its own grid (so a scan with a flipped
direction shows the same anatomy at the same world coordinates) at LUNA16's resolution: 512 px
at 0.5-0.95 mm, slices of 0.625-2.5 mm. Real Hounsfield units: air -1000, lung parenchyma
-900..-800 (denser posteriorly, with a texture), fat -100, muscle and blood 25-60, cancellous
bone 250 and cortical bone 700, a patient table under the body, and, inside the lungs,
branching vessel trees (the true confounder of a 2D nodule detector: a vessel crossing the slice
looks like a nodule) and bronchi (a wall around air). Nodules of 3-30 mm, most of them small as
in LUNA16, are solid, part-solid or ground-glass, some touching the pleura (juxtapleural) or a
vessel (juxtavascular), shaped like real LIDC-IDRI consensus contours or as ellipsoids and
lobulated clusters; a nodule is drawn inside the lung only, so one touching the pleura ends
there. Scanner blur, correlated noise and a circular reconstruction field finish the image; how
much of each, the parenchyma, the vessels and the airways vary per scan (``Style``), so a
detector trained here meets more than one scanner.

Annotations are exact, with LUNA16's definitions: centre = centroid of the nodule as drawn,
``diameter_mm`` = volume-equivalent sphere diameter. Nodules under 3 mm and non-nodule findings
go to ``annotations_excluded.csv`` (diameter -1 for the latter), as in LUNA16. Each nodule's
location (free, pleural, vascular: about 60/20/20%) and texture (solid, part-solid, ground glass:
70/15/15%) go to ``annotations_kinds.csv`` (``noduledet.data.kinds``).

These scans are phantoms: numbers measured on them say that the software works, not how it
would perform on patients.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from noduledet.data.ct import CTVolume, write_ct
from noduledet.data.kinds import KINDS_CSV, write_kinds
from noduledet.data.luna16 import Findings, write_findings
from noduledet.errors import UserError
from noduledet.geometry import Geometry
from noduledet.progress import track
from noduledet.staging import staged_dir

PHANTOM_VERSION = 1
UID_ROOT = "1.2.826.0.1.3680043.8.498"  # pydicom's UID root; the rest is the seed and the scan number
SLICE_SPACINGS = (0.625, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5)  # LUNA16: 0.45-2.5 mm, most 0.625-1.25
SLICE_WEIGHTS = (0.2, 0.1, 0.1, 0.15, 0.2, 0.05, 0.1, 0.1)
KINDS = ("solid", "part-solid", "ground-glass")


@dataclass
class Shape:
    """A nodule outline from LIDC: (z, y, x) bool mask and its voxel size (z, y, x) mm."""

    mask: np.ndarray
    spacing: tuple[float, float, float]


@lru_cache(maxsize=2)
def shape_library(count: int = 40, min_diameter_mm: float = 8.0) -> tuple[Shape, ...]:
    """Consensus masks of ``count`` LIDC nodules (>= 3 readers) from thin-slice scans."""
    from noduledet.data.lidc import LidcDatabase
    from noduledet.data.luna16 import REFERENCE, read_uid_list

    uids = read_uid_list(REFERENCE / "luna16_seriesuids.csv")
    shapes: list[Shape] = []
    for start in range(0, len(uids), 100):
        db = LidcDatabase(uids=uids[start:start + 100])
        for scan in sorted(db.scans.values(), key=lambda s: s.series_uid):
            if scan.z_step > 1.25:
                continue
            for nod in db.nodules(scan):
                if nod.readers >= 3 and nod.diameter_mm >= min_diameter_mm:
                    mask, spacing = nod.consensus_volume()
                    if mask.sum() >= 50:
                        shapes.append(Shape(mask, spacing))
                if len(shapes) >= count:
                    return tuple(shapes)
    return tuple(shapes)


@dataclass
class PhantomNodule:
    center_xyz: np.ndarray  # world mm, centroid of the drawn nodule
    diameter_mm: float  # volume-equivalent
    kind: str  # texture: solid, part-solid or ground-glass
    location: str  # free, pleural or vascular (noduledet.data.kinds)


@dataclass
class PhantomScan:
    uid: str
    volume: CTVolume
    nodules: list[PhantomNodule]
    excluded: list[tuple[np.ndarray, float]]  # (world centre, diameter or -1)


class Anatomy:
    """The analytic body of one patient, evaluated on axial planes of world z."""

    def __init__(self, rng: np.random.Generator, z_top: float, height_mm: float, max_half_width: float = 200.0,
                 lung_hu: float = -860.0):
        s = min(rng.uniform(0.82, 1.08), max_half_width / 160)  # patient size; the lungs stay in the field of view
        self.a, self.b = 160 * s, 112 * s * rng.uniform(0.92, 1.05)  # body semi-axes x, y (mm)
        self.fat = rng.uniform(8, 22)
        self.wall = rng.uniform(10, 16)
        self.cx, self.cy = rng.uniform(-10, 10), rng.uniform(-15, 5)
        self.z_top, self.height = z_top, height_mm  # lung apex, apex-to-base distance
        self.lung_top = 0.96
        self.base = {+1: rng.uniform(0.10, 0.16), -1: rng.uniform(0.14, 0.22)}  # by side (+x = patient's left)
        self.rib_period = rng.uniform(22, 30)
        self.rib_phase = rng.uniform(0, 1)
        self.lung_hu = lung_hu
        self.fov_pad = rng.choice([-1024, -2000, -3024])

    def t(self, z: np.ndarray) -> np.ndarray:
        """Relative height: 1 at the lung apex, 0 at the lowest base."""
        return 1 - (self.z_top - z) / self.height

    def lung_ellipse(self, side: int, t: float) -> tuple[float, float, float, float] | None:
        """(centre x, centre y, semi-axis x, semi-axis y) of one lung at height t, or None."""
        lo = self.base[side]
        if not lo < t < self.lung_top:
            return None
        u = (t - lo) / (self.lung_top - lo)
        grow = np.sqrt(np.sin(np.pi * min(1.0, 0.35 + 0.65 * u))) * (1 - 0.55 * max(0.0, u - 0.6) / 0.4)
        ax = (self.a - self.fat - self.wall) * 0.46 * grow
        ay = (self.b - self.fat - self.wall) * 0.86 * grow
        return self.cx + side * (self.a * 0.44), self.cy + 5, ax, ay

    def lung_depth(self, x: np.ndarray, y: np.ndarray, t: float) -> np.ndarray:
        """Approximate depth (mm) of points inside the lungs at height t; negative outside."""
        depth = np.full(np.broadcast(x, y).shape, -1e3)
        for side in (-1, 1):
            e = self.lung_ellipse(side, t)
            if e is None:
                continue
            ex, ey, ax, ay = e
            rho = np.sqrt(((x - ex) / ax) ** 2 + ((y - ey) / ay) ** 2)
            d = (1 - rho) * min(ax, ay)
            dome = self.dome(side, t)
            if dome is not None:  # the diaphragm dome pushes up into the base: a crescent
                dx, dy, dax, day = dome
                rho_d = np.sqrt(((x - dx) / dax) ** 2 + ((y - dy) / day) ** 2)
                d = np.minimum(d, (rho_d - 1) * min(dax, day))
            heart = self.heart(t)
            if heart is not None:
                hx, hy, hax, hay = heart
                rho_h = np.sqrt(((x - hx) / hax) ** 2 + ((y - hy) / hay) ** 2)
                d = np.minimum(d, (rho_h - 1) * min(hax, hay))
            depth = np.maximum(depth, d)
        return depth

    def dome(self, side: int, t: float):
        lo = self.base[side]
        top = lo + 0.18
        e = self.lung_ellipse(side, t)
        if e is None or t >= top:
            return None
        f = (top - t) / (top - lo)
        ex, ey, ax, ay = e
        return ex + side * 0.15 * ax, ey - 0.1 * ay, ax * 0.95 * f ** 0.5, ay * 0.9 * f ** 0.5

    def heart(self, t: float):
        if not 0.12 < t < 0.62:
            return None
        h = np.sin(np.pi * (t - 0.12) / 0.5)
        return self.cx + 18, self.cy - 25, 62 * h + 5, 48 * h + 5

    def slice_hu(self, x: np.ndarray, y: np.ndarray, z: float, texture) -> tuple[np.ndarray, np.ndarray]:
        """HU of one axial plane without vessels and nodules, and its lung mask.

        Args:
            x: (1, W) and y: (H, 1) float32 world mm of the plane's columns and rows.
            texture: callable (rows, cols) -> lung texture (HU) on that part of the plane.

        Every structure is drawn inside its own bounding box: a full-plane expression per
        structure would cost most of the phantom's time.
        """
        t = float(self.t(np.asarray(z)))
        hu = np.full((y.shape[0], x.shape[1]), -1000.0, dtype=np.float32)
        lung = np.zeros(hu.shape, dtype=bool)
        taper = 1 - 0.12 * max(0.0, t - 0.7) / 0.3
        a, b = self.a * taper, self.b * taper
        _fill_ellipse(hu, x, y, self.cx, self.cy, a, b, -100)  # subcutaneous fat
        _fill_ellipse(hu, x, y, self.cx, self.cy, a - self.fat, b - self.fat, 42)  # muscle
        inner = (a - self.fat - self.wall, b - self.fat - self.wall)
        _fill_ellipse(hu, x, y, self.cx, self.cy, *inner, 20)  # mediastinum; abdomen below the lungs
        if t < 0.25:  # liver under the right dome (patient's right is -x in LPS)
            _fill_ellipse(hu, x, y, self.cx - 0.25 * a, self.cy - 0.05 * b, 0.5 * a, 0.65 * b, 58)
        if t > 0.1:
            self._ribs(hu, x, y, z, a, b)
        # spine: vertebral body (cortex, cancellous bone) and canal, posterior (+y in LPS)
        vy = self.cy + b - self.fat - self.wall - 28
        _fill_ellipse(hu, x, y, self.cx, vy, 19, 19, 700)
        _fill_ellipse(hu, x, y, self.cx, vy, 16, 16, 240)
        _fill_ellipse(hu, x, y, self.cx, vy + 24, 8, 8, 25)
        # lungs, denser posteriorly (dependent lung)
        for side in (-1, 1):
            e = self.lung_ellipse(side, t)
            if e is None:
                continue
            rows = _index_range(y[:, 0], e[1] - e[3], e[1] + e[3])
            cols = _index_range(x[0], e[0] - e[2], e[0] + e[2])
            inside = self.lung_depth(x[:, cols], y[rows], t) > 0
            values = self.lung_hu + 40 * (y[rows] - self.cy) / b + texture(rows, cols)
            view = hu[rows, cols]
            view[inside] = values[inside]
            lung[rows, cols] |= inside
        heart = self.heart(t)
        if heart is not None:
            _fill_ellipse(hu, x, y, *heart, 40)
        if 0.3 < t < 0.85:  # descending aorta beside the spine
            _fill_ellipse(hu, x, y, self.cx + 22, vy - 30, 12, 12, 45)
        if t > 0.62:  # trachea: air in a soft-tissue wall
            _fill_ellipse(hu, x, y, self.cx, self.cy - 5, 11, 11, 30)
            _fill_ellipse(hu, x, y, self.cx, self.cy - 5, 9, 9, -990)
        # the table under the patient: a curved shell over foam
        rows = _index_range(y[:, 0], self.cy + self.b + 15, self.cy + self.b + 60)
        curve = self.cy + self.b + 18 + 0.0006 * (x - self.cx) ** 2
        yy = y[rows]
        view = hu[rows]
        view[(yy > curve) & (yy < curve + 4)] = 300
        view[(yy >= curve + 4) & (yy < curve + 20)] = -150
        return hu, lung & (hu < -600)

    def _ribs(self, hu, x, y, z, a, b) -> None:
        """Oblique rib crossings in a ring inside the chest wall, none at the sternum."""
        ra, rb = a - self.fat - 0.5 * self.wall, b - self.fat - 0.5 * self.wall
        rows = _index_range(y[:, 0], self.cy - rb * 1.08, self.cy + rb * 1.08)
        cols = _index_range(x[0], self.cx - ra * 1.08, self.cx + ra * 1.08)
        dx, dy = x[:, cols] - self.cx, y[rows] - self.cy
        ring = np.abs(np.sqrt((dx / ra) ** 2 + (dy / rb) ** 2) - 1)
        r, c = np.nonzero(ring < 0.035)
        theta = np.arctan2(dy[r, 0], dx[0, c])
        wave = np.cos(2 * np.pi * (z / self.rib_period + self.rib_phase) + 7 * theta)
        bone = (wave > 0.72) & (np.abs(theta + np.pi / 2) > 0.35)
        view = hu[rows, cols]
        view[r[bone], c[bone]] = np.where(ring[r[bone], c[bone]] < 0.018, 260, 600)


def _fill_ellipse(hu: np.ndarray, x: np.ndarray, y: np.ndarray, cx: float, cy: float,
                  ax: float, ay: float, value: float) -> None:
    """Set ``value`` inside an axis-aligned ellipse, evaluated in its bounding box only."""
    rows = _index_range(y[:, 0], cy - ay, cy + ay)
    cols = _index_range(x[0], cx - ax, cx + ax)
    inside = ((x[:, cols] - cx) / ax) ** 2 + ((y[rows] - cy) / ay) ** 2 <= 1
    hu[rows, cols][inside] = value


def _vessel_tree(anatomy: Anatomy, rng: np.random.Generator, side: int, trunk_mm: float = 4.5,
                 end_mm: float = 0.8, max_generation: int = 10) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Segments (start, end, radius) of one lung's vessel tree in world mm.

    Eight trunks of radius up to ``trunk_mm`` leave the hilum (up, down, forward, back, ...); every segment
    forks in two, each child thinner and shorter and turned at random, and a child is kept only
    if it ends inside the lung, so the tree fills the lung out to the pleura with vessels down to
    radius ``end_mm`` (the airways branch the same way beside the vessels: ``_draw_airways``).
    """
    z_hilum = anatomy.z_top - anatomy.height * 0.48
    e = anatomy.lung_ellipse(side, float(anatomy.t(np.asarray(z_hilum))))
    hilum = np.array([e[0] - side * 0.92 * e[2], e[1], z_hilum])  # at the mediastinal border

    def inside(point: np.ndarray, margin: float) -> bool:
        t = float(anatomy.t(np.asarray(point[2])))
        return 0 < t < 1 and float(anatomy.lung_depth(np.asarray(point[0]), np.asarray(point[1]), t)) > margin

    trunks = [(0.3 * side, 0, 1), (0.3 * side, 0, -1), (side, -0.7, 0), (side, 0.7, 0),
              (side, 0, 0.8), (side, 0, -0.8), (0.5 * side, -0.7, 0.6), (0.5 * side, 0.7, -0.6)]
    stack = [(hilum, np.array(d, dtype=float), trunk_mm * rng.uniform(0.8, 1.0), 30.0, 0) for d in trunks]
    segments = []
    while stack:
        p, d, r, length, gen = stack.pop()
        for _ in range(6):
            direction = d + rng.normal(0, 0.35, 3)
            direction /= np.linalg.norm(direction)
            end = p + direction * length
            if inside(end, r + 1):
                break
        else:
            continue  # no room left: the branch ends here
        segments.append((p, end, r))
        if r < end_mm or gen >= max_generation:
            continue
        turn = np.cross(direction, rng.normal(0, 1, 3))
        turn /= np.linalg.norm(turn) + 1e-9
        for sign in (-1, 1):
            stack.append((end, direction + sign * 0.55 * turn, r * rng.uniform(0.76, 0.86),
                          length * rng.uniform(0.74, 0.86), gen + 1))
    return segments


def _world_axes(g: Geometry):
    """World coordinate of every index along x, y, z of an identity-direction grid."""
    nz, ny, nx = g.shape
    return tuple(o + s * np.arange(n) for o, s, n in zip(g.origin, g.spacing, (nx, ny, nz)))


def _index_range(axis: np.ndarray, lo: float, hi: float) -> slice:
    idx = np.nonzero((axis >= lo) & (axis <= hi))[0]
    return slice(int(idx.min()), int(idx.max()) + 1) if len(idx) else slice(0, 0)


def _capsule(axes, p: np.ndarray, q: np.ndarray, r: float, pixel: float):
    """Partial-volume occupancy of a capsule from p to q of radius r (world mm).

    Returns (the (z, y, x) slices of the volume it touches, occupancy there), or None."""
    xs, ys, zs = axes
    lo, hi = np.minimum(p, q) - r - pixel, np.maximum(p, q) + r + pixel
    sx, sy, sz = _index_range(xs, lo[0], hi[0]), _index_range(ys, lo[1], hi[1]), _index_range(zs, lo[2], hi[2])
    if sx.stop == sx.start or sy.stop == sy.start or sz.stop == sz.start:
        return None
    X, Y, Z = xs[sx][None, None, :], ys[sy][None, :, None], zs[sz][:, None, None]
    v = q - p
    u = np.clip(((X - p[0]) * v[0] + (Y - p[1]) * v[1] + (Z - p[2]) * v[2]) / (float(v @ v) + 1e-9), 0, 1)
    dist = np.sqrt((X - p[0] - u * v[0]) ** 2 + (Y - p[1] - u * v[1]) ** 2 + (Z - p[2] - u * v[2]) ** 2)
    return (sz, sy, sx), np.clip((r - dist) / pixel + 0.5, 0, 1).astype(np.float32)


def _resample_shape(shape: Shape, diameter_mm: float, spacing_zyx, rng: np.random.Generator) -> np.ndarray:
    """The shape scaled to ``diameter_mm`` (volume-equivalent), randomly flipped/turned, as
    partial-volume occupancy on a grid of ``spacing_zyx`` (2x supersampled, then averaged)."""
    mask = shape.mask
    if rng.random() < 0.5:
        mask = mask[:, :, ::-1]
    if rng.random() < 0.5:
        mask = mask[:, ::-1, :]
    if rng.random() < 0.5:
        mask = mask.transpose(0, 2, 1)
    vox = float(np.prod(shape.spacing))
    d0 = (6 * mask.sum() * vox / np.pi) ** (1 / 3)
    scale = diameter_mm / d0
    zoom = [s * scale / (t / 2) for s, t in zip(shape.spacing, spacing_zyx)]
    fine = ndimage.zoom(np.pad(mask, 1).astype(np.float32), zoom, order=1) >= 0.5
    pad = [(0, (-n) % 2) for n in fine.shape]
    fine = np.pad(fine, pad)
    z, y, x = (n // 2 for n in fine.shape)
    return fine.reshape(z, 2, y, 2, x, 2).mean(axis=(1, 3, 5)).astype(np.float32)


def _nodule_hu(kind: str, occ: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if kind == "solid":
        return np.full(occ.shape, rng.uniform(-20, 60), dtype=np.float32)
    ggo = np.full(occ.shape, rng.uniform(-680, -380), dtype=np.float32)
    if kind == "part-solid":
        depth = ndimage.distance_transform_edt(occ >= 0.5)
        core = depth >= 0.6 * max(depth.max(), 1)
        ggo[core] = rng.uniform(-10, 50)
    return ggo


def _place(anatomy: Anatomy, rng: np.random.Generator, radius: float, juxtapleural: bool,
           taken: list[tuple[np.ndarray, float]], z_lo: float, z_hi: float) -> np.ndarray | None:
    """A world centre inside a lung for a nodule of ``radius`` (touching the pleura if asked)."""
    for _ in range(400):
        z = rng.uniform(z_lo + radius + 3, z_hi - radius - 3)
        t = float(anatomy.t(np.asarray(z)))
        side = rng.choice([-1, 1])
        e = anatomy.lung_ellipse(side, t)
        if e is None:
            continue
        ang, rad = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1))
        x, y = e[0] + rad * e[2] * np.cos(ang), e[1] + rad * e[3] * np.sin(ang)
        depths = [float(anatomy.lung_depth(np.asarray(x), np.asarray(y), float(anatomy.t(np.asarray(zz)))))
                  for zz in (z - 0.6 * radius, z, z + 0.6 * radius)]
        d = depths[1]
        ok = (radius * 0.3 < d < radius * 0.9 and min(depths) > 0) if juxtapleural else min(depths) > radius + 4
        if ok and all(np.linalg.norm(np.array([x, y, z]) - c) > radius + r + 8 for c, r in taken):
            return np.array([x, y, z])
    return None


@dataclass(frozen=True)
class Style:
    """What varies between scanners, reconstructions and patients, drawn once per scan."""

    noise_hu: float  # standard deviation of the image noise
    noise_px: float  # its correlation length (Gaussian sigma, pixels)
    blur_px: float  # the scanner's point spread (Gaussian sigma, pixels)
    lung_hu: float  # parenchyma density
    texture_hu: float  # amplitude of the parenchyma's texture
    vessel_hu: float  # blood
    vessel_trunk_mm: float  # radius of the trunks at the hilum ...
    vessel_end_mm: float  # ... and of the thinnest vessels drawn
    airways: bool  # bronchi with walls and air inside


def draw_style(rng: np.random.Generator) -> Style:
    return Style(noise_hu=rng.uniform(10, 35), noise_px=rng.uniform(0.5, 1.3), blur_px=rng.uniform(0.4, 1.0),
                 lung_hu=rng.uniform(-900, -800), texture_hu=rng.uniform(6, 20), vessel_hu=rng.uniform(25, 60),
                 vessel_trunk_mm=rng.uniform(3.8, 5.5), vessel_end_mm=rng.uniform(0.5, 0.9), airways=rng.random() < 0.8)


def _nodule_diameter(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A diameter skewed to small nodules as in LUNA16 (mean about 8 mm for 3-30 mm)."""
    for _ in range(20):
        d = lo + rng.gamma(2.0, 2.6)
        if d <= hi:
            return float(d)
    return float(rng.uniform(lo, hi))


def _synthetic_shape(rng: np.random.Generator) -> Shape:
    """An ellipsoid at a random orientation, or a lobulated cluster of 3-5 spheres (1 mm grid)."""
    r = np.arange(-15, 16, dtype=float)
    p = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1)
    if rng.random() < 0.5:
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        axes = 8 * rng.uniform(0.65, 1.35, 3)
        mask = (((p @ q) / axes) ** 2).sum(-1) <= 1
    else:
        mask = np.zeros(p.shape[:3], dtype=bool)
        for _ in range(rng.integers(3, 6)):
            c = rng.normal(0, 3.5, 3)
            mask |= ((p - c) ** 2).sum(-1) <= rng.uniform(4, 7) ** 2
    return Shape(mask, (1.0, 1.0, 1.0))


def _scan_geometry(rng: np.random.Generator, size: int, slices: int | None,
                   style: Style) -> tuple[Geometry, Anatomy, float, float]:
    """The scan's grid (identity direction; flipped at the end if drawn so), the patient in it,
    and the world z range (lowest, highest)."""
    spacing_xy = rng.uniform(0.5, 0.95) * 512 / size  # LUNA16: 0.46-0.98 mm at 512 px
    fov = spacing_xy * size
    spacing_z = float(rng.choice(SLICE_SPACINGS, p=SLICE_WEIGHTS))
    height = rng.uniform(215, 265)
    z_top = rng.uniform(-120, 20)
    anatomy = Anatomy(rng, z_top, height, max_half_width=0.47 * fov, lung_hu=style.lung_hu)
    z_lo, z_hi = z_top - height - rng.uniform(15, 30), z_top + rng.uniform(15, 35)
    if slices:
        spacing_z = (z_hi - z_lo) / (slices - 1)
    nz = int(round((z_hi - z_lo) / spacing_z)) + 1
    centre_x, centre_y = anatomy.cx + rng.uniform(-8, 8), anatomy.cy + 18 + rng.uniform(-8, 8)
    ox = centre_x - spacing_xy * (size - 1) / 2
    oy = centre_y - spacing_xy * (size - 1) / 2
    g = Geometry((spacing_xy, spacing_xy, spacing_z), (ox, oy, z_lo), (1, 0, 0, 0, 1, 0, 0, 0, 1), (nz, size, size))
    return g, anatomy, z_lo, z_hi


def _draw_body(g: Geometry, anatomy: Anatomy, style: Style, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """HU (float32) and lung mask of every slice, without vessels, airways and nodules."""
    nz, size = g.shape[0], g.shape[2]
    xs, ys, zs = _world_axes(g)
    X, Y = xs[None, :].astype(np.float32), ys[:, None].astype(np.float32)
    # lung texture: a smooth random field, coarse in z and in-plane
    cells = max(2, int(size * g.spacing[0] / rng.uniform(6, 14)))
    coarse = rng.normal(0, style.texture_hu, (max(2, nz // 8 + 2), cells, cells)).astype(np.float32)
    planes = [ndimage.zoom(c, (size / c.shape[0], size / c.shape[1]), order=1) for c in coarse]
    zpos = np.linspace(0, len(planes) - 1.001, nz)
    hu = np.empty(g.shape, dtype=np.float32)
    lung = np.empty(g.shape, dtype=bool)
    for k, z in enumerate(zs):
        k0, w = int(zpos[k]), float(zpos[k] % 1)
        texture = lambda rows, cols: planes[k0][rows, cols] * (1 - w) + planes[k0 + 1][rows, cols] * w  # noqa: E731
        hu[k], lung[k] = anatomy.slice_hu(X, Y, float(z), texture)
    return hu, lung


def _lung_box(lung: np.ndarray) -> tuple[slice, slice, slice]:
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(lung.any(axis=(1, 2))) +
                 np.nonzero(lung.any(axis=(0, 2))) + np.nonzero(lung.any(axis=(0, 1))))


def _blend_tubes(hu: np.ndarray, g: Geometry, box, segments, value: float, pixel: float, within=None,
                 scale: float = 1.0) -> None:
    """Blend capsules (radius times ``scale``) into ``hu`` towards ``value``, by partial volume,
    inside ``box`` and, when given, only where ``within`` (bool, the box's shape) holds."""
    xs, ys, zs = _world_axes(g)
    frac = np.zeros([b.stop - b.start for b in box], dtype=np.float32)
    axes = (xs[box[2]], ys[box[1]], zs[box[0]])
    for p, q, r in segments:
        region = _capsule(axes, p, q, r * scale, pixel)
        if region is not None:
            np.maximum(frac[region[0]], region[1], out=frac[region[0]])
    if within is not None:
        frac *= within
    hu[box] += frac * (value - hu[box])


def _draw_vessels_and_airways(hu: np.ndarray, lung: np.ndarray, g: Geometry, anatomy: Anatomy, style: Style,
                              rng: np.random.Generator) -> list:
    """Vessel trees (blood, in the lungs) and, with ``style.airways``, bronchi (a wall of soft
    tissue around air) beside them; returns the vessel segments."""
    box = _lung_box(lung)
    vessels = [seg for side in (-1, 1)
               for seg in _vessel_tree(anatomy, rng, side, style.vessel_trunk_mm, style.vessel_end_mm, 14)]
    _blend_tubes(hu, g, box, vessels, style.vessel_hu, g.spacing[0], within=lung[box])
    if style.airways:
        airways = [seg for side in (-1, 1) for seg in _vessel_tree(anatomy, rng, side, 3.5, 1.4, 6)]
        _blend_tubes(hu, g, box, airways, rng.uniform(-80, 20), g.spacing[0], within=lung[box])
        _blend_tubes(hu, g, box, airways, -950.0, g.spacing[0], within=lung[box], scale=0.65)
    return vessels


def _juxtavascular_centre(anatomy: Anatomy, rng: np.random.Generator, radius: float, vessels: list,
                          taken: list, z_lo: float, z_hi: float) -> np.ndarray | None:
    """A centre touching a vessel of 1-3 mm radius, inside the lung, away from other nodules."""
    mid = [(p, q, r) for p, q, r in vessels if 1.0 <= r <= 3.0]
    for _ in range(40 if mid else 0):
        p, q, r = mid[rng.integers(len(mid))]
        axis = (q - p) / (np.linalg.norm(q - p) + 1e-9)
        side = np.cross(axis, rng.normal(0, 1, 3))
        c = p + rng.uniform(0, 1) * (q - p) + side / (np.linalg.norm(side) + 1e-9) * (radius + r) * 0.8
        t = float(anatomy.t(np.asarray(c[2])))
        deep = 0 < t < 1 and float(anatomy.lung_depth(np.asarray(c[0]), np.asarray(c[1]), t)) > radius + 3
        if deep and z_lo + radius + 3 < c[2] < z_hi - radius - 3 and \
                all(np.linalg.norm(c - o) > radius + ro + 8 for o, ro in taken):
            return c
    return None


def _draw_nodules(hu: np.ndarray, lung: np.ndarray, g: Geometry, anatomy: Anatomy, shapes, vessels: list,
                  nodules: tuple[int, int], diameters: tuple[float, float], rng: np.random.Generator,
                  z_range: tuple[float, float]):
    """Nodules (and small excluded findings) blended into ``hu``; (nodules, excluded, taken)."""
    out_nodules: list[PhantomNodule] = []
    excluded: list[tuple[np.ndarray, float]] = []
    taken: list[tuple[np.ndarray, float]] = []
    spacing_zyx = (g.spacing[2], g.spacing[1], g.spacing[0])
    wanted = [("nodule", _nodule_diameter(rng, *diameters)) for _ in range(rng.integers(nodules[0], nodules[1] + 1))]
    wanted += [("small", rng.uniform(1.5, 2.9)) for _ in range(rng.integers(0, 3))]
    for what, diameter in wanted:
        where = rng.choice(["juxtapleural", "juxtavascular", "free"], p=[0.2, 0.2, 0.6]) if what == "nodule" else "free"
        centre = _juxtavascular_centre(anatomy, rng, diameter / 2, vessels, taken, *z_range) \
            if where == "juxtavascular" else None
        location = "vascular"
        if centre is None:  # no vessel to touch: placed free instead
            centre = _place(anatomy, rng, diameter / 2, where == "juxtapleural", taken, *z_range)
            location = "pleural" if where == "juxtapleural" else "free"
        if centre is None:
            continue
        kind = str(rng.choice(KINDS, p=[0.7, 0.15, 0.15])) if what == "nodule" else "solid"
        shape = shapes[rng.integers(len(shapes))] if rng.random() < 0.7 else _synthetic_shape(rng)
        occ = _resample_shape(shape, diameter, spacing_zyx, rng)
        placed = _stamp(hu, occ, _nodule_hu(kind, occ, rng), g.world_to_voxel(centre), lung)
        if placed is None:
            continue
        centroid = g.voxel_to_world(placed[0])
        d = float((6 * placed[1] * np.prod(spacing_zyx) / np.pi) ** (1 / 3))
        taken.append((centroid, diameter / 2))
        if what == "nodule" and d >= 3.0:
            out_nodules.append(PhantomNodule(centroid, d, kind, location))
        else:
            excluded.append((centroid, d))
    return out_nodules, excluded, taken


def _draw_scar(hu: np.ndarray, lung: np.ndarray, g: Geometry, anatomy: Anatomy, taken: list, rng: np.random.Generator,
               z_range: tuple[float, float]) -> list[tuple[np.ndarray, float]]:
    """Half the time a linear scar, listed with diameter -1 as LUNA16 lists non-nodule findings."""
    if rng.random() >= 0.5:
        return []
    c = _place(anatomy, rng, 5.0, False, taken, *z_range)
    if c is None:
        return []
    d = rng.normal(0, 1, 3)
    region = _capsule(_world_axes(g), c - 7 * d / np.linalg.norm(d), c + 7 * d / np.linalg.norm(d), 1.0, g.spacing[0])
    if region is None:
        return []
    occ = region[1] * lung[region[0]]
    hu[region[0]] += occ * (-120 - hu[region[0]])
    return [(c, -1.0)]


def _scanner(hu: np.ndarray, anatomy: Anatomy, style: Style, rng: np.random.Generator) -> np.ndarray:
    """The scanner's blur, correlated noise and reconstruction circle; int16 HU.

    Each slice takes a random window of a few filtered noise planes twice its size (filtering a
    whole volume of noise would dominate the time)."""
    size = hu.shape[2]
    bank = ndimage.gaussian_filter(rng.standard_normal((4, 2 * size, 2 * size), dtype=np.float32),
                                   (0, style.noise_px, style.noise_px))
    bank *= style.noise_hu / bank.std()
    r = (np.arange(size) - (size - 1) / 2) / (size / 2)
    outside = r[None, :] ** 2 + r[:, None] ** 2 > 1.0
    out = np.empty(hu.shape, dtype=np.int16)
    for k in range(hu.shape[0]):
        j, oy, ox = rng.integers(len(bank)), rng.integers(size), rng.integers(size)
        plane = ndimage.gaussian_filter(hu[k], style.blur_px, truncate=2.0)
        plane += bank[j, oy:oy + size, ox:ox + size]
        plane[outside] = anatomy.fov_pad
        out[k] = np.rint(plane)
    return out


def make_scan(seed: int, index: int, size: int = 512, shapes: tuple[Shape, ...] = (),
              nodules: tuple[int, int] = (0, 4), diameters: tuple[float, float] = (3.0, 30.0),
              flip_fraction: float = 0.15, slices: int | None = None) -> PhantomScan:
    """Generate scan ``index`` of the dataset with ``seed`` (deterministic in both); ``slices``
    fixes the slice count (the slice spacing follows)."""
    rng = np.random.default_rng([seed, index])
    uid = f"{UID_ROOT}.{seed}.{index + 1}"
    style = draw_style(rng)
    g, anatomy, z_lo, z_hi = _scan_geometry(rng, size, slices, style)
    flipped = rng.random() < flip_fraction
    hu, lung = _draw_body(g, anatomy, style, rng)
    vessels = _draw_vessels_and_airways(hu, lung, g, anatomy, style, rng)
    shapes = shapes or (Shape(_ball(9), (1.0, 1.0, 1.0)),)
    found, excluded, taken = _draw_nodules(hu, lung, g, anatomy, shapes, vessels, nodules, diameters, rng, (z_lo, z_hi))
    excluded += _draw_scar(hu, lung, g, anatomy, taken, rng, (z_lo, z_hi))
    out = _scanner(hu, anatomy, style, rng)
    if flipped:  # as four LUNA16 scans: x and y flipped in the TransformMatrix
        out = np.ascontiguousarray(out[:, ::-1, ::-1])
        origin = g.voxel_to_world([0, size - 1, size - 1])
        g = Geometry(g.spacing, tuple(float(v) for v in origin), (-1, 0, 0, 0, -1, 0, 0, 0, 1), g.shape)
    return PhantomScan(uid, CTVolume(out, g, uid), found, excluded)


def _ball(diameter: int) -> np.ndarray:
    r = (np.arange(diameter) - (diameter - 1) / 2)
    return (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= (diameter / 2) ** 2


def _stamp(hu: np.ndarray, occ: np.ndarray, values: np.ndarray, centre_zyx: np.ndarray,
           inside: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Blend a nodule (occupancy ``occ``, HU ``values``) centred at ``centre_zyx`` into ``hu``,
    inside the lungs only: a juxtapleural nodule ends at the pleura, as a reader outlines it.

    Returns the voxel centroid (z, y, x) of what was drawn and its volume in voxels.
    """
    c = np.round(centre_zyx).astype(int) - np.array(occ.shape) // 2
    lo = np.maximum(c, 0)
    hi = np.minimum(c + np.array(occ.shape), hu.shape)
    if np.any(hi <= lo):
        return None
    src = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, c))
    dst = tuple(slice(a, b) for a, b in zip(lo, hi))
    o = occ[src] * inside[dst]
    if o.sum() < 1:
        return None
    hu[dst] += o * (values[src] - hu[dst])
    idx = np.indices(o.shape).reshape(3, -1).T + lo
    centroid = (idx * o.reshape(-1, 1)).sum(0) / o.sum()
    return centroid, float(o.sum())


def write_dataset(out: Path, scans: int, seed: int = 0, size: int = 512, workers: int = 1,
                  nodules: tuple[int, int] = (0, 4), diameters: tuple[float, float] = (3.0, 30.0),
                  force: bool = False, preview: bool = False, progress=None) -> dict:
    """Write ``scans`` phantom scans in the LUNA16 layout to ``out``.

    The folder appears only when complete (written beside it, then renamed); an existing
    ``out`` is replaced only with ``force``.

    Returns:
        The summary written to ``out/phantom.json``.
    """
    out = Path(out)
    if scans < 1:
        raise UserError(f"--scans must be at least 1, got {scans}")
    if size < 32:
        raise UserError(f"--size must be at least 32 pixels, got {size}")
    with staged_dir(out, force) as tmp:
        shapes = shape_library()
        n_subsets = min(10, scans)
        jobs = [(tmp, seed, i, size, shapes, nodules, diameters, i % n_subsets) for i in range(scans)]
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = list(track(progress, pool.map(_write_scan, jobs), total=scans))
        else:
            results = [_write_scan(j) for j in track(progress, jobs, total=scans)]
        annotations = [(r["uid"], n) for r in results for n in r["nodules"]]
        excluded = [(r["uid"], e) for r in results for e in r["excluded"]]
        tables = {name: Findings(np.array([u for u, _ in rows], dtype=str), np.array([r["xyz"] for _, r in rows]).reshape(-1, 3),
                                 np.array([r["diameter_mm"] for _, r in rows]))
                  for name, rows in (("annotations.csv", annotations), ("annotations_excluded.csv", excluded))}
        for name, table in tables.items():
            write_findings(tmp / name, table)
        kinds = {k: np.array([n[k] for _, n in annotations], dtype=str) for k in ("location", "texture")}
        write_kinds(tmp / KINDS_CSV, replace(tables["annotations.csv"], extra=kinds))
        (tmp / "seriesuids.csv").write_text("".join(r["uid"] + "\n" for r in results))
        summary = {"phantom_version": PHANTOM_VERSION, "seed": seed, "size": size, "scans": results,
                   "nodules_per_scan": list(nodules), "diameters_mm": list(diameters),
                   "note": "generated phantom scans, not patient data"}
        (tmp / "phantom.json").write_text(json.dumps(summary, indent=1))
        if preview:
            write_preview(tmp, tmp / "preview.png")
    return summary


def _write_scan(job) -> dict:
    root, seed, index, size, shapes, nodules, diameters, subset = job
    scan = make_scan(seed, index, size, shapes, nodules, diameters)
    write_ct(scan.volume, root / f"subset{subset}" / f"{scan.uid}.mhd")
    g = scan.volume.geometry
    return {
        "uid": scan.uid, "subset": subset, "shape_zyx": list(g.shape), "spacing_xyz": list(g.spacing),
        "flipped": g.direction[0] < 0,
        "nodules": [{"xyz": n.center_xyz.tolist(), "diameter_mm": n.diameter_mm, "texture": n.kind,
                     "location": n.location} for n in scan.nodules],
        "excluded": [{"xyz": c.tolist(), "diameter_mm": d} for c, d in scan.excluded],
    }


def write_preview(root: Path, path: Path, count: int = 8) -> list[tuple[int, int]]:
    """A picture of axial slices through the first ``count`` nodules, each circled; the (row, col)
    of the PNG where each nodule's centre lies."""
    from noduledet.data.ct import read_ct
    from noduledet.data.luna16 import Luna16
    from noduledet.plots import slice_grid

    data = Luna16(root)
    ann = data.annotations()
    volumes: dict[str, CTVolume] = {}
    panels = []
    for i in range(min(count, len(ann))):
        uid = ann.uids[i]
        if uid not in volumes:
            volumes[uid] = read_ct(data.scan_path(uid))
        g = volumes[uid].geometry
        z, y, x = g.world_to_voxel(ann.xyz[i])
        k = int(round(z))
        panels.append((volumes[uid].hu[k], (x + 0.5, y + 0.5), ann.value[i] / 2 / g.spacing[0] + 6,
                       f"{uid[-8:]} slice {k}: {ann.value[i]:.1f} mm"))
    return slice_grid(panels, path) if panels else []
