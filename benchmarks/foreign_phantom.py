"""Foreign phantom: an independent synthetic chest-CT generator in the LUNA16 layout.

Built apart from `noduledet.data.phantom`, to test whether the detector generalizes to data it was not
tuned on. Anatomy is analytic (superellipse body, chest wall and lungs with domed apices and diaphragm,
heart, great vessels, trachea, ribs as sloping bands with cartilage, vertebrae, sternum, scapulae,
clavicles, table); vascular trees grow by Murray's law into free lung space, bronchi beside the arteries;
nodules are solid, part-solid or ground glass, spheres, ellipsoids, lobulated or spiculated, isolated,
juxtapleural or juxtavascular. A scanner model follows: separable smooth or edge-enhancing kernel,
darkening near bone, anisotropic correlated noise, slice averaging, reconstruction circle. Beside the
LUNA16 CSVs, annotations_kinds.csv gives each nodule's location and texture (noduledet.data.kinds).

    python benchmarks/foreign_phantom.py OUT --scans 20 --seed 0 [--workers 2] [--preview p.png]
    python benchmarks/foreign_phantom.py OUT --preview p.png          # preview an existing OUT

Frames: patient (x, y, z) mm = LPS world minus the patient centre (x to the patient's left, y posterior,
z superior; z = 0 at the lung bases, H at the apices). Array index (z, y, x) as sitk.GetArrayFromImage;
q = index * spacing (mm along the array axes). Annotation centres go through ITK's
TransformContinuousIndexToPhysicalPoint. Randomness comes only from (seed, scan index).
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")                   # one core per worker: the machine is shared

import argparse
import csv
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

F32 = np.float32
SLICE_MM, SLICE_P = (0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5), (0.2, 0.08, 0.12, 0.22, 0.06, 0.1, 0.22)
PADS = (-2048, -3024, -1024)                           # HU outside the reconstruction circle
BUCKETS = np.array([2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512])
ARTERY_DIRS = ((0.3, 0.1, 1.0), (0.2, 0.6, 0.9), (0.6, -0.6, 0.7), (0.8, 0.2, 0.6),     # root directions,
               (0.8, -0.6, -0.3), (0.7, 0.1, -0.8), (0.3, 0.8, -0.7), (0.5, -0.3, -0.9))  # x toward the side
LOCATIONS = {"isolated": "free", "pleural": "pleural", "vascular": "vascular"}   # annotations_kinds.csv
TEXTURES = ("solid", "part-solid", "ground-glass")                     # by the index of `kind`
VEIN_DIRS = ((0.3, -0.4, 1.0), (0.6, 0.4, 0.8), (0.6, 0.3, -0.9), (1.0, -0.4, 0.0), (0.4, 0.8, -0.3))


def smooth01(t):
    """Smoothstep of t clipped to [0, 1]."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def soft(level, scale):
    """Partial-volume fraction of {level <= 1}; scale turns (1 - level) into edge widths."""
    return np.clip((1.0 - level) * scale + 0.5, 0.0, 1.0)


def ramp(depth, w):
    """Fraction for a signed depth (mm, positive inside) over an edge w mm wide."""
    return np.clip(depth / w + 0.5, 0.0, 1.0)


def blend(hu, value, frac):
    """hu <- hu + frac * (value - hu), in place (hu may be a view)."""
    hu += frac * (value - hu)


def superellipse(x, y, a, b_ant, b_post, p):
    """Level |x/a|^p + |y/b|^p, with b = b_ant in front (y < 0) and b_post behind."""
    return np.abs(x / a) ** p + np.abs(y / np.where(y < 0, b_ant, b_post)) ** p


def unit(v):
    """Rows of v scaled to unit length."""
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def window(x, y, xlo, xhi, ylo, yhi):
    """Index slices of a plane (x: (1, nx), y: (ny, 1) patient mm) inside a patient box, or None."""
    ix = np.flatnonzero((x[0] >= xlo) & (x[0] <= xhi))
    iy = np.flatnonzero((y[:, 0] >= ylo) & (y[:, 0] <= yhi))
    return None if ix.size == 0 or iy.size == 0 else np.s_[iy[0]:iy[-1] + 1, ix[0]:ix[-1] + 1]


def paint_bone(hu, level, half, w, cortex, marrow, cortical=1.5):
    """Blend a bone given its quadratic level (<= 1 inside; half = short half axis mm): cortex, marrow."""
    inner = max(1.0 - 2.0 * cortical / half, 0.0)
    blend(hu, marrow + (cortex - marrow) * smooth01((level - inner) / (1.0 - inner)), soft(level, half / (2 * w)))


def capsule(qz, qy, qx, a, b, ra, rb, w):
    """Fraction inside a capsule from a to b (z, y, x mm) with radius tapering ra -> rb; broadcasts."""
    ab = [b[m] - a[m] for m in range(3)]
    l2 = ab[0] * ab[0] + ab[1] * ab[1] + ab[2] * ab[2] + 1e-9
    pz, py, px = qz - a[0], qy - a[1], qx - a[2]
    proj = pz * ab[0] + py * ab[1] + px * ab[2]
    t = np.clip(proj / l2, 0.0, 1.0)
    d2 = np.maximum(pz * pz + py * py + px * px - 2.0 * t * proj + t * t * l2, 0.0)
    return ramp(ra + t * (rb - ra) - np.sqrt(d2), w)


@dataclass(frozen=True)
class Grid:
    """Voxel grid of one scan and its map to the patient frame.

    shape, spacing: (z, y, x). flip: +1 for the identity direction, -1 for diag(-1, -1, 1). origin_xyz:
    world mm of voxel 0; centre_xyz: world mm of the patient origin; tilt_xy: the patient's lean (mm of
    x, y per mm of z about z = zmid).
    """

    shape: tuple
    spacing: tuple
    flip: int
    origin_xyz: tuple
    centre_xyz: tuple
    tilt_xy: tuple
    zmid: float

    def from_q(self, qz, qy, qx):
        """Patient (x, y, z) mm of array-frame points q (broadcasting)."""
        (ox, oy, oz), (cx, cy, cz), (tx, ty) = self.origin_xyz, self.centre_xyz, self.tilt_xy
        z = oz + qz - cz
        return (ox + self.flip * qx - cx - tx * (z - self.zmid), oy + self.flip * qy - cy - ty * (z - self.zmid), z)

    def to_q(self, p):
        """Array-frame q (..., 3) as (z, y, x) of patient points p (..., 3) as (x, y, z)."""
        (ox, oy, oz), (cx, cy, cz), (tx, ty) = self.origin_xyz, self.centre_xyz, self.tilt_xy
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        return np.stack([z + cz - oz, self.flip * (y + ty * (z - self.zmid) + cy - oy),
                         self.flip * (x + tx * (z - self.zmid) + cx - ox)], -1)

    def plane(self, qz):
        """Patient x (1, nx), y (ny, 1) and z (float) of the axial plane at array height qz mm."""
        (_, ny, nx), (_, sy, sx) = self.shape, self.spacing
        x, y, z = self.from_q(qz, np.arange(ny, dtype=F32)[:, None] * sy, np.arange(nx, dtype=F32)[None] * sx)
        return x.astype(F32), y.astype(F32), float(z)


class Patient:
    """Random anatomy of one patient; every structure is an analytic function of patient mm.

    Sizes in mm: ab, b body half width and half depths (front, back); fat, wall chest-wall layers
    (side, front, back); bc cavity half depths; mx, my, mw mediastinum centre and half width; domes
    (right, left height, x offset, x and y radius, y centre); heart (centre, semi-axes, angle); rv, rc,
    yv vertebral body and canal radius, body y; disc (phase, period); ribs (top z, spacing, drop to the
    front, thickness, height); st_z sternum z range. pb, pc, pl: superellipse exponents of body,
    cavity and lungs. hu: tissue values.
    """

    def __init__(self, rng: np.random.Generator, half_fov: float, H: float):
        u = rng.uniform
        self.H, self.z_car, self.z_range = H, H * u(0.58, 0.66), (0.0, H)
        self.ab = float(np.clip(half_fov * u(0.62, 0.88), 130.0, 190.0))     # FOV fits; a small one cuts
        self.b, k = (self.ab * u(0.58, 0.7), self.ab * u(0.62, 0.74)), self.ab / 160.0
        self.pb, self.pc, self.pl, fat = u(1.9, 2.5), u(2.0, 2.5), u(2.4, 3.4), u(4.0, 22.0)
        self.fat = (fat, fat * u(0.6, 1.3), fat * u(0.5, 1.0))                 # lateral, front, back
        self.wall = (u(12.0, 18.0), u(11.0, 16.0), u(16.0, 24.0))              # muscle and ribs
        self.split, self.cone, self.z_apex0 = u(0.3, 0.5), u(0.05, 0.18), H * u(0.5, 0.62)
        self.bc = (self.b[0] - self.fat[1] - self.wall[1], self.b[1] - self.fat[2] - self.wall[2])   # cavity
        self.mx, self.my, self.mw = u(0.0, 10.0), 0.5 * (self.bc[1] - self.bc[0]), k * u(16.0, 24.0)
        self.domes = (H * u(0.22, 0.32), H * u(0.16, 0.26), u(55.0, 75.0), u(100.0, 125.0), u(-40.0, -20.0),
                      u(100.0, 120.0))
        self.heart = ((k * u(12.0, 28.0), -self.bc[0] * u(0.3, 0.45), H * u(0.25, 0.33)),
                      (k * u(50.0, 62.0), min(k * u(38.0, 46.0), 0.5 * self.bc[0]), k * u(42.0, 52.0)), u(0.45, 0.8))
        self.rv, self.rc, self.disc = u(15.0, 20.0), u(6.0, 8.0), (u(0.0, 30.0), u(24.0, 30.0))
        self.yv = self.bc[1] - self.rv * u(0.5, 0.9)
        self.ribs = (H + u(5.0, 20.0), (H + u(35.0, 55.0)) / 11.0, u(90.0, 140.0), u(6.0, 8.5), u(9.0, 13.0))
        self.st_z = (H * u(0.3, 0.4), H * u(0.85, 0.95))
        self.hu = dict(fat=u(-120, -80), muscle=u(35, 60), medfat=u(-115, -80), liver=u(50, 68), spleen=u(35, 48),
                       lung=u(-890, -835), grad=u(10, 55), cortex=u(700, 1200), marrow=u(250, 380),
                       cart=u(90, 160), blood=u(30, 50))

    def frame(self, z):
        """Body half width, cavity half width (narrower upward) and apex taper at height z."""
        a = self.ab * (1.0 - 0.3 * smooth01((z - self.H) / 60.0))
        t = np.clip((z - self.z_apex0) / (self.H - self.z_apex0), 0.0, 1.0)
        out = (a, (a - self.fat[0] - self.wall[0]) * (1.0 - self.cone * z / self.H), (1.0 - t ** 1.6) ** 0.6 + 1e-3)
        return tuple(float(v) for v in out) if np.ndim(z) == 0 else out

    def diaphragm(self, x, y):
        """Height (mm) of the diaphragm under patient (x, y); two domes, the right usually higher."""
        hr, hl, dx, rx, yd, ry = self.domes
        c = 1.0 - ((y - yd) / ry) ** 2
        return np.maximum(np.maximum(hr * (c - ((x + dx) / rx) ** 2), hl * (c - ((x - dx) / rx) ** 2)), -8.0)

    def heart_level(self, x, y, z):
        """Quadratic level of the heart ellipsoid, long axis to the left and front."""
        (hx, hy, hz), (A, B, C), ang = self.heart
        if np.ndim(z) == 0 and abs(z - hz) > 1.2 * C:
            return 9.0
        c, s, dx, dy = np.cos(ang), np.sin(ang), x - hx, y - hy
        return ((c * dx - s * dy) / A) ** 2 + ((s * dx + c * dy) / B) ** 2 + ((z - hz) / C) ** 2

    def spine_level(self, x, y):
        """Quadratic level of the paravertebral block that the lungs wrap around."""
        return (x / (self.rv + 14.0)) ** 2 + ((y - self.yv - 8.0) / (self.rv + 20.0)) ** 2

    def lung(self, x, y, z, w):
        """Lung fraction at patient points (x, y, z mm, broadcasting); w = edge width mm."""
        _, ac, taper = self.frame(z)
        (bc0, bc1), pl = self.bc, 2.0 + (self.pl - 2.0) * taper             # rounder toward the apex
        al, bl, yl = 0.53 * ac * taper, 0.51 * (bc0 + bc1) * taper, self.my + 15.0 * (1.0 - taper)
        f = soft(superellipse(x, y, ac, bc0, bc1, self.pc), ac / (self.pc * w))
        f = f * soft(np.abs((np.abs(x - self.mx) - 0.5 * ac) / al) ** pl + np.abs((y - yl) / bl) ** pl,
                     np.maximum(al / (pl * w), 2.0))
        f = f * (1.0 - soft(((x - self.mx) / self.mw) ** 2 + ((y - self.my) / (0.5 * (bc0 + bc1))) ** 2,
                            self.mw / (2 * w)))
        f = f * (1.0 - soft(self.spine_level(x, y), (self.rv + 14.0) / (2 * w)))
        f = f * (1.0 - soft(self.heart_level(x, y, z) / 1.2, self.heart[1][1] / (2 * w)))
        return f * ramp(z - self.diaphragm(x, y), w)

    def paint(self, x, y, z, w, base, tex):
        """Tissue HU on one axial plane, before vessels, airways and nodules.

        Args:
            x: (1, nx), y: (ny, 1) patient mm of the plane's columns and rows; z: its height mm.
            w: edge width mm. base: (ny, nx) air and table. tex: (ny, nx) lung texture HU.
        Returns:
            (ny, nx) float32 HU.
        """
        full, h, (a, ac, _), (b0, b1), (bc0, bc1) = base.copy(), self.hu, self.frame(z), self.b, self.bc
        s = window(x, y, -a - 2.0, a + 2.0, -b0 - 2.0, b1 + 2.0)               # the body's box
        hu, x, y, tex = full[s], x[:, s[1]], y[s[0]], tex[s]
        (f0, f1, f2), m = self.fat, [f + self.split * t for f, t in zip(self.fat, self.wall)]
        for (d0, d1, d2), val in (((0, 0, 0), 30.0), ((2, 2, 2), h["fat"]), ((f0, f1, f2), h["muscle"]),
                                  (m, h["fat"]), ([v + 2.0 for v in m], h["muscle"])):  # skin, fat, two muscles
            blend(hu, val, soft(superellipse(x, y, a - d0, b0 - d1, b1 - d2, self.pb), (a - d0) / (self.pb * w)))
        gc, below = superellipse(x, y, ac, bc0, bc1, self.pc), ramp(self.diaphragm(x, y) - z, w)
        top = h["medfat"] + (h["muscle"] - h["medfat"]) * float(smooth01((z - self.H + 20.0) / 30.0))  # neck
        blend(hu, top + below * (np.where(x < self.mx + 30.0, h["liver"], h["spleen"]) - top),
              soft(gc, ac / (self.pc * w)))
        (hx, hy, _), (A, B, _), _ = self.heart
        if (s := window(x, y, hx - 1.1 * A, hx + 1.1 * A, hy - 1.1 * A, hy + 1.1 * A)) is not None:
            inside = soft(gc[s], ac / (self.pc * w)) * (1.0 - below[s])
            blend(hu[s], h["blood"], soft(self.heart_level(x[:, s[1]], y[s[0]], z), B / (2 * w)) * inside)
        s = window(x, y, -60.0, 60.0, self.yv - self.rv - 30.0, bc1 + 40.0)
        blend(hu[s], h["muscle"], soft(self.spine_level(x[:, s[1]], y[s[0]]), (self.rv + 14.0) / (2 * w)))
        if (s := window(x, y, -ac - 2.0, ac + 2.0, -bc0 - 2.0, bc1 + 2.0)) is not None:   # the cavity's box
            grad = h["grad"] * np.clip((y[s[0]] + bc0) / (bc0 + bc1), 0.0, 1.0)       # dependent density
            blend(hu[s], h["lung"] + grad + tex[s], self.lung(x[:, s[1]], y[s[0]], z, w))
        self.paint_spine(hu, x, y, z, w)
        if self.st_z[0] < z < self.st_z[1]:                                  # sternum, manubrium wider
            a_st, ys = 13.0 + 10.0 * float(smooth01((z - self.st_z[1] + 45.0) / 20.0)), -bc0 - 7.5
            s = window(x, y, -a_st - 3.0, a_st + 3.0, ys - 10.0, ys + 10.0)
            lev = (x[:, s[1]] / a_st) ** 2 + ((y[s[0]] - ys) / 6.0) ** 2
            paint_bone(hu[s], lev, 6.0, w, h["cortex"], h["marrow"])
        self.paint_band(hu, x, y, z, w, gc, ac)
        return full

    def paint_spine(self, hu, x, y, z, w):
        """Vertebral body (discs between), spinal canal, neural arch and processes."""
        r, yv, rc, h = self.rv, self.yv, self.rc, self.hu
        s = window(x, y, -45.0, 45.0, yv - r - 3.0, yv + r + 2 * rc + 45.0)
        hu, x, y, yc = hu[s], x[:, s[1]], y[s[0]], yv + r + rc + 2.0
        arch = np.minimum(np.minimum((x ** 2 + (y - yc) ** 2) / (rc + 4.0) ** 2,             # ring,
                                     (x / 34.0) ** 2 + ((y - yc) / 5.0) ** 2),               # transverse and
                          (x / 5.0) ** 2 + ((y - yc - rc - 16.0) / 18.0) ** 2)                # spinous processes
        paint_bone(hu, arch, 4.0, w, h["cortex"], h["marrow"])
        blend(hu, 25.0, soft((x ** 2 + (y - yc) ** 2) / rc ** 2, rc / (2 * w)))
        d = (z - self.disc[0]) % self.disc[1]
        disc = float(ramp(3.0 - min(d, self.disc[1] - d), w))
        paint_bone(hu, (x / r) ** 2 + ((y - yv) / (0.85 * r)) ** 2, 0.85 * r, w,
                   h["cortex"] + disc * (80.0 - h["cortex"]), h["marrow"] + disc * (80.0 - h["marrow"]))

    def paint_band(self, hu, x, y, z, w, gc, ac):
        """Ribs (sloping bands, cartilage in front), scapulae and clavicles just outside the cavity."""
        j, i = np.nonzero((gc > 0.85) & (gc < (1.0 + 40.0 / min(ac, self.bc[0])) ** self.pc))
        if j.size == 0:
            return
        xs, ys, h, H = x[0, i], y[j, 0], self.hu, self.H
        rr = np.hypot(xs, ys)
        depth = rr * (1.0 - gc[j, i] ** (-1.0 / self.pc))                    # mm outside the cavity
        th = np.arctan2(np.abs(xs), ys) / np.pi                              # 0 at the spine, 1 in front
        z0, dz, drop, t, hgt = self.ribs
        wk = (z0 - drop * smooth01((th - 0.1) / 0.9) - z) / dz               # rib number, fractional
        k = np.clip(np.rint(wk), -1, 12).astype(int)
        lev = ((depth - 0.5 * t - 0.5) / (0.5 * t)) ** 2 + ((wk - k) * dz / (0.5 * hgt)) ** 2
        end = np.array([0.95] * 7 + [0.86] * 3 + [0.62] * 2 + [0.0])[k]     # true, false, floating ribs
        cart = np.array([0.8] * 7 + [0.72] * 3 + [1.0] * 3)[k]
        bone = h["marrow"] + (h["cortex"] - h["marrow"]) * smooth01((lev - 0.35) / 0.65)
        vals = hu[j, i]
        vals += soft(lev, t / (4 * w)) * ((th > 0.1) & (th < end)) * (np.where(th > cart, h["cart"], bone) - vals)
        if 0.45 * H < z < H + 15.0:                                          # scapulae: plates behind ribs
            half = 0.17 * float(smooth01((z - 0.45 * H) / (0.55 * H))) ** 0.6
            f = soft(((depth - t - 7.0) / 3.0) ** 2, 3.0 / (2 * w)) * ramp((half - np.abs(th - 0.33)) * np.pi * rr, w)
            vals += f * (0.6 * h["cortex"] - vals)
        if z > H - 45.0:                                                     # clavicles: rods rising outward
            zk = H - 30.0 + 45.0 * np.clip((0.93 - th) / 0.38, 0.0, 1.0)
            lev = ((depth - t - 10.0) / 6.0) ** 2 + ((z - zk) / 6.0) ** 2
            vals += soft(lev, 6.0 / (2 * w)) * ((th > 0.55) & (th < 0.93)) * (bone.mean() - vals)
        hu[j, i] = vals


def draw_geometry(rng: np.random.Generator) -> tuple[Grid, Patient]:
    """Scanner geometry (spacing, slices, direction, origin) and the patient of one scan."""
    u = rng.uniform
    sx, sz = u(0.5, 0.95), float(rng.choice(SLICE_MM, p=SLICE_P))
    H, lo_m, hi_m = min(u(210.0, 270.0), 450 * sz - 25.0), u(15.0, 60.0), u(10.0, 40.0)
    nz = int(np.clip(round((H + lo_m + hi_m) / sz), 120, 450))               # lungs plus margins
    z_lo = -lo_m * (1.0 + (nz * sz - H - lo_m - hi_m) / (lo_m + hi_m))
    pt, half = Patient(rng, 256 * sx, H), 256 * sx
    pt.z_range = (z_lo, z_lo + (nz - 1) * sz)
    flip, gx, gy = (-1 if rng.random() < 0.3 else 1), u(-12.0, 12.0), u(-60.0, 20.0)   # image centre, world
    room = max(0.95 * half - pt.ab, 0.0)
    centre = (gx + u(-room, room), gy + u(-min(room, 25.0), min(room, 8.0)), u(-420.0, -80.0) - z_lo)
    origin = (gx - flip * sx * 255.5, gy - flip * sx * 255.5, centre[2] + z_lo)
    return Grid((nz, 512, 512), (sz, sx, sx), flip, origin, centre, (u(-0.04, 0.04), u(-0.03, 0.03)), H / 2), pt


def lung_texture(rng, grid, cell=2.5):
    """Lung texture per plane: a smooth 3D random field mixing two per-scan correlation lengths (HU)."""
    (nz, ny, nx), (sz, sy, sx) = grid.shape, grid.spacing
    lat = np.ceil(np.array([nz * sz, ny * sy, nx * sx]) / cell).astype(int) + 2
    white, mix = rng.standard_normal(tuple(lat), dtype=F32), rng.uniform(0.3, 0.7)
    field = sum(wt * ndimage.gaussian_filter(white, s / cell)
                for s, wt in ((rng.uniform(2.5, 5.0), mix), (rng.uniform(8.0, 20.0), 1.0 - mix)))
    field *= rng.uniform(8.0, 22.0) / field.std()

    def hat(pos, n):                                                         # linear interpolation weights
        m, i0 = np.zeros((len(pos), n), F32), np.floor(pos).astype(int)
        m[np.arange(len(pos)), i0], m[np.arange(len(pos)), i0 + 1] = 1.0 - (pos - i0), pos - i0
        return m

    my, mx = hat(np.arange(ny) * sy / cell, lat[1]), hat(np.arange(nx) * sx / cell, lat[2]).T

    def plane(qz):                                                           # linear in z, then in y and x
        k, f = int(qz / cell), qz / cell % 1
        return my @ (field[k] * (1.0 - f) + field[k + 1] * f) @ mx

    return plane


def paint_volume(pt, grid, rng, nsub, w):
    """HU of all tissue plane by plane; a slice averages nsub planes (partial volume in z)."""
    tex, sz = lung_texture(rng, grid), grid.spacing[0]
    x, y, _ = grid.plane(grid.zmid - pt.z_range[0])                          # table: carbon shell, foam core
    thick, d = rng.uniform(25.0, 45.0), y - (pt.b[1] + rng.uniform(4.0, 25.0) - 0.0006 * x ** 2)
    inside = ramp(np.minimum(d, thick - d), w) * ramp(230.0 - np.abs(x), w)
    core = ramp(np.minimum(d - 2.5, thick - 2.5 - d), w)
    base = (-1000.0 + inside * (rng.uniform(100.0, 250.0) - core * rng.uniform(900.0, 1050.0) + 1000.0)).astype(F32)
    hu = np.empty(grid.shape, F32)
    for k in range(grid.shape[0]):
        t = tex(k * sz)
        hu[k] = sum(pt.paint(*grid.plane((k + (o + 0.5) / nsub - 0.5) * sz), w, base, t) for o in range(nsub)) / nsub
    return hu


def chain(points, radii):
    """Capsule rows (x0, y0, z0, x1, y1, z1, r0, r1) along a polyline."""
    p, r = np.asarray(points, float), np.asarray(radii, float)
    return np.hstack([p[:-1], p[1:], r[:-1, None], r[1:, None]])


def central_tubes(pt, rng):
    """Great vessels, trachea, main bronchi and oesophagus; and the roots of the lung trees.

    Returns:
        tissue (N, 8) and air (M, 8) capsule rows (patient mm); roots: [(hilum xyz, [(direction,
        radius)], is_artery)].
    """
    u, mx, zc, (z_lo, z_hi) = rng.uniform, pt.mx, pt.z_car, pt.z_range
    (hx, hy, hz), (_, _, C), _ = pt.heart
    yf, rt, top = pt.yv - pt.rv, u(7.5, 10.0), z_hi + 5.0                    # vertebra front; trachea lumen
    ytr = yf - 11.0 - rt
    art = {s: np.array([mx + s * (pt.mw + 6.0), ytr - 8.0, zc - (18.0 if s < 0 else 8.0)]) for s in (-1, 1)}
    vein = {s: art[s] + [s * 2.0, -14.0, -28.0] for s in (-1, 1)}
    bif, la = np.array([mx + 12.0, hy + 8.0, zc - 12.0]), (hx - 10.0, hy + 25.0, hz + 0.2 * C)
    ra, rd = u(13.0, 17.0), u(10.0, 13.0)
    tissue = [chain([(mx, ytr, top), (mx, ytr, zc)], [rt + 2.0] * 2),                 # trachea wall
              chain([(hx - 8.0, hy - 5.0, hz + 0.6 * C), (mx - 10.0, hy, zc + 10.0),          # aorta
                     (mx, 0.5 * (hy + ytr), zc + 28.0), (mx + 20.0, yf - 8.0, zc + 22.0),
                     (mx + 22.0, yf - 6.0, zc - 10.0), (mx + 20.0, yf - 8.0, 10.0),
                     (mx + 6.0, yf - 14.0, z_lo - 10.0)], [ra] * 3 + [rd] * 4),
              chain([(mx - 30.0, hy + 5.0, top), (mx - 27.0, hy + 5.0, zc - 5.0), (mx - 20.0, hy, hz + 0.7 * C)],
                    [u(8.0, 11.0)] * 3),                                             # superior vena cava
              chain([(hx - 5.0, hy - 15.0, hz + 0.5 * C), bif], [u(12.0, 15.0)] * 2),  # pulmonary trunk
              chain([bif, art[-1]], [9.0, 6.0]),                                               # pulmonary arteries
              chain([bif, (mx + pt.mw, ytr - 5.0, zc + 2.0), art[1]], [9.0, 8.0, 6.0]),
              chain([(mx + 3.0, yf - 9.0, top), (mx + 6.0, yf - 10.0, zc), (mx + 12.0, yf - 14.0, 0.0)], [7.0] * 3),
              chain([(mx - 2.0, hy + 10.0, zc + 30.0), (mx - 15.0, hy + 10.0, top)], [6.0] * 2),
              chain([(mx + 12.0, hy + 30.0, zc + 28.0), (mx + 18.0, hy + 30.0, top)], [5.0] * 2)]
    tissue += [chain([la, vein[s]], [7.0, 5.5]) for s in (-1, 1)]           # pulmonary veins
    air = [chain([(mx, ytr, top), (mx, ytr, zc)], [rt] * 2)]
    for s in (-1, 1):                                                        # main bronchi
        tissue.append(chain([(mx, ytr, zc), art[s] + [0.0, 10.0, 0.0]], [0.75 * rt + 1.5, 6.0]))
        air.append(chain([(mx, ytr, zc), art[s] + [0.0, 10.0, 0.0]], [0.75 * rt, 4.5]))
    if rng.random() < 0.5:                                                   # air in the oesophagus
        air.append(chain([(mx + 3.0, yf - 9.0, top), (mx + 6.0, yf - 10.0, zc)], [1.5] * 2))
    roots = [(hilum[s], [((s * dx, dy, dz), u(3.0, 5.0) * pt.ab / 160.0) for dx, dy, dz in dirs], is_art)
             for s in (-1, 1) for hilum, dirs, is_art in ((art, ARTERY_DIRS, True), (vein, VEIN_DIRS, False))]
    return np.vstack(tissue), np.vstack(air), roots


def cell_of(occ, p):
    """Index tuple of the occupancy cells (occ = (counts, corner mm, cell mm)) holding points p (N, 3)."""
    return tuple(np.clip(((p - occ[1]) / occ[2]).astype(int), 0, np.array(occ[0].shape) - 1).T)


def split(pt, rng, tips, D, r, O, hil, occ, w, K=6):
    """Two children per tip: Murray's-law radii and angles; of K azimuths, the one into free lung."""
    n, g = len(r), rng.uniform(0.3, 1.0, len(r))
    r1 = r / (1.0 + g ** 3) ** (1.0 / 3.0)
    r2 = g * r1
    t1 = np.arccos(np.clip((r ** 4 + r1 ** 4 - r2 ** 4) / (2 * r ** 2 * r1 ** 2), -1, 1)) + rng.normal(0, 0.1, n)
    t2 = np.arccos(np.clip((r ** 4 + r2 ** 4 - r1 ** 4) / (2 * r ** 2 * r2 ** 2), -1, 1)) + rng.normal(0, 0.1, n)
    U = unit(np.cross(D, rng.normal(size=(n, 3))))
    phi = rng.uniform(0, 2 * np.pi, (n, 1)) + 2 * np.pi * np.arange(K) / K
    e = np.cos(phi)[..., None] * U[:, None] + np.sin(phi)[..., None] * np.cross(D, U)[:, None]
    d1 = np.cos(t1)[:, None, None] * D[:, None] + np.sin(t1)[:, None, None] * e
    d2 = np.cos(t2)[:, None, None] * D[:, None] - np.sin(t2)[:, None, None] * e
    out = unit(tips - hil)[:, None]
    score = 0.3 * ((d1 * out).sum(-1) + (d2 * out).sum(-1))                  # away from the hilum,
    for d, rr in ((d1, r1), (d2, r2)):                                       # into lung, into empty cells
        far = (tips[:, None] + d * (6.0 * rr + 2.0)[:, None, None]).reshape(-1, 3)
        score += (pt.lung(*far.T, w) - 0.15 * occ[0][cell_of(occ, far)]).reshape(n, K)
    best = np.argmax(score, 1)
    D, O = np.vstack([d1[np.arange(n), best], d2[np.arange(n), best]]), np.vstack([O, O])
    O = unit(O - (O * D).sum(1, keepdims=True) * D)                          # bronchus side, kept perpendicular
    return np.vstack([tips, tips]), D, np.concatenate([r1, r2]), O, np.vstack([hil, hil])


def grow_trees(pt, rng, roots, w):
    """Vascular trees grown generation by generation from the hila, bronchi beside the arteries.

    Returns:
        tissue (N, 8) and air (M, 8) capsule rows (patient mm): vessels and bronchial walls; lumens.
    """
    occ = (np.zeros((90, 70, 70)), np.array([-270.0, -210.0, -60.0]), 6.0)
    rmin, bronchus_min, crowd, tissue, air = rng.uniform(0.4, 0.55), rng.uniform(1.6, 2.4), rng.uniform(5, 9), [], []
    centre = np.array([[pt.mx + s * 0.5 * pt.frame(0.4 * pt.H)[1], pt.my, 0.0] for s in (-1, 1)])
    for artery in (True, False):
        rows = [(h, d, r) for h, branches, a in roots if a == artery for d, r in branches]
        P, R = np.array([h for h, _, _ in rows], float), np.array([r for _, _, r in rows])
        D, hil = unit(np.array([d for _, d, _ in rows], float) + rng.normal(0, 0.1, (len(rows), 3))), P.copy()
        O = unit(np.array([0.0, 1.0, 0.0]) - D[:, 1:2] * D)
        for gen in range(80):
            L = np.clip(R * rng.uniform(4.0, 8.0, len(R)), 2.0, 30.0)[:, None]
            D2 = unit(D + rng.normal(0, 0.2, D.shape))                          # a bend halfway
            for _ in range(2):                           # a branch leaving the lung retries shorter, turned inward
                mid, end = P + 0.5 * L * D, P + 0.5 * L * (D + D2)
                ok = (pt.lung(*end.T, w) > 0.5) & ((gen == 0) | (pt.lung(*mid.T, w) > 0.5))
                inward = unit((centre[(P[:, 0] > pt.mx).astype(int)] - P) * [1.0, 1.0, 0.0])
                D, D2, L = (np.where(ok[:, None], v, n) for v, n in ((D, unit(D + inward)),
                                                                     (D2, unit(D2 + 2 * inward)), (L, 0.5 * L)))
            P, D2, R, O, hil, mid, end = (v[ok] for v in (P, D2, R, O, hil, mid, end))
            re = R * rng.uniform(0.92, 0.99, len(R))
            rm = 0.5 * (R + re)
            tissue += [np.hstack([P, mid, R[:, None], rm[:, None]]), np.hstack([mid, end, rm[:, None], re[:, None]])]
            if artery:                                                       # bronchus: wall ring round air
                b = R >= bronchus_min
                lum = 0.75 * R[b]
                wall, off = np.maximum(0.4, 0.2 * lum), (R[b] + 1.2 * lum + 0.8)[:, None] * O[b]
                for p0, p1 in ((P[b], mid[b]), (mid[b], end[b])):
                    tissue.append(np.hstack([p0 + off, p1 + off, (lum + wall)[:, None], (lum + wall)[:, None]]))
                    air.append(np.hstack([p0 + off, p1 + off, lum[:, None], lum[:, None]]))
            np.add.at(occ[0], cell_of(occ, np.vstack([mid, end])), 1.0)
            P, D, R, O, hil = split(pt, rng, end, D2, R, O, hil, occ, w)
            crowded = occ[0][cell_of(occ, P + D * (4.0 * R + 2.0)[:, None])] >= crowd   # twigs stop where
            P, D, R, O, hil = (v[(R >= rmin) & ~(crowded & (R < 1.2))] for v in (P, D, R, O, hil))   # space is full
            if len(R) == 0:
                break
    return np.vstack(tissue), np.vstack(air)


def render(vol, grid, segs, nsub, w, max_elems=2_000_000):
    """Max-composite capsules (rows x0 y0 z0 x1 y1 z1 r0 r1, patient mm) into vol (uint8 fraction x 255).

    Capsules are drawn in batches of equal (bucketed) bounding boxes, nsub planes per slice.
    """
    sp, shp = np.array(grid.spacing, F32), np.array(vol.shape)
    a, b = grid.to_q(segs[:, 0:3]).astype(F32), grid.to_q(segs[:, 3:6]).astype(F32)
    reach = np.maximum(segs[:, 6], segs[:, 7])[:, None] + w
    lo = np.floor((np.minimum(a, b) - reach) / sp).astype(int)
    hi = np.ceil((np.maximum(a, b) + reach) / sp).astype(int) + 1
    keep = np.all((hi > 0) & (lo < shp), 1)
    lo, hi = np.clip(lo, 0, shp - 1), np.clip(hi, 1, shp)
    ext = np.minimum(BUCKETS[np.minimum(np.searchsorted(BUCKETS, hi - lo), len(BUCKETS) - 1)], shp)
    lo, key = np.minimum(lo, shp - ext), (ext * [1 << 20, 1 << 10, 1]).sum(1)
    offs, flat = ((np.arange(nsub) + 0.5) / nsub - 0.5).astype(F32), vol.reshape(-1)

    def col(v):                                                              # (M,) -> (M, 1, 1, 1)
        return v.reshape(-1, 1, 1, 1).astype(F32)

    for kk in np.unique(key[keep]):
        idx = np.flatnonzero(keep & (key == kk))
        e = ext[idx[0]]
        step = max(1, max_elems // (int(e.prod()) * nsub))
        for sel in (idx[s:s + step] for s in range(0, len(idx), step)):
            iz, iy, ix = (lo[sel, m, None] + np.arange(e[m]) for m in range(3))
            f = capsule(((iz[:, :, None] + offs) * sp[0]).reshape(len(sel), -1, 1, 1), (iy * sp[1])[:, None, :, None],
                        (ix * sp[2])[:, None, None, :], [col(a[sel, m]) for m in range(3)],
                        [col(b[sel, m]) for m in range(3)], col(segs[sel, 6]), col(segs[sel, 7]), w)
            f = f.reshape(len(sel), e[0], nsub, e[1], e[2]).mean(2)
            lin, m = (iz[:, :, None, None] * shp[1] + iy[:, None, :, None]) * shp[2] + ix[:, None, None, :], f > 0.002
            np.maximum.at(flat, lin[m], (f[m] * 255.0 + 0.5).astype(np.uint8))


def composite(hu, frac, value):
    """hu <- hu + frac / 255 * (value - hu), slice by slice (frac: uint8)."""
    for k in range(len(hu)):
        if frac[k].any():
            hu[k] += frac[k] * F32(1 / 255) * (value - hu[k])


def ellipsoid(d, off, rot, semi, w):
    """Fraction inside an ellipsoid (offset, rotation, semi-axes mm) at offsets d = (dz, dy, dx) mm."""
    loc = [sum(rot[a, m] * (d[a] - off[a]) for a in range(3)) for m in range(3)]
    lev, rad = sum((c / s) ** 2 for c, s in zip(loc, semi)), np.sqrt(sum(c * c for c in loc))
    return ramp(np.where(lev < 0.25, 10.0, rad * (1.0 / np.sqrt(np.maximum(lev, 0.25)) - 1.0)), w)


def nodule_parts(rng, r):
    """Shape of a nodule of nominal radius r mm: (name, [(offset, rotation, semi-axes)], spikes)."""
    name = rng.choice(["sphere", "ellipsoid", "lobulated", "spiculated"],
                      p=[0.3, 0.3, 0.25, 0.15] if r >= 4.0 else [0.4, 0.4, 0.2, 0.0])
    zero, eye = np.zeros(3), np.eye(3)
    if name == "ellipsoid":
        s = rng.uniform(0.65, 1.5, 3)
        return name, [(zero, np.linalg.qr(rng.normal(size=(3, 3)))[0], r * s / np.cbrt(s.prod()))], []
    if name == "lobulated":                                                  # union of overlapping spheres
        return name, [(zero, eye, np.full(3, 0.7 * r))] + [
            (unit(rng.normal(size=3)) * rng.uniform(0.5, 0.8) * r, eye, np.full(3, rng.uniform(0.4, 0.65) * r))
            for _ in range(rng.integers(3, 7))], []
    if name == "spiculated":                                                 # core with thin tapering spikes
        return name, [(zero, eye, np.full(3, 0.85 * r))], [
            (0.6 * r * d, (0.85 + rng.uniform(0.4, 1.1)) * r * d, max(0.5, 0.15 * r), 0.25)
            for d in unit(rng.normal(size=(rng.integers(6, 15), 3)))]
    return name, [(zero, eye, np.full(3, r))], []


def draw_nodule(hu, grid, pt, rng, centre, parts, density, nsub, w):
    """Blend one nodule into hu where there is lung; max(old, blend) keeps vessels running through.

    Args:
        centre: patient mm. parts: from nodule_parts. density: (outer HU, core HU or None, core scale).
    Returns:
        centroid (continuous index x, y, z) and volume mm^3 of the drawn partial-volume fraction.
    """
    _, ells, spikes = parts
    reach = max([np.linalg.norm(o) + max(s) for o, _, s in ells] + [np.linalg.norm(b) + ra for _, b, ra, _ in spikes])
    c, sp = grid.to_q(np.asarray(centre, float)), np.array(grid.spacing)
    lo = np.maximum(np.floor((c - reach - 2 * w) / sp).astype(int), 0)
    hi = np.minimum(np.ceil((c + reach + 2 * w) / sp).astype(int) + 1, grid.shape)
    qz = ((np.arange(lo[0], hi[0])[:, None] + (np.arange(nsub) + 0.5) / nsub - 0.5) * sp[0]).reshape(-1, 1, 1)
    qy, qx = (np.arange(lo[1], hi[1]) * sp[1])[None, :, None], (np.arange(lo[2], hi[2]) * sp[2])[None, None, :]
    d, (outer, inner, k), f, core = (qz - c[0], qy - c[1], qx - c[2]), density, 0.0, 0.0
    for o, rot, semi in ells:
        f = np.maximum(f, ellipsoid(d, o, rot, semi, w))
        if inner is not None:                                                # part-solid: a solid core
            core = np.maximum(core, ellipsoid(d, o * k, rot, semi * k, w))
    for a, b, ra, rb in spikes:
        f = np.maximum(f, capsule(*d, a, b, ra, rb, w))
    f = f * pt.lung(*grid.from_q(qz, qy, qx), w)
    tex = ndimage.gaussian_filter(rng.standard_normal(f.shape), 1.0)
    val = outer + (0.0 if inner is None else core * (inner - outer))
    val = val + tex / tex.std() * (30.0 if outer < -200 else 10.0)           # inner texture
    box = hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    g, old = f.reshape(box.shape[0], nsub, *box.shape[1:]), box[:, None]
    box[...] = np.maximum(old, old + g * (val.reshape(g.shape) - old)).mean(1)
    tot = f.sum()
    cz, cy, cx = (float((f * q).sum() / tot) / s for q, s in zip((qz, qy, qx), sp))
    return (cx, cy, cz), float(tot * sp.prod() / nsub)


SPHERE = unit(np.array([[np.cos(a) * np.sqrt(1 - z * z), np.sin(a) * np.sqrt(1 - z * z), z]
                        for a, z in zip(np.arange(32) * 2.39996, np.linspace(-0.97, 0.97, 32))]))


def place(pt, rng, r, mode, taken, vessels, tubes, w):
    """Centre (patient mm) of a nodule of radius r: isolated, juxtapleural or juxtavascular; or None."""
    ac = pt.frame(0.0)[1]
    p = np.column_stack([rng.uniform(-ac, ac, 3000), rng.uniform(-pt.bc[0], pt.bc[1], 3000),
                         rng.uniform(0, pt.H, 3000)])
    a, ab = tubes[:, 0:3], tubes[:, 3:6] - tubes[:, 0:3]
    for c in p[pt.lung(*p.T, w) > 0.999][:80]:
        need = r + 1.5
        if mode == "pleural":                                                # march to the pleura, step back
            v = unit(rng.normal(size=3) * [1.0, 1.0, 0.3])
            ray = c + np.arange(0.0, 250.0, 0.5)[:, None] * v
            out = np.flatnonzero(pt.lung(*ray.T, w) < 0.5)
            if out.size == 0:
                continue
            c, need = ray[out[0]] - v * (0.25 + r * rng.uniform(0.25, 0.75)), 0.0
        elif mode == "vascular":                                             # touch a vessel from the side
            s = vessels[rng.integers(len(vessels))]
            side = unit(np.cross(s[3:6] - s[0:3], rng.normal(size=3)))
            c = 0.5 * (s[0:3] + s[3:6]) + side * (s[6] + r * rng.uniform(0.6, 0.95))
        t = np.clip(((c - a) * ab).sum(1) / np.maximum((ab * ab).sum(1), 1e-9), 0.0, 1.0)
        gap = (np.linalg.norm(c - a - t[:, None] * ab, axis=1) - tubes[:, 6:8].max(1)).min()   # great vessels
        if (pt.lung(*(c + need * SPHERE).T, w).min() > 0.99 and pt.lung(*c, w) > 0.99 and gap > r + 3.0
                and all(np.linalg.norm(c - q) > r + rq + 4.0 for q, rq in taken)):
            return c
    return None


def draw_findings(hu, grid, pt, rng, vessels, tubes, nsub, w):
    """Nodules (0-4, LUNA16-like sizes) and excluded findings: [(index xyz, diameter mm, excluded,
    location, texture)] (the last two empty for what is not a nodule)."""
    plan = [("nodule", float(np.clip(rng.lognormal(np.log(6.4), 0.62), 3.2, 30.0)))
            for _ in range(rng.choice(5, p=[0.15, 0.35, 0.25, 0.15, 0.10]))]
    plan += [("micro", rng.uniform(1.6, 2.9)) for _ in range(rng.choice(3, p=[0.5, 0.3, 0.2]))]
    plan += [("calcified", rng.uniform(3.0, 7.0)) for _ in range(int(rng.random() < 0.3))]
    near, taken, found = vessels[(vessels[:, 6] >= 1.0) & (vessels[:, 6] <= 4.0)], [], []
    for what, d in plan:
        modes = ["isolated", "pleural", "vascular"]
        mode = rng.choice(modes, p=[0.55, 0.25, 0.2]) if what == "nodule" and len(near) else "isolated"
        if (c := place(pt, rng, d / 2, mode, taken, near, tubes, w)) is None:
            continue
        taken.append((c, d / 2))
        solid, ggo = rng.uniform(-50.0, 80.0), rng.uniform(-700.0, -350.0)
        if what == "nodule":
            kind = rng.choice(3, p=[0.7, 0.12, 0.18])                        # solid, part-solid, ground glass
            density = [(solid, None, 0.0), (ggo, solid, rng.uniform(0.3, 0.6)), (ggo, None, 0.0)][kind]
            parts = nodule_parts(rng, d / 2)
        else:
            density = (rng.uniform(300.0, 900.0) if what == "calcified" else solid, None, 0.0)
            parts = ("sphere", [(np.zeros(3), np.eye(3), np.full(3, d / 2))], [])
        centroid, volume = draw_nodule(hu, grid, pt, rng, c, parts, density, nsub, w)
        dv = float(np.cbrt(6.0 * volume / np.pi))                            # volume-equivalent diameter
        kinds = (LOCATIONS[mode], TEXTURES[kind]) if what == "nodule" else ("", "")
        found.append((centroid, -1.0 if what == "calcified" else dv, what != "nodule" or dv < 3.0, *kinds))
    return found


def scanner(hu, grid, pt, rng):
    """Reconstruction: kernel (smooth or edge-enhancing), darkening near bone, correlated noise,
    reconstruction circle. Returns int16 HU (z, y, x)."""
    u, sx = rng.uniform, grid.spacing[2]
    sig, alpha = u(0.3, 0.8) / sx, (u(0.3, 0.9) if rng.random() < 0.4 else 0.0)
    wide = 1.6 * sig + 0.3
    x = np.arange(-int(2.5 * (wide if alpha else sig)) - 1, int(2.5 * (wide if alpha else sig)) + 2)
    g1, g2 = np.exp(-0.5 * (x / sig) ** 2), np.exp(-0.5 * (x / wide) ** 2)
    kern = (1 + alpha) * g1 / g1.sum() - alpha * g2 / g2.sum()                # separable unsharp-masked Gaussian
    rows, cols = (np.flatnonzero((hu[::8] > -995.0).any(axis=ax)) for ax in ((0, 2), (0, 1)))
    s = np.s_[:, max(rows[0] - 8, 0):rows[-1] + 9, max(cols[0] - 8, 0):cols[-1] + 9]   # all but plain air
    hu[s] = ndimage.correlate1d(ndimage.correlate1d(hu[s], kern, axis=1), kern, axis=2)
    dark = ndimage.gaussian_filter(np.maximum(hu[:, 1::4, 1::4] - 300.0, 0.0), (0, 2.5 / sx, 2.5 / sx))
    dark *= u(0.02, 0.06)                                                     # beam hardening, 4x coarser
    n, fc, aniso = 1024, u(0.12, 0.3), u(0.6, 1.0)                           # noise: ramp x Gaussian spectrum
    fr = np.hypot(np.fft.fftfreq(n)[:, None] * aniso, np.fft.rfftfreq(n)[None])
    spectrum = np.fft.rfft2(rng.standard_normal((2, n, n))) * np.sqrt(fr * np.exp(-(fr / fc) ** 2))
    tiles = np.fft.irfft2(spectrum, s=(n, n))
    tiles = (tiles / tiles.std(axis=(1, 2), keepdims=True)).astype(F32)
    x, y, _ = grid.plane(grid.zmid - pt.z_range[0])
    sigma = (u(10.0, 40.0) * (0.75 + 0.5 * np.exp(-(x / pt.ab) ** 2 - (y / pt.b[1]) ** 2))).astype(F32)
    o = rng.integers(0, 512, (len(hu), 3))
    for k in range(len(hu)):
        hu[k] += sigma * tiles[o[k, 2] % 2, o[k, 0]:o[k, 0] + 512, o[k, 1]:o[k, 1] + 512]
        hu[k] -= np.repeat(np.repeat(dark[k], 4, 0), 4, 1)                   # beam hardening near bone
    j, i = np.ogrid[:512, :512]
    out = np.rint(np.clip(hu, -1024.0, 3071.0, out=hu), out=hu).astype(np.int16)
    out[:, (j - 255.5) ** 2 + (i - 255.5) ** 2 > 256.0 ** 2] = rng.choice(PADS)
    return out


def make_scan(seed: int, index: int) -> tuple[sitk.Image, list]:
    """One scan from (seed, index): the image and rows (x, y, z world mm, diameter mm, excluded,
    location, texture)."""
    rng = np.random.default_rng([seed, index])
    grid, pt = draw_geometry(rng)
    w, nsub = grid.spacing[2], int(np.ceil(grid.spacing[0] / 1.26))
    hu = paint_volume(pt, grid, rng, nsub, w)
    tubes, tube_air, roots = central_tubes(pt, rng)
    vessels, air = grow_trees(pt, rng, roots, w)
    for segs, value in ((np.vstack([tubes, vessels]), pt.hu["blood"]), (np.vstack([tube_air, air]), -1000.0)):
        frac = np.zeros(grid.shape, np.uint8)
        render(frac, grid, segs, nsub, w)
        composite(hu, frac, value)
    found = draw_findings(hu, grid, pt, rng, vessels, tubes, nsub, w)
    img = sitk.GetImageFromArray(scanner(hu, grid, pt, rng))
    img.SetSpacing(grid.spacing[::-1])
    img.SetOrigin(grid.origin_xyz)
    img.SetDirection((grid.flip, 0, 0, 0, grid.flip, 0, 0, 0, 1))
    return img, [(*img.TransformContinuousIndexToPhysicalPoint(c), d, *rest) for c, d, *rest in found]


def write_scan(job):
    """Worker: make scan `index`, write <uid>.mhd/.raw into its folder; return uid, rows, seconds."""
    seed, index, folder = job
    start = time.perf_counter()
    img, rows = make_scan(seed, index)
    uid = f"1.3.6.1.4.1.99999.{seed}.{index}.{np.random.default_rng([seed, index, 1]).integers(10**11, 10**12)}"
    sitk.WriteImage(img, str(folder / f"{uid}.mhd"), False)
    return uid, rows, time.perf_counter() - start


def write_dataset(out: Path, scans: int, seed: int, workers: int, subsets: int, force: bool) -> list[float]:
    """Write `scans` scans in the LUNA16 layout into `out` (built in a sibling folder, then renamed)."""
    if out.exists() and not force:
        raise SystemExit(f"{out} exists; pass --force to replace it")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = [(seed, i, tmp / f"subset{i % subsets}") for i in range(scans)]
    for job in jobs:
        job[2].mkdir(parents=True, exist_ok=True)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(write_scan, jobs))
    else:
        results = [write_scan(job) for job in jobs]
    for name, excluded in (("annotations.csv", False), ("annotations_excluded.csv", True)):
        with open(tmp / name, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
            writer.writerows([uid, *(f"{v:.4f}" for v in r[:4])]
                             for uid, rows, _ in results for r in rows if r[4] == excluded)
    with open(tmp / "annotations_kinds.csv", "w", newline="") as fh:       # noduledet.data.kinds
        writer = csv.writer(fh)
        writer.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "location", "texture"])
        writer.writerows([uid, *(f"{v:.4f}" for v in r[:4]), *r[5:7]]
                         for uid, rows, _ in results for r in rows if not r[4])
    (tmp / "seriesuids.csv").write_text("".join(f"{uid}\n" for uid, _, _ in results))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return [t for _, _, t in results]


def write_preview(out: Path, png: Path, n: int = 8) -> None:
    """Axial slices through the first n nodules of OUT (W1500/L-600), annotation circled, zoom below."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    with open(out / "annotations.csv") as fh:
        rows = list(csv.DictReader(fh))[:n]
    fig = Figure(figsize=(16, 16))
    axes = fig.subplots(4, 4)
    for ax in axes.flat:
        ax.set_axis_off()
    for m, row in enumerate(rows):
        img = sitk.ReadImage(str(next(out.glob(f"subset*/{row['seriesuid']}.mhd"))))
        i, j, k = img.TransformPhysicalPointToContinuousIndex([float(row[c]) for c in ("coordX", "coordY", "coordZ")])
        arr = sitk.GetArrayViewFromImage(img)[int(round(k))]
        r, hu = float(row["diameter_mm"]) / 2 / img.GetSpacing()[0], arr[int(round(j)), int(round(i))]
        for ax, half in ((axes[2 * (m // 4), m % 4], None), (axes[2 * (m // 4) + 1, m % 4], max(24.0, 3 * r))):
            ax.imshow(arr, cmap="gray", vmin=-1350, vmax=150, interpolation="nearest")
            ax.add_patch(Circle((i, j), r + (8.0 if half is None else 2.0), fill=False, color="red", lw=1))
            if half:
                ax.set_xlim(i - half, i + half)
                ax.set_ylim(j + half, j - half)
        axes[2 * (m // 4), m % 4].set_title(f"...{row['seriesuid'][-6:]} d={float(row['diameter_mm']):.1f} mm, "
                                            f"centre {hu} HU, slice {img.GetSpacing()[2]} mm", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=80)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="dataset folder to create")
    parser.add_argument("--scans", type=int, help="number of scans (leave out to only preview OUT)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--subsets", type=int, default=10, help="subset0..subset{K-1}, scans dealt round-robin")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    parser.add_argument("--preview", type=Path, help="PNG of slices through the first 8 nodules")
    args = parser.parse_args(argv)
    if args.scans is None and args.preview is None:
        parser.error("give --scans N, or --preview PNG for an existing OUT")
    if args.scans is not None:
        start = time.perf_counter()
        times = write_dataset(args.out, args.scans, args.seed, args.workers, args.subsets, args.force)
        print(f"{args.scans} scans in {time.perf_counter() - start:.1f} s "
              f"({np.mean(times):.1f} s per scan per worker) -> {args.out}")
    if args.preview is not None:
        write_preview(args.out, args.preview)
        print(f"preview -> {args.preview}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
