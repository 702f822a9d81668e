"""The preprocessing cache (``noduledet prepare``): each scan read once, cut to its region.

```
CACHE/
  manifest.json          version, region settings, the data's identity, scans done
  scans/<uid>.npy        int16 HU of the scan region (z, y, x), memory-mapped by training
  scans/<uid>.json       region geometry (world placement), lung slices, nodules in region voxels
  scans/<uid>.masks.npz  LIDC consensus outlines of the scan's nodules, when it has some
```

The region is the one ``predict`` looks at (``LungMask.region`` with ``DataConfig``'s margins),
so evaluating from the cache and predicting from the file run the same pipeline on the same
voxels. A scan's files are written under temporary names and renamed, its ``.json`` last, so an
interrupted ``prepare`` resumes where it stopped. A cache made with other settings, other scans
or other annotation files is refused, never mixed; moving the data folder does not matter.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from noduledet.config import DataConfig
from noduledet.data.ct import read_ct
from noduledet.data.luna16 import Luna16
from noduledet.data.lung import ScanRegion, segment_lungs
from noduledet.data.slices import Nodule
from noduledet.errors import UserError
from noduledet.geometry import Geometry
from noduledet.progress import track
from noduledet.staging import atomic_write, write_json

CACHE_VERSION = 2


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:16]


def data_identity(data: Luna16) -> dict:
    """What makes two data folders the same for a cache: their scans and annotation files."""
    exc = data.csv_path("annotations_excluded.csv", required=False)
    return {"scans_sha1": _digest("\n".join(data.uids).encode()),
            "annotations_sha1": _digest(data.csv_path("annotations.csv").read_bytes()),
            "excluded_sha1": _digest(exc.read_bytes()) if exc else None}


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


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


def _match_outline(world_xyz: np.ndarray, radius: float, outlines: list[dict], geometry: Geometry) -> dict | None:
    """The outline whose centroid lies nearest the annotation, within its radius + 5 mm."""
    best, best_d = None, radius + 5.0
    for o in outlines:
        x, y, z = o["centroid"]
        d = float(np.linalg.norm(geometry.voxel_to_world([geometry.slice_index(z), y, x])[:2] - world_xyz[:2]))
        d = float(np.hypot(d, z - world_xyz[2]))
        if d < best_d:
            best, best_d = o, d
    return best


def _outline_volume(outline: dict, geometry: Geometry, start_zyx) -> tuple[int, int, int, np.ndarray]:
    """The outline as a (z0, y0, x0, bool (z, y, x)) patch in the frame of a crop at ``start_zyx``."""
    ks = [geometry.slice_index(z) for z, *_ in outline["slices"]]
    r0 = min(r for _, r, _, _ in outline["slices"])
    c0 = min(c for _, _, c, _ in outline["slices"])
    r1 = max(r + m.shape[0] for _, r, _, m in outline["slices"])
    c1 = max(c + m.shape[1] for _, _, c, m in outline["slices"])
    mask = np.zeros((max(ks) - min(ks) + 1, r1 - r0, c1 - c0), dtype=bool)
    for k, (_, r, c, m) in zip(ks, outline["slices"]):
        mask[k - min(ks), r - r0:r - r0 + m.shape[0], c - c0:c - c0 + m.shape[1]] |= m
    return min(ks) - start_zyx[0], r0 - start_zyx[1], c0 - start_zyx[2], mask


def _prepare_scan(job) -> str:
    (uid, mhd, subset, out_dir, data_cfg, ann, exc, outlines) = job
    volume = read_ct(mhd)
    g = volume.geometry
    region = segment_lungs(volume).region(g.spacing, data_cfg.margin_mm, data_cfg.z_margin_mm)
    z0, y0, x0 = region.start_zyx
    crop = g.crop(region.start_zyx, region.shape_zyx)
    _save_npy(out_dir / f"{uid}.npy", np.ascontiguousarray(volume.hu[region.index()]))
    nodules, masks = [], {}
    for i, (xyz, d) in enumerate(ann):
        entry = {"world_xyz": list(xyz), "center_zyx": crop.world_to_voxel(xyz).tolist(), "diameter_mm": d, "mask": None}
        o = _match_outline(np.asarray(xyz), d / 2, outlines, g) if outlines else None
        if o is not None:
            mz, my, mx, masks[f"nodule{i}"] = _outline_volume(o, g, (z0, y0, x0))
            entry["mask"] = {"key": f"nodule{i}", "z0": mz, "y0": my, "x0": mx}
        nodules.append(entry)
    if masks:
        atomic_write(out_dir / f"{uid}.masks.npz", lambda tmp: np.savez_compressed(open(tmp, "wb"), **masks))
    meta = {
        "uid": uid, "subset": subset, "source": str(mhd), "full_shape": list(g.shape),
        "crop_start": list(region.start_zyx), "geometry": crop.to_dict(), "lung_slices": list(region.lung_slices),
        "nodules": nodules,
        "excluded": [{"world_xyz": list(xyz), "center_zyx": crop.world_to_voxel(xyz).tolist(), "diameter_mm": d}
                     for xyz, d in exc],
    }
    write_json(out_dir / f"{uid}.json", meta)
    return uid


def _manifest(data: Luna16, data_cfg: DataConfig) -> dict:
    return {"version": CACHE_VERSION, "settings": data_cfg.region_settings(), **data_identity(data),
            "data_root": str(data.root.resolve())}


def prepare(data_root: str | Path, cache_dir: str | Path, data_cfg: DataConfig | None = None,
            workers: int = 1, force: bool = False, progress=None) -> dict:
    """Read every scan of a LUNA16-layout folder once and cache its region.

    Args:
        data_root: LUNA16 layout (real or phantom).
        cache_dir: the cache folder (created; resumed if made with the same settings and data).
        data_cfg: the region's margins and whether LIDC outlines are used (default ``DataConfig()``).
        workers: processes.
        force: rebuild a cache made with other settings or data.
        progress: a progress reporter (``noduledet.progress``) or None.

    Returns:
        The manifest.
    """
    data_cfg = data_cfg or DataConfig()
    data = Luna16(data_root)
    annotations, excluded = data.annotations(), data.excluded()
    cache_dir = Path(cache_dir)
    manifest = _manifest(data, data_cfg)
    path = cache_dir / "manifest.json"
    if path.exists():
        differs = cache_mismatch(cache_dir, data_cfg, data)
        if differs and not force:
            raise UserError(f"{cache_dir}: a cache made with {', '.join(differs)}; "
                            f"use another --cache folder or pass --force to rebuild it")
        if differs:
            shutil.rmtree(cache_dir)
    scans_dir = cache_dir / "scans"
    scans_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, {**manifest, "complete": False, "scans": []})
    todo = [u for u in data.uids if not (scans_dir / f"{u}.json").exists()]
    outlines = lidc_outlines(todo) if data_cfg.lidc_masks and todo else {}
    jobs = []
    for uid in todo:
        a, e = annotations.for_scan(uid), excluded.for_scan(uid)
        jobs.append((uid, data.scan_path(uid), data.subset_of[uid], scans_dir, data_cfg,
                     list(zip(a.xyz.tolist(), a.value.tolist())), list(zip(e.xyz.tolist(), e.value.tolist())),
                     outlines.get(uid, [])))
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            for _ in track(progress, pool.map(_prepare_scan, jobs), total=len(jobs)):
                pass
    else:
        for job in track(progress, jobs, total=len(jobs)):
            _prepare_scan(job)
    manifest.update(complete=True, scans=data.uids)
    write_json(path, manifest)
    return manifest


def cache_ready(cache_dir: str | Path) -> bool:
    """True when ``cache_dir`` holds a complete prepared cache."""
    manifest = Path(cache_dir) / "manifest.json"
    return manifest.is_file() and bool(json.loads(manifest.read_text()).get("complete"))


def cache_mismatch(cache_dir: str | Path, data_cfg: DataConfig, data: Luna16 | None = None) -> list[str]:
    """How the complete cache in ``cache_dir`` differs from one made of ``data`` with
    ``data_cfg``'s region settings, in words (nothing: it serves); without ``data``, its version
    and region settings alone are compared."""
    old = json.loads((Path(cache_dir) / "manifest.json").read_text())
    out = [] if old.get("version") == CACHE_VERSION else [
        f"cache version {old.get('version')} (this noduledet: {CACHE_VERSION})"]
    settings = old.get("settings", {})
    out += [f"data.{k}={settings.get(k)!r} (the config: {v!r})" for k, v in data_cfg.region_settings().items()
            if settings.get(k) != v]
    if data is not None:
        names = {"scans_sha1": "other scans", "annotations_sha1": "another annotations.csv",
                 "excluded_sha1": "another annotations_excluded.csv"}
        out += [names[k] for k, v in data_identity(data).items() if old.get(k) != v]
    return out


def cache_serves(cache_dir: str | Path, data: Luna16, data_cfg: DataConfig) -> bool:
    """True when ``cache_dir`` is a complete cache of ``data`` made with ``data_cfg``'s settings."""
    return cache_ready(cache_dir) and not cache_mismatch(cache_dir, data_cfg, data)


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
        """The geometry of the cached region."""
        return Geometry.from_dict(self.meta(uid)["geometry"])

    def region(self, uid: str) -> ScanRegion:
        """Where the cached region lies in the scan, and its lung slices."""
        meta = self.meta(uid)
        return ScanRegion(tuple(meta["crop_start"]), tuple(meta["geometry"]["shape"]), tuple(meta["lung_slices"]))

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
