"""One road from a CT volume to nodule candidates.

``predict``, ``evaluate``, ``demo``, ``compare`` and the benchmarks all go through
``Pipeline``, so the CPM that ``evaluate`` prints is the CPM of what ``predict`` writes::

    volume -> lung mask -> scan region (the lungs' box plus margins, ``DataConfig``)
           -> stage one: the detector on the region's lung slices, ``slice_step_mm`` apart
              (batched, no autograd, resampled to the working pixel spacing)
           -> 3D merge -> the most probable ``max_candidates``: stage one's candidates
           -> with stage two, its pool (``Pipeline.pool``): stage one's ``stage2.candidates``
              most probable, the 3D proposer's ``proposer.candidates`` peaks
              (``noduledet.proposer``: learnt, it sees a bump on a wall or a faint blob over
              several slices) and ``stage2.blobs`` round spots of a 3D blob filter
              (``noduledet.blobs``: untrained, it proposes what neither learnt); one candidate
              per place, remembering every source that proposed it (``Candidate.sources``)
           -> stage two, when the checkpoint has it: a 3D classifier scores an isotropic cube
              around each candidate of the pool, the probabilities are combined
              (``stage2.combine``) and the most probable ``max_candidates`` kept
           -> candidates in world mm, most probable first

``run`` starts from a region already cut out (the prepared cache serves those, made with the
same ``LungMask.region``); ``run_volume`` starts from a whole scan.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from noduledet import checkpoint
from noduledet.blobs import find_blobs
from noduledet.config import Config, EvalConfig, check_eval
from noduledet.data.ct import CTVolume
from noduledet.data.luna16 import Findings
from noduledet.data.lung import ScanRegion, segment_lungs
from noduledet.data.patches import extract_patches
from noduledet.errors import UserError
from noduledet.geometry import Geometry
from noduledet.inference import Detector
from noduledet.candidates import Candidate, SliceDetections
from noduledet.merge import merge_slices, z_steps
from noduledet.models.classifier3d import ClassifierSpec, NoduleClassifier3D
from noduledet.models.proposer3d import NoduleProposer3D, ProposerSpec
from noduledet.proposer import look, propose


@dataclass
class ScanResult:
    """What the pipeline found in one scan.

    Attributes:
        candidates: most probable first, voxel indices in the whole scan's frame.
        detections: per-slice detections, in the region's frame.
        region: where the region lies in the scan.
        timings: seconds per stage.
        threshold: the operating point the status counts findings at.
        stage1: the candidates as stage one ranked them (the same list when there is no stage two).
        pool: every candidate stage two scored, with the probability it gave (empty without stage two).
    """

    candidates: list[Candidate]
    detections: list[SliceDetections]
    region: ScanRegion
    timings: dict[str, float] = field(default_factory=dict)
    threshold: float = 0.5
    stage1: list[Candidate] = field(default_factory=list)
    pool: list[Candidate] = field(default_factory=list)

    @property
    def status(self) -> str:
        if not self.region.lung_slices:
            return "no lung found: nothing to search"
        if not self.candidates:
            return "no candidates"
        above = sum(c.probability >= self.threshold for c in self.candidates)
        return f"{len(self.candidates)} candidates, {above} with probability >= {self.threshold}"


class Pipeline:
    """A trained detector with the settings of its run: scans in, candidates out.

    Args:
        detector: the stage-one detector.
        settings: merging, cap and batching (``EvalConfig``).
        config: the run's configuration (the scan region's margins come from ``config.data``,
            how the two stages' probabilities combine from ``config.stage2``).
        epoch: the training epoch of the weights, when known.
        classifier: the stage-two classifier, or None (stage one alone).
        operating_points: thresholds calibrated on the validation scans (``noduledet.checkpoint``).
        proposer: the 3D proposer, or None; its peaks join stage two's pool.
    """

    def __init__(self, detector: Detector, settings: EvalConfig, config: Config, epoch: int | None = None,
                 classifier: NoduleClassifier3D | None = None, operating_points: dict | None = None,
                 proposer: NoduleProposer3D | None = None):
        self.detector, self.settings, self.config, self.epoch = detector, settings, config, epoch
        self.classifier = classifier.to(detector.device).eval() if classifier is not None else None
        self.operating_points = operating_points
        self.proposer = proposer.to(detector.device).eval() if proposer is not None else None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device | str = "cpu", stage2: bool = True,
                        **overrides) -> Pipeline:
        """The checkpoint's pipeline; ``overrides`` replace fields of its ``eval`` settings;
        ``stage2=False`` leaves out a second stage the checkpoint has (its proposer stays: the
        pool of stage two's training is stage one's candidates, the proposer's and the blob filter's)."""
        ckpt = checkpoint.load(path)
        try:
            settings = replace(ckpt.config.eval, **overrides)
        except TypeError as err:
            raise UserError(f"unknown evaluation option: {err}") from None
        check_eval(settings, "the evaluation settings")
        detector = Detector.from_checkpoint(ckpt, device, settings.batch_size, settings.engine)
        classifier = None
        if stage2 and ckpt.stage2 is not None:
            classifier = NoduleClassifier3D(ClassifierSpec.from_dict(ckpt.stage2["spec"]))
            checkpoint.load_weights(classifier, ckpt.stage2["state"], ckpt.path, "its second stage")
        proposer = None
        if ckpt.proposer is not None and ckpt.config.proposer.enabled:
            proposer = NoduleProposer3D(ProposerSpec.from_dict(ckpt.proposer["spec"]))
            checkpoint.load_weights(proposer, ckpt.proposer["state"], ckpt.path, "its 3D proposer")
        return cls(detector, settings, ckpt.config, ckpt.epoch, classifier, ckpt.operating_points, proposer)

    def region(self, volume: CTVolume) -> ScanRegion:
        """The scan region of a whole volume (the lungs' box plus the run's margins)."""
        d = self.config.data
        return segment_lungs(volume).region(volume.geometry.spacing, d.margin_mm, d.z_margin_mm)

    def run_volume(self, volume: CTVolume) -> ScanResult:
        """Find the candidates of a whole scan."""
        t = time.perf_counter()
        region = self.region(volume)
        lung_s = time.perf_counter() - t
        hu = volume.hu[region.index()]
        result = self.run(hu, volume.geometry.crop(region.start_zyx, region.shape_zyx), region)
        result.timings = {"lung_mask_s": lung_s, **result.timings}
        return result

    def run(self, hu: np.ndarray, geometry: Geometry, region: ScanRegion) -> ScanResult:
        """Find the candidates of a scan region.

        Args:
            hu: (z, y, x) HU of the region (an array or a memory map).
            geometry: the region's geometry.
            region: where it lies in the scan, and its lung slices.
        """
        s = self.settings
        timings: dict[str, float] = {}
        detections: list[SliceDetections] = []
        candidates: list[Candidate] = []
        if region.lung_slices:
            before = dict(self.detector.timings)
            t = time.perf_counter()
            step = z_steps(s.slice_step_mm, s.link_mm, geometry.spacing[2])[0]
            detections = self.detector.detect(hu, geometry, region.lung_slices[::step])
            timings["slices_and_detector_s"] = time.perf_counter() - t
            timings["slice_preparation_s"] = self.detector.timings["prepare_s"] - before["prepare_s"]
            timings["detector_s"] = self.detector.timings["model_s"] - before["model_s"]
            t = time.perf_counter()
            keep = max(s.max_candidates, self.config.stage2.candidates) if self.classifier else s.max_candidates
            merged = merge_slices(detections, geometry, s.link_mm, s.min_score, s.slice_step_mm)[:keep]
            candidates = [c.moved(region.start_zyx) for c in merged]
            timings["merge_3d_s"] = time.perf_counter() - t
        stage1 = candidates[: s.max_candidates]
        pool: list[Candidate] = []
        if self.classifier is not None and region.lung_slices:
            pool = self.pool(hu, geometry, region, candidates, timings)
        if pool:
            t = time.perf_counter()
            pool = self.rescore(hu, geometry, pool)
            candidates = pool[: s.max_candidates]
            timings["stage2_s"] = time.perf_counter() - t
        return ScanResult(candidates, detections, region, timings, s.score_threshold, stage1, pool)

    def pool(self, hu: np.ndarray, geometry: Geometry, region: ScanRegion, stage1: list[Candidate],
             timings: dict[str, float] | None = None) -> list[Candidate]:
        """Stage two's pool (module docstring): stage one's ``stage2.candidates`` most probable of
        ``stage1`` (the scan's frame), the proposer's peaks and the blob filter's spots; a peak or
        spot on a candidate already there adds its source to it (``join``). Seconds per source
        go into ``timings``."""
        timings = {} if timings is None else timings
        c2, cp = self.config.stage2, self.config.proposer
        pool = [replace(c) for c in stage1[: c2.candidates]]
        lungs = segment_lungs(CTVolume(np.asarray(hu), geometry))  # the proposer's and the filter's
        view = None
        if self.proposer is not None:
            t = time.perf_counter()
            view = look(self.proposer, hu, geometry, self.detector.device)
            peaks = propose(view, geometry, lungs, cp.candidates, cp.min_score)
            pool = join(pool, [c.moved(region.start_zyx) for c in peaks], cp.candidates)
            timings["proposer_s"] = time.perf_counter() - t
        if c2.blobs:
            t = time.perf_counter()
            spots = find_blobs(hu, geometry, c2.blobs + len(pool), lungs)
            pool = join(pool, [c.moved(region.start_zyx) for c in spots], c2.blobs)
            timings["blobs_s"] = time.perf_counter() - t
        if view is not None:  # the proposer's probability at every candidate, whoever proposed it
            at = np.array([c.voxel_zyx for c in pool], dtype=float).reshape(-1, 3) - np.asarray(region.start_zyx)
            pool = [replace(c, proposer=float(p)) for c, p in zip(pool, view.heat_at(at))]
        return pool

    @torch.inference_mode()
    def rescore(self, hu: np.ndarray, geometry: Geometry, pool: list[Candidate]) -> list[Candidate]:
        """Stage two: each candidate of the pool gets the classifier's probability for the cube
        around it, combined with stage one's (``stage2.combine``; one that stage one did not
        propose keeps the classifier's alone). The classifier's ``stage2.flips_top`` most probable
        cubes are scored again under the 8 flips of their axes, and the mean taken (the flips
        are among its training augmentations). Most probable first."""
        spec = self.classifier.spec
        patches = extract_patches(hu, geometry, [c.world_xyz for c in pool], spec.edge, spec.spacing_mm)
        p2 = self.classify(patches)
        top = np.argsort(-p2, kind="stable")[: self.config.stage2.flips_top]
        if len(top):
            p2[top] = np.mean([self.classify(np.flip(patches[top], axes)) for axes in FLIPS], axis=0)
        by_stage1 = np.array(["stage1" in c.sources for c in pool])
        p1 = np.where(by_stage1, [c.probability for c in pool], 0.0)
        p = {"stage2": p2, "mean": (p1 + p2) / 2, "product": p1 * p2}[self.config.stage2.combine]
        p = np.where(by_stage1, p, p2)
        out = [replace(c, probability=float(q), stage1=float(one)) for c, q, one in zip(pool, p, p1)]
        return sorted(out, key=lambda c: -c.probability)

    def classify(self, patches: np.ndarray) -> np.ndarray:
        """The classifier's probabilities for (N, E, E, E) HU cubes (``spec.edge``), in batches of 64."""
        scores = [torch.sigmoid(self.classifier(self.classifier.window(
            torch.from_numpy(np.ascontiguousarray(patches[start:start + 64])).to(self.detector.device)))).float().cpu()
            for start in range(0, len(patches), 64)]
        return torch.cat(scores).numpy() if scores else np.zeros(0, dtype=np.float32)


FLIPS = [axes for n in range(4) for axes in itertools.combinations((1, 2, 3), n)]  # every set of a cube batch's z, y, x axes
SOURCES = ("stage1", "proposer", "blobs")  # who proposes candidates (Candidate.sources)
JOIN_MM = 2.5  # a candidate closer than this (or than the larger radius) to one in the pool is that one


def join(pool: list[Candidate], new: list[Candidate], count: int) -> list[Candidate]:
    """``pool`` with up to ``count`` of ``new`` (strongest first) added. One that lies closer to a
    candidate already in the pool than the larger of their radii (and than ``JOIN_MM``) is that
    candidate: its sources (and a proposer's probability) are added to the nearest, and it does
    not count. The pool's candidates keep their place and position."""
    out = list(pool)
    world = np.array([c.world_xyz for c in out], dtype=float).reshape(-1, 3)
    radius = np.array([c.diameter_mm / 2 for c in out], dtype=float)
    added = 0
    for c in new:
        if added >= count:
            break
        d = np.linalg.norm(world - c.world_xyz, axis=1)
        near = np.nonzero(d < np.maximum(np.maximum(radius, c.diameter_mm / 2), JOIN_MM))[0]
        if len(near):
            k = near[np.argmin(d[near])]
            sources = out[k].sources + tuple(s for s in c.sources if s not in out[k].sources)
            out[k] = replace(out[k], sources=sources, proposer=out[k].proposer if out[k].proposer is not None else c.proposer)
            continue
        out.append(c)
        world, radius = np.vstack([world, c.world_xyz]), np.append(radius, c.diameter_mm / 2)
        added += 1
    return out


def candidates_table(results: dict[str, list[Candidate]]) -> Findings:
    """Every scan's candidates as LUNA16 rows (seriesuid, world x, y, z, probability)."""
    rows = [(name, c) for name, cands in results.items() for c in cands]
    return Findings(np.array([n for n, _ in rows], dtype=str),
                    np.array([c.world_xyz for _, c in rows], dtype=float).reshape(-1, 3),
                    np.array([c.probability for _, c in rows], dtype=float))
