"""``noduledet predict``: nodule candidates for any CT, in world millimetres, where they are read.

Inputs: ``.mhd`` files, ``.nii``/``.nii.gz`` files, DICOM series folders, folders of such files,
a LUNA16 root (``subset*/``), a manifest (one path a line) or a series on a DICOMweb server
(a PACS). Each scan goes through the ``Pipeline`` (read -> lung mask -> scan region -> stage one
-> 3D merge -> stage two) and its outputs land in ``OUT/<name>/`` as soon as it is done
(written beside, then renamed: a folder there is complete)::

    OUT/<name>/scan.json      status, timings, the findings counted at each operating point, each
                              candidate's world and voxel position, slice, diameter and probability
    OUT/<name>/candidates.csv the scan's rows in LUNA16 format
    OUT/<name>/top<k>.png     the top candidates on their axial slices in a lung window
    OUT/<name>/mask.nii.gz    with a Mask R-CNN checkpoint: the findings' masks, in the input's geometry
    OUT/<name>/sr.dcm         for a DICOM input with findings: a TID 1500 measurement report
    OUT/<name>/seg.dcm        ... and, with a Mask R-CNN checkpoint, a DICOM segmentation
    OUT/index.html            an offline viewer of the findings of every scan

``OUT/run.json``, ``candidates.csv``, ``summary.json`` and ``findings.csv`` are the run's
(``noduledet.batch``: resume, shards, gather). The findings (SR, SEG, ``findings.csv``, the viewer)
are the candidates a reader is shown, chosen by one rule, which ``run.json`` and every
``scan.json`` record (``findings_rule``): ``--operating-point`` (calibrated on validation scans: a
threshold and at most as many findings per scan as the busiest validation scan had there), else
``--score-threshold``, else the 1 false-positive-per-scan operating point of a calibrated
checkpoint, else the checkpoint's ``eval.score_threshold`` (0.5).

Reports never block detection: a DICOM series lacking what an SR or SEG needs
(``clinical.source.REPORT_ATTRIBUTES``) still gets its candidates, pictures and viewer; its
reports are skipped with one warning line, and ``scan.json`` says why (``reports``).
Under ``torchrun`` the scans are shared out among the processes; rank 0 merges at the end.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from noduledet import plots
from noduledet.batch import (ScanInput, done, expand_inputs, failures, merge, open_run, read_manifest,
                             record_failure, run_record)
from noduledet.candidates import Candidate
from noduledet.data.ct import CTVolume, read_ct, write_ct
from noduledet.data.luna16 import write_findings
from noduledet.distributed import barrier, rank_and_world, resolve_device
from noduledet.errors import NoSpaceError, UserError
from noduledet.geometry import voxel_to_pixel
from noduledet.metrics.froc import fp_label, max_findings
from noduledet.pipeline import Pipeline, ScanResult, candidates_table
from noduledet.progress import track
from noduledet.records import write_scan_record
from noduledet.staging import staged_dir, write_text

__all__ = ["PredictOptions", "ScanInput", "expand_inputs", "predict", "predict_scan"]


MAX_LABEL = 255  # findings with a mask in mask.nii.gz and seg.dcm, the most probable first
DEFAULT_OPERATING_POINT = 1.0  # false positives per scan of the findings of a calibrated checkpoint


@dataclass(frozen=True)
class PredictOptions:
    """What a predict run writes besides the candidates (recorded in ``run.json``)."""

    series: str | None = None  # SeriesInstanceUID to read from a DICOM folder holding several
    top: int = 5  # pictures of the most probable candidates per scan
    pictures: bool = True
    operating_point: float | None = None  # false positives per scan of a calibrated operating point
    threshold: float = 0.5  # the findings' probability threshold (the operating point's when given)
    max_findings: int = 0  # findings per scan at most, the most probable (the operating point's; 0: no limit)
    reports: bool = True  # DICOM SR (and SEG) for DICOM inputs
    viewer: bool = True  # OUT/index.html
    rule: str = ""  # which rule chose threshold and max_findings, in words (``choose_findings``)

    def findings(self, candidates: list[Candidate]) -> list[Candidate]:
        """The candidates (most probable first) a reader is shown: at or above the threshold,
        at most ``max_findings``."""
        kept = [c for c in candidates if c.probability >= self.threshold]
        return kept[:self.max_findings] if self.max_findings else kept


def _findings_at(points: dict | None, candidates: list[Candidate]) -> dict:
    """How many findings each calibrated operating point gives (nothing without them)."""
    if not points:
        return {}
    counts = {fp_label(r): len(PredictOptions(threshold=t, max_findings=n).findings(candidates))
              for r, t, n in zip(points["fp_rates"], points["thresholds"], max_findings(points))}
    return {"findings_at_fp_per_scan": counts}


def operating_point(points: dict | None, rate: float, checkpoint: str | Path) -> tuple[float, int]:
    """The probability threshold calibrated for ``rate`` false positives per scan, and the
    findings per scan at most there."""
    if not points:
        raise UserError(f"{checkpoint}: no calibrated operating points (a run without a second stage or without "
                        f"validation scans); use --score-threshold")
    if rate not in points["fp_rates"]:
        raise UserError(f"--operating-point {rate:g}: this checkpoint has {', '.join(f'{r:g}' for r in points['fp_rates'])}"
                        f" false positives per scan")
    k = points["fp_rates"].index(rate)
    return points["thresholds"][k], max_findings(points)[k]


def choose_findings(pipeline: Pipeline, options: PredictOptions, score_threshold_given: bool,
                    checkpoint: str | Path) -> PredictOptions:
    """``options`` with the findings' threshold, limit and rule (module docstring): the operating
    point asked for, else a ``--score-threshold`` given, else ``DEFAULT_OPERATING_POINT`` of a
    calibrated checkpoint, else the checkpoint's threshold. The threshold also becomes
    ``pipeline.settings.score_threshold``, at which each scan's status counts."""
    points, rate = pipeline.operating_points, options.operating_point
    if rate is not None and score_threshold_given:
        raise UserError("--operating-point and --score-threshold both choose the findings; pass one of them")
    chosen_by = "--operating-point"
    if rate is None and not score_threshold_given and points and DEFAULT_OPERATING_POINT in points["fp_rates"]:
        rate, chosen_by = DEFAULT_OPERATING_POINT, "the default of a calibrated checkpoint"
    if rate is None:
        threshold = pipeline.settings.score_threshold
        rule = (f"--score-threshold {threshold:g}" if score_threshold_given else
                f"probability >= {threshold:g}, the checkpoint's eval.score_threshold (it has no calibrated "
                f"operating points)")
        return replace(options, threshold=threshold, max_findings=0, rule=rule)
    threshold, most = operating_point(points, rate, checkpoint)
    pipeline.settings = replace(pipeline.settings, score_threshold=threshold)
    rule = (f"operating point {fp_label(rate)} false positive(s) per scan ({chosen_by}): probability >= "
            f"{threshold:.4g}" + (f", at most {most} per scan" if most else ""))
    return replace(options, operating_point=rate, threshold=threshold, max_findings=most, rule=rule)


def predict_scan(pipeline: Pipeline, scan: ScanInput, folder: Path, options: PredictOptions = PredictOptions()) -> dict:
    """Run one scan through the pipeline and write its outputs into ``folder`` (a staging folder,
    renamed by the caller); return its summary."""
    t = time.perf_counter()
    volume = read_ct(scan.path, options.series)
    read_s = time.perf_counter() - t
    result = pipeline.run_volume(volume)
    t = time.perf_counter()
    if options.pictures:
        for k, c in enumerate(result.candidates[:options.top]):
            draw_candidate(volume, c, k + 1, folder / f"top{k + 1}.png")
    findings = options.findings(result.candidates)
    labels = label_volume(volume, result, findings) if pipeline.detector.masks and result.candidates else None
    if labels is not None:
        write_ct(CTVolume(labels, volume.geometry), folder / "mask.nii.gz")
    write_findings(folder / "candidates.csv", candidates_table({scan.name: result.candidates}), "probability")
    reports = write_reports(scan, findings, labels, volume, folder, options) if options.reports and scan.path.is_dir() \
        else None
    if options.viewer:
        write_viewer_payload(scan, volume, findings, folder)
    timings = {"read_s": read_s, **result.timings, "outputs_s": time.perf_counter() - t}
    parts = ("slice_preparation_s", "detector_s")  # inside slices_and_detector_s
    summary = {"name": scan.name, "path": str(scan.path), "shape_zyx": list(volume.hu.shape),
               "spacing_xyz": list(volume.geometry.spacing), "status": result.status,
               **_findings_at(pipeline.operating_points, result.candidates),
               "findings": len(findings), "findings_rule": options.rule, "reports": reports,
               "slices": len(result.region.lung_slices), "region_start_zyx": list(result.region.start_zyx),
               "region_shape_zyx": list(result.region.shape_zyx),
               "timings": {k: round(v, 3) for k, v in timings.items()},
               "seconds": round(sum(v for k, v in timings.items() if k not in parts), 3)}
    write_scan_record(folder, summary, [c.to_dict() for c in result.candidates])
    return summary


def draw_candidate(volume: CTVolume, c: Candidate, rank: int, path: Path) -> list[tuple[int, int]]:
    """The candidate's axial slice in a lung window, whole and zoomed, circled; the (row, col) of
    the PNG where its centre lies in each panel (``plots.candidate``)."""
    k = int(np.clip(round(c.voxel_zyx[0]), 0, volume.hu.shape[0] - 1))
    w = c.world_xyz
    title = (f"#{rank}  p={c.probability:.3f}  slice {k}  ({w[0]:.1f}, {w[1]:.1f}, {w[2]:.1f}) mm  "
             f"~{c.diameter_mm:.1f} mm")
    return plots.candidate(volume.hu[k], volume.geometry.spacing[:2], voxel_to_pixel(c.voxel_zyx[1:]),
                           max(c.diameter_mm / 2, 2.0), title, path)


def label_volume(volume: CTVolume, result: ScanResult, findings: list[Candidate]) -> np.ndarray:
    """Label volume (finding rank, 1..MAX_LABEL) from the Mask R-CNN masks of ``findings`` (the
    result's, most probable first), in the input's geometry; a blob-filter spot (no slice masks) is
    the ball of its size."""
    labels = np.zeros(volume.hu.shape, dtype=np.int16)
    z0, y0, x0 = result.region.start_zyx
    for rank, c in enumerate(findings[:MAX_LABEL], start=1):
        if not c.members:
            label_ball(labels, c, volume.geometry.spacing, rank)
        for k, j in c.members:
            d = result.detections[k]
            if d.masks is None:
                continue
            m = d.masks[j]
            y, x = y0 + d.origin_yx[0], x0 + d.origin_yx[1]
            view = labels[z0 + d.z, y:y + m.shape[0], x:x + m.shape[1]]
            view[(m > 0) & (view == 0)] = rank
    return labels


def label_ball(labels: np.ndarray, c: Candidate, spacing_xyz, rank: int) -> None:
    """Set the unlabelled voxels within ``c.diameter_mm / 2`` of the candidate's centre to ``rank``."""
    sx, sy, sz = spacing_xyz
    step = np.array([sz, sy, sx])
    r = c.diameter_mm / 2
    lo = np.clip(np.floor(c.voxel_zyx - r / step).astype(int), 0, labels.shape)
    hi = np.clip(np.ceil(c.voxel_zyx + r / step).astype(int) + 1, 0, labels.shape)
    z, y, x = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    dz, dy, dx = (z - c.voxel_zyx[0]) * sz, (y - c.voxel_zyx[1]) * sy, (x - c.voxel_zyx[2]) * sx
    view = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    view[(dz ** 2 + dy ** 2 + dx ** 2 <= r * r) & (view == 0)] = rank


def write_reports(scan: ScanInput, findings: list[Candidate], labels: np.ndarray | None, volume: CTVolume,
                  folder: Path, options: PredictOptions) -> dict:
    """For a DICOM input with ``findings``: ``sr.dcm`` (TID 1500) and, with masks, ``seg.dcm``.

    Returns:
        {"sr": written?, "seg": written?, "skipped": why neither was written although there are
        findings (the series lacks an attribute they need), else None}.
    """
    from noduledet.clinical import findings_from_candidates
    from noduledet.clinical.seg import label_volumes_mm3, write_seg
    from noduledet.clinical.source import missing_for_reports, series_headers
    from noduledet.clinical.sr import write_sr

    volumes = label_volumes_mm3(labels, volume.geometry.spacing) if labels is not None else None
    findings = findings_from_candidates([c.to_dict() for c in findings], options.threshold, volumes)
    if not findings:
        return {"sr": False, "seg": False, "skipped": None}  # a TID 1500 report needs a finding
    sources = series_headers(scan.path, options.series)
    missing = missing_for_reports(sources)
    if missing:
        return {"sr": False, "seg": False, "skipped": f"the series has no {missing}, which an SR and a SEG need"}
    write_sr(findings, sources, folder / "sr.dcm")
    seg = labels is not None and bool(labels.any())
    if seg:
        write_seg(labels, findings[:MAX_LABEL], sources, folder / "seg.dcm")  # label_volume's ranks
    return {"sr": True, "seg": seg, "skipped": None}


def write_viewer_payload(scan: ScanInput, volume: CTVolume, findings: list[Candidate], folder: Path) -> None:
    """The scan's part of ``OUT/index.html``: its findings and the slices around them."""
    from noduledet.clinical.viewer import ViewerScan, scan_payload

    payload = scan_payload(ViewerScan(scan.name, volume.hu, volume.geometry.spacing, [c.to_dict() for c in findings]))
    (folder / "viewer.json").write_text(json.dumps(payload, separators=(",", ":")))


def finish(out: Path, names: list[str], options: PredictOptions) -> list[dict]:
    """The run's merged files and viewer from the scans' folders, once every scan is done; else a
    one-line error naming what failed (the finished scans stay for ``--resume``)."""
    failed = failures(out, names)
    if failed:
        first = next(iter(failed.values()))
        if len(names) == 1:
            raise UserError(first)
        raise UserError(f"{out}: {len(failed)} of {len(names)} scans failed (first: {first}); the others are "
                        f"written; see {out / 'failed'}, fix them and rerun with --resume")
    summaries = merge([out / n for n in names], out, options.threshold, options.max_findings)
    if options.viewer:
        from noduledet.clinical.viewer import page

        payloads = [json.loads((out / n / "viewer.json").read_text()) for n in names]
        write_text(out / "index.html", page(payloads))
    return summaries


def _predict_one(pipeline: Pipeline, scan: ScanInput, out: Path, options: PredictOptions, log) -> None:
    """One scan into ``out/<name>``; a user error is recorded in ``out/failed`` and the run goes on
    (a full disk stops it)."""
    try:
        with staged_dir(out / scan.name, force=True) as folder:
            summary = predict_scan(pipeline, scan, folder, options)
    except NoSpaceError:
        raise
    except UserError as e:
        record_failure(out, scan.name, str(e))
        if log:
            log(f"{scan.name}: failed: {e}")
        return
    record_failure(out, scan.name, None)
    if log:
        log(f"{scan.name}: {summary['status']} ({summary['seconds']:.1f} s)")
        if summary["reports"] and summary["reports"]["skipped"]:
            log(f"{scan.name}: warning: no SR or SEG: {summary['reports']['skipped']} (the candidates, pictures "
                f"and viewer are written)")


def predict(inputs: list[str | Path], checkpoint: str | Path, out: str | Path, overrides: dict | None = None,
            options: PredictOptions = PredictOptions(), force: bool = False, resume: bool = False,
            shard: tuple[int, int] | None = None, manifest: str | Path | None = None, device: str = "auto",
            progress=None, log=print) -> list[dict]:
    """Predict every input scan; see the module docstring for what lands in ``out``.

    Args:
        overrides: ``EvalConfig`` fields replacing the checkpoint's (score_threshold, batch_size, ...).
        options: pictures, reports, viewer and the operating point.
        resume: skip the scans ``out`` already holds (the run must be the same).
        shard: (I, N): every N-th scan of the sorted manifest, from the I-th.
        manifest: a file listing more inputs, one a line.

    Returns:
        The summaries of the scans of this run (on rank 0; the other ranks return an empty list).
    """
    out, checkpoint = Path(out), Path(checkpoint)
    scans = expand_inputs(list(inputs) + (read_manifest(manifest) if manifest else []))
    pipeline = Pipeline.from_checkpoint(checkpoint, resolve_device(device), **(overrides or {}))
    options = choose_findings(pipeline, options, "score_threshold" in (overrides or {}), checkpoint)
    if rank_and_world()[0] == 0 and log:
        log(f"findings: {options.rule}")
    mine = scans[shard[0]::shard[1]] if shard else scans
    rank, world = rank_and_world()
    if rank == 0:
        open_run(out, run_record(checkpoint, asdict(pipeline.settings), asdict(options), scans, shard), force, resume)
    barrier()
    todo = [s for s in mine[rank::world] if not done(out, s.name)]
    if rank == 0 and log and len(todo) < len(mine[rank::world]):
        log(f"{out}: {len(mine) - len(todo)} scans already done, {len(todo)} to go")
    for scan in track(progress if rank == 0 else None, todo):
        _predict_one(pipeline, scan, out, options, log if rank == 0 else None)
    barrier()
    return finish(out, [s.name for s in mine], options) if rank == 0 else []


def predict_dicomweb(url: str, study: str, series: str | None, checkpoint: str | Path, out: str | Path,
                     store: bool = False, log=print, **kwargs) -> list[dict]:
    """Fetch one series from a DICOMweb server, predict it into ``out``, and with ``store`` send
    its SR (and SEG) back (STOW-RS)."""
    from noduledet.clinical.dicomweb import fetch_series, store_files

    fetched = Path(tempfile.mkdtemp(prefix="noduledet-dicomweb-"))
    try:
        folder = fetch_series(url, study, fetched / "series", series)
        summaries = predict([folder], checkpoint, out, log=log, **kwargs)
        reports = [Path(out) / s["name"] / f for s in summaries for f in ("sr.dcm", "seg.dcm")
                   if (Path(out) / s["name"] / f).is_file()]
        skipped = [s["reports"]["skipped"] for s in summaries if s["reports"] and s["reports"]["skipped"]]
        if store and reports:
            stored = store_files(url, reports)
            if log:
                log(f"stored {len(stored)} object(s) in {url}: {', '.join(p.name for p in reports)}")
        elif store and log:
            reports_on = kwargs.get("options", PredictOptions()).reports
            log("nothing to store: " + (skipped[0] if skipped else "no finding reaches the findings' threshold"
                                        if reports_on else "reports are off (--no-reports)"))
        return summaries
    finally:
        shutil.rmtree(fetched, ignore_errors=True)
