"""``noduledet predict``: nodule candidates for any CT, in world millimetres, with pictures.

Inputs: ``.mhd`` files, ``.nii``/``.nii.gz`` files, DICOM series folders, folders of such files,
or a LUNA16 root (``subset*/``). Each scan goes through the ``Pipeline`` (read -> lung mask ->
scan region -> detector -> 3D merge) and its outputs land in ``OUT/<name>/`` as soon as it is
done (written beside, then renamed: a folder there is complete)::

    OUT/run.json              the inputs, checkpoint and settings of the run
    OUT/<name>/scan.json      status, timings, each candidate's world and voxel position, slice,
                              diameter estimate and probability
    OUT/<name>/candidates.csv the scan's rows in LUNA16 format
    OUT/<name>/top<k>.png     the top candidates on their axial slices in a lung window
    OUT/<name>/mask.nii.gz    with a Mask R-CNN checkpoint: the candidates' masks, in the input's geometry
    OUT/candidates.csv        every scan (LUNA16 format), and
    OUT/summary.json          every scan's status: both written last, from the scans' folders
    OUT/findings.csv          with ``operating_point``: only the candidates at or above the threshold
                              calibrated for that many false positives per scan (what a reader reviews)

An existing ``OUT`` is replaced only with ``force``. Under ``torchrun`` the scans are shared out
among the processes; rank 0 writes the two files at the end.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from noduledet import __version__, plots
from noduledet.data.ct import CTVolume, ct_kind, read_ct, write_ct
from noduledet.data.luna16 import PREDICTION_COLUMNS, Findings, read_findings, write_findings
from noduledet.distributed import barrier, rank_and_world, resolve_device
from noduledet.errors import UserError
from noduledet.geometry import voxel_to_pixel
from noduledet.merge import Candidate
from noduledet.metrics.froc import fp_label
from noduledet.pipeline import Pipeline, ScanResult, candidates_table
from noduledet.progress import track
from noduledet.staging import atomic_write, refuse_existing, staged_dir, write_json


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


def predict_scan(pipeline: Pipeline, scan: ScanInput, folder: Path, series: str | None = None, top: int = 5,
                 pictures: bool = True) -> dict:
    """Run one scan through the pipeline and write its outputs into ``folder`` (a staging folder,
    renamed by the caller); return its summary."""
    t = time.perf_counter()
    volume = read_ct(scan.path, series)
    read_s = time.perf_counter() - t
    result = pipeline.run_volume(volume)
    t = time.perf_counter()
    if pictures:
        for k, c in enumerate(result.candidates[:top]):
            draw_candidate(volume, c, k + 1, folder / f"top{k + 1}.png")
    if pipeline.detector.masks and result.candidates:
        write_mask(volume, result, folder / "mask.nii.gz")
    write_findings(folder / "candidates.csv", candidates_table({scan.name: result.candidates}), "probability")
    timings = {"read_s": read_s, **result.timings, "outputs_s": time.perf_counter() - t}
    parts = ("slice_preparation_s", "detector_s")  # inside slices_and_detector_s
    summary = {"name": scan.name, "path": str(scan.path), "shape_zyx": list(volume.hu.shape),
               "spacing_xyz": list(volume.geometry.spacing), "status": result.status,
               **_findings_at(pipeline.operating_points, result.candidates),
               "slices": len(result.region.lung_slices), "region_start_zyx": list(result.region.start_zyx),
               "region_shape_zyx": list(result.region.shape_zyx),
               "timings": {k: round(v, 3) for k, v in timings.items()},
               "seconds": round(sum(v for k, v in timings.items() if k not in parts), 3)}
    (folder / "scan.json").write_text(json.dumps({**summary, "candidates": [c.to_dict() for c in result.candidates]},
                                                 indent=1))
    return summary


def _findings_at(points: dict | None, candidates: list[Candidate]) -> dict:
    """How many candidates pass each calibrated operating point (nothing without them)."""
    if not points:
        return {}
    return {"findings_at_fp_per_scan": {fp_label(r): sum(c.probability >= t for c in candidates)
                                        for r, t in zip(points["fp_rates"], points["thresholds"])}}


def operating_threshold(points: dict | None, rate: float, checkpoint: str | Path) -> float:
    """The probability threshold calibrated for ``rate`` false positives per scan."""
    if not points:
        raise UserError(f"{checkpoint}: no calibrated operating points (a run without a second stage or without "
                        f"validation scans); use --score-threshold")
    if rate not in points["fp_rates"]:
        raise UserError(f"--operating-point {rate:g}: this checkpoint has {', '.join(f'{r:g}' for r in points['fp_rates'])}"
                        f" false positives per scan")
    return points["thresholds"][points["fp_rates"].index(rate)]


def draw_candidate(volume: CTVolume, c: Candidate, rank: int, path: Path) -> None:
    """The candidate's axial slice in a lung window, whole and zoomed, circled."""
    k = int(np.clip(round(c.voxel_zyx[0]), 0, volume.hu.shape[0] - 1))
    w = c.world_xyz
    title = (f"#{rank}  p={c.probability:.3f}  slice {k}  ({w[0]:.1f}, {w[1]:.1f}, {w[2]:.1f}) mm  "
             f"~{c.diameter_mm:.1f} mm")
    plots.candidate(volume.hu[k], volume.geometry.spacing[:2], voxel_to_pixel(c.voxel_zyx[1:]),
                    max(c.diameter_mm / 2, 2.0), title, path)


def write_mask(volume: CTVolume, result: ScanResult, path: Path) -> None:
    """Label volume (candidate rank, 1..255) from the Mask R-CNN masks of the candidates at the
    operating point, in the input's geometry."""
    labels = np.zeros(volume.hu.shape, dtype=np.int16)
    z0, y0, x0 = result.region.start_zyx
    for rank, c in enumerate(result.candidates[:255], start=1):
        if c.probability < result.threshold:
            continue
        for k, j in c.members:
            d = result.detections[k]
            if d.masks is None:
                continue
            m = d.masks[j]
            y, x = y0 + d.origin_yx[0], x0 + d.origin_yx[1]
            view = labels[z0 + d.z, y:y + m.shape[0], x:x + m.shape[1]]
            view[(m > 0) & (view == 0)] = rank
    write_ct(CTVolume(labels, volume.geometry), path)


def collect(out: Path, scans: list[ScanInput], threshold: float | None = None) -> list[dict]:
    """Rebuild ``candidates.csv`` and ``summary.json`` (and, with a ``threshold``, ``findings.csv``)
    from the scans' folders; return the summaries."""
    summaries, tables = [], []
    for scan in scans:
        folder = out / scan.name
        summaries.append({k: v for k, v in json.loads((folder / "scan.json").read_text()).items() if k != "candidates"})
        tables.append(read_findings(folder / "candidates.csv", PREDICTION_COLUMNS))
    table = Findings(np.concatenate([t.uids for t in tables]), np.concatenate([t.xyz for t in tables]).reshape(-1, 3),
                     np.concatenate([t.value for t in tables]))
    atomic_write(out / "candidates.csv", lambda tmp: write_findings(tmp, table, "probability"))
    if threshold is not None:
        atomic_write(out / "findings.csv", lambda tmp: write_findings(tmp, table.select(table.value >= threshold),
                                                                     "probability"))
    write_json(out / "summary.json", summaries)
    return summaries


def predict(inputs: list[str | Path], checkpoint: str | Path, out: str | Path, overrides: dict | None = None,
            series: str | None = None, top: int = 5, pictures: bool = True, force: bool = False,
            device: str = "auto", operating_point: float | None = None, progress=None, log=print) -> list[dict]:
    """Predict every input scan; see the module docstring for what lands in ``out``.

    Args:
        overrides: ``EvalConfig`` fields replacing the checkpoint's (score_threshold, batch_size, ...).
        operating_point: false positives per scan of a calibrated operating point: its findings
            go to ``findings.csv`` and the scans' status counts them.

    Returns:
        Every scan's summary (on rank 0; the other ranks return an empty list).
    """
    out = Path(out)
    scans = expand_inputs(inputs)
    pipeline = Pipeline.from_checkpoint(checkpoint, resolve_device(device), **(overrides or {}))
    threshold = None
    if operating_point is not None:
        threshold = operating_threshold(pipeline.operating_points, operating_point, checkpoint)
        pipeline.settings = replace(pipeline.settings, score_threshold=threshold)
    rank, world = rank_and_world()
    if rank == 0:
        refuse_existing(out, force)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        write_json(out / "run.json", {"noduledet": __version__, "checkpoint": str(checkpoint),
                                      "settings": pipeline.settings.__dict__, "series": series,
                                      "inputs": [str(s.path) for s in scans], "names": [s.name for s in scans]})
    barrier()
    for scan in track(progress if rank == 0 else None, scans[rank::world]):
        with staged_dir(out / scan.name) as folder:
            summary = predict_scan(pipeline, scan, folder, series, top, pictures)
        if rank == 0 and log:
            log(f"{scan.name}: {summary['status']} ({summary['seconds']:.1f} s)")
    barrier()
    return collect(out, scans, threshold) if rank == 0 else []
