"""``noduledet predict``: nodule candidates for any CT, in world millimetres, with pictures.

Inputs: ``.mhd`` files, ``.nii``/``.nii.gz`` files, DICOM series folders, folders of such files,
or a LUNA16 root (``subset*/``). Each scan goes: read -> lung mask -> lung-box crop of the lung
slices -> detector (batched slices, no autograd) -> 3D merge -> outputs.

``OUT/`` receives ``candidates.csv`` (LUNA16 format, every scan), ``summary.json`` (per scan:
status, candidate count, timing of each stage) and per scan ``<name>.json`` (each candidate's
world and voxel coordinates, slice, diameter, probability), ``<name>_top<k>.png`` (the top
candidates on their axial slices in a lung window) and, for Mask R-CNN checkpoints,
``<name>_mask.nii.gz`` aligned with the input's geometry. A scan without lung or without
candidates is reported as such. Everything is written beside ``OUT`` and renamed into place
when complete; an existing ``OUT`` is replaced only with ``force``.

Under ``torchrun`` the scans are shared out among the processes and rank 0 gathers one CSV.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from noduledet.config import EvalConfig
from noduledet.data.ct import CTVolume, ct_kind, read_ct, write_ct
from noduledet.data.luna16 import Findings, write_findings
from noduledet.data.lung import segment_lungs
from noduledet.errors import UserError
from noduledet.inference import Detector
from noduledet.merge import Candidate, merge_slices
from noduledet.staging import staged_dir

LUNG_WINDOW = (-1350.0, 150.0)  # width 1500, level -600: how radiologists read lung nodules


@dataclass
class ScanInput:
    path: Path
    name: str  # seriesuid for LUNA16, DICOM and MetaImage inputs; file name stem for NIfTI


def _dicom_series_uid(folder: Path) -> str | None:
    import pydicom

    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            return str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
        except Exception:  # not DICOM: try the next file
            continue
    return None


def expand_inputs(paths: list[str | Path]) -> list[ScanInput]:
    """Every scan named by ``paths`` (files, DICOM folders, folders of scans, LUNA16 roots)."""
    out: list[ScanInput] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p}: no such file or folder")
        if p.is_dir():
            luna = sorted(p.glob("subset*/*.mhd"))
            files = sorted(f for f in p.iterdir() if f.is_file() and ct_kind(f) in ("mhd", "nifti"))
            if luna or files:
                out += [ScanInput(f, _stem(f)) for f in (luna or files)]
            else:
                out.append(ScanInput(p, _dicom_series_uid(p) or p.name))
        elif ct_kind(p) in ("mhd", "nifti"):
            out.append(ScanInput(p, _stem(p)))
        else:
            raise UserError(f"{p}: unknown CT format (expected .mhd, .nii, .nii.gz, a DICOM folder or a LUNA16 root)")
    seen: dict[str, int] = {}
    for s in out:  # two inputs of one name (the same scan as mhd and DICOM, say) keep apart
        seen[s.name] = seen.get(s.name, 0) + 1
        if seen[s.name] > 1:
            s.name = f"{s.name}_{seen[s.name]}"
    if not out:
        raise UserError("no scans among the inputs")
    return out


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def predict_scan(detector: Detector, scan: ScanInput, out: Path, cfg: EvalConfig, series: str | None = None,
                 top: int = 5, pictures: bool = True, crop: bool = True) -> tuple[dict, list[Candidate]]:
    """Run one scan; write its JSON, pictures and mask into ``out``; return summary and candidates.

    ``crop=False`` runs the detector on every whole slice (the slow path the benchmarks compare).
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    volume = read_ct(scan.path, series)
    timings["read_s"] = time.perf_counter() - t
    t = time.perf_counter()
    lungs = segment_lungs(volume)
    timings["lung_mask_s"] = time.perf_counter() - t
    summary = {"name": scan.name, "path": str(scan.path), "shape_zyx": list(volume.hu.shape),
               "spacing_xyz": list(volume.geometry.spacing)}
    candidates: list[Candidate] = []
    detections = []
    if lungs.empty:
        summary["status"] = "no lung found: nothing to search"
    else:
        zs, ys, xs = lungs.crop(volume.geometry.spacing)
        slices = lungs.slices()
        if not crop:
            ys, xs, slices = slice(0, volume.hu.shape[1]), slice(0, volume.hu.shape[2]), range(volume.hu.shape[0])
        before = dict(detector.timings)
        t = time.perf_counter()
        detections = detector.detect(volume.hu, volume.geometry, slices, ys, xs)
        timings["slices_and_detector_s"] = time.perf_counter() - t
        timings["slice_preparation_s"] = detector.timings["prepare_s"] - before["prepare_s"]
        timings["detector_s"] = detector.timings["model_s"] - before["model_s"]
        t = time.perf_counter()
        candidates = merge_slices(detections, volume.geometry, cfg.link_mm, cfg.min_score)[: cfg.max_candidates]
        timings["merge_3d_s"] = time.perf_counter() - t
        summary.update(slices=len(slices), crop_yx=[ys.start, ys.stop, xs.start, xs.stop])
        above = sum(c.probability >= cfg.score_threshold for c in candidates)
        summary["status"] = (f"{len(candidates)} candidates, {above} with probability >= {cfg.score_threshold}"
                             if candidates else "no candidates")
    t = time.perf_counter()
    if pictures:
        for k, c in enumerate(candidates[:top]):
            overlay(volume, c, k + 1, out / f"{scan.name}_top{k + 1}.png")
    if detector.masks and candidates:
        write_mask(volume, candidates, detections, cfg.score_threshold, out / f"{scan.name}_mask.nii.gz")
    timings["outputs_s"] = time.perf_counter() - t
    summary["timings"] = {k: round(v, 3) for k, v in timings.items()}
    summary["seconds"] = round(sum(v for k, v in timings.items() if k not in ("slice_preparation_s", "detector_s")), 3)
    (out / f"{scan.name}.json").write_text(json.dumps({**summary, "candidates": [c.to_dict() for c in candidates]}, indent=1))
    return summary, candidates


def overlay(volume: CTVolume, c: Candidate, rank: int, path: Path, zoom_mm: float = 60.0) -> None:
    """The candidate's axial slice in a lung window: whole slice and a zoomed view, circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z, y, x = c.voxel_zyx
    k = int(np.clip(round(z), 0, volume.hu.shape[0] - 1))
    plane = volume.hu[k]
    sx, sy = volume.geometry.spacing[:2]
    r = max(c.diameter_mm / 2, 2.0)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
    for ax, zoom in zip(axes, (False, True)):
        ax.imshow(plane, cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1], aspect=sy / sx)
        ax.add_patch(plt.Circle((x, y), (r + 3) / sx, fill=False, color="#ff3b30", lw=1.4))
        if zoom:
            hx, hy = zoom_mm / 2 / sx, zoom_mm / 2 / sy
            ax.set_xlim(x - hx, x + hx)
            ax.set_ylim(y + hy, y - hy)
        ax.axis("off")
    w = c.world_xyz
    fig.suptitle(f"#{rank}  p={c.probability:.3f}  slice {k}  ({w[0]:.1f}, {w[1]:.1f}, {w[2]:.1f}) mm  "
                 f"~{c.diameter_mm:.1f} mm", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_mask(volume: CTVolume, candidates: list[Candidate], detections, threshold: float, path: Path) -> None:
    """Label volume (candidate rank, 1..255) from the Mask R-CNN masks, in the input geometry."""
    labels = np.zeros(volume.hu.shape, dtype=np.int16)
    for rank, c in enumerate(candidates[:255], start=1):
        if c.probability < threshold:
            continue
        for k, j in c.members:
            d = detections[k]
            if d.masks is None:
                continue
            y0, x0 = d.origin_yx
            m = d.masks[j]
            view = labels[d.z, y0:y0 + m.shape[0], x0:x0 + m.shape[1]]
            view[(m > 0) & (view == 0)] = rank
    write_ct(CTVolume(labels, volume.geometry), path)


def predict(inputs: list[str | Path], checkpoint: str | Path, out: str | Path, cfg: EvalConfig | None = None,
            series: str | None = None, top: int = 5, pictures: bool = True, force: bool = False,
            device: str = "auto", progress=None, log=print) -> list[dict]:
    """Predict every input scan; see the module docstring for what lands in ``out``."""
    from noduledet import engine

    cfg = cfg or EvalConfig()
    out = Path(out)
    scans = expand_inputs(inputs)
    detector = Detector.from_checkpoint(checkpoint, device, cfg.batch_size, cfg.engine)
    engine.init_distributed(detector.device)
    rank, world = engine.dist_info()
    with staged_dir(out, force, owner=rank == 0) as tmp:
        if world > 1:
            engine.dist.barrier()  # rank 0 has made the folder
        mine = scans[rank::world]
        results = []
        for scan in progress(mine) if (progress and rank == 0) else mine:
            summary, cands = predict_scan(detector, scan, tmp, cfg, series, top, pictures)
            results.append((summary, [(c.world_xyz.tolist(), c.probability) for c in cands]))
            if rank == 0 and log:
                log(f"{scan.name}: {summary['status']} ({summary['seconds']:.1f} s)")
        gathered = [r for part in engine.gather(results) for r in part]
        if rank == 0:
            rows = [(s["name"], xyz, p) for s, cands in gathered for xyz, p in cands]
            write_findings(tmp / "candidates.csv", Findings(
                np.array([r[0] for r in rows], dtype=str), np.array([r[1] for r in rows], dtype=float).reshape(-1, 3),
                np.array([r[2] for r in rows], dtype=float)), "probability")
            (tmp / "summary.json").write_text(json.dumps([s for s, _ in gathered], indent=1))
    if world > 1:
        engine.dist.barrier()  # rank 0 has renamed the folder
    return [s for s, _ in gathered] if rank == 0 else []
