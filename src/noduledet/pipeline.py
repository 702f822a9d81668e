"""One road from a CT volume to nodule candidates.

``predict``, ``evaluate``, ``demo``, ``compare`` and the benchmarks all go through
``Pipeline``, so the CPM that ``evaluate`` prints is the CPM of what ``predict`` writes::

    volume -> lung mask -> scan region (the lungs' box plus margins, ``DataConfig``)
           -> stage one: the detector on the region's lung slices, ``slice_step_mm`` apart
              (batched, no autograd, resampled to the working pixel spacing)
           -> 3D merge -> the most probable ``max_candidates`` (``stage2.candidates`` with stage two)
           -> with stage two, ``stage2.blobs`` round spots from a 3D blob filter join them
              (``noduledet.blobs``: untrained, it proposes what stage one never learnt)
           -> stage two, when the checkpoint has it: a 3D classifier scores an isotropic cube
              around each candidate, the probabilities are combined (``stage2.combine``) and the
              most probable ``max_candidates`` kept
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
    """

    candidates: list[Candidate]
    detections: list[SliceDetections]
    region: ScanRegion
    timings: dict[str, float] = field(default_factory=dict)
    threshold: float = 0.5
    stage1: list[Candidate] = field(default_factory=list)

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
    """

    def __init__(self, detector: Detector, settings: EvalConfig, config: Config, epoch: int | None = None,
                 classifier: NoduleClassifier3D | None = None, operating_points: dict | None = None):
        self.detector, self.settings, self.config, self.epoch = detector, settings, config, epoch
        self.classifier = classifier.to(detector.device).eval() if classifier is not None else None
        self.operating_points = operating_points

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device | str = "cpu", stage2: bool = True,
                        **overrides) -> Pipeline:
        """The checkpoint's pipeline; ``overrides`` replace fields of its ``eval`` settings;
        ``stage2=False`` leaves out a second stage the checkpoint has."""
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
        return cls(detector, settings, ckpt.config, ckpt.epoch, classifier, ckpt.operating_points)

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
        spots: list[Candidate] = []
        if self.classifier is not None and region.lung_slices and self.config.stage2.blobs:
            t = time.perf_counter()
            spots = [c.moved(region.start_zyx) for c in find_blobs(hu, geometry, self.config.stage2.blobs, candidates)]
            timings["blobs_s"] = time.perf_counter() - t
        if self.classifier is not None and (candidates or spots):
            t = time.perf_counter()
            candidates = self.rescore(hu, geometry, candidates, spots)[: s.max_candidates]
            timings["stage2_s"] = time.perf_counter() - t
        return ScanResult(candidates, detections, region, timings, s.score_threshold, stage1)

    @torch.inference_mode()
    def rescore(self, hu: np.ndarray, geometry: Geometry, candidates: list[Candidate],
                spots: list[Candidate] = ()) -> list[Candidate]:
        """Stage two: each candidate's probability combined with the classifier's for the cube
        around it (``stage2.combine``); the blob filter's ``spots``, which stage one never
        proposed, keep the classifier's alone. The classifier's ``stage2.flips_top`` most probable
        cubes are scored again under the 8 flips of their axes, and the mean taken (the flips
        are among its training augmentations). Most probable first."""
        spec = self.classifier.spec
        everything = list(candidates) + list(spots)
        patches = extract_patches(hu, geometry, [c.world_xyz for c in everything], spec.edge, spec.spacing_mm)
        p2 = self.classify(patches)
        top = np.argsort(-p2, kind="stable")[: self.config.stage2.flips_top]
        if len(top):
            p2[top] = np.mean([self.classify(np.flip(patches[top], axes)) for axes in FLIPS], axis=0)
        p1 = np.array([c.probability for c in candidates])
        head = p2[: len(candidates)]
        p = {"stage2": head, "mean": (p1 + head) / 2, "product": p1 * head}[self.config.stage2.combine]
        out = [replace(c, probability=float(q), stage1=c.probability) for c, q in zip(candidates, p)]
        out += [replace(c, probability=float(q), stage1=0.0) for c, q in zip(spots, p2[len(candidates):])]
        return sorted(out, key=lambda c: -c.probability)

    def classify(self, patches: np.ndarray) -> np.ndarray:
        """The classifier's probabilities for (N, E, E, E) HU cubes (``spec.edge``), in batches of 64."""
        scores = [torch.sigmoid(self.classifier(self.classifier.window(
            torch.from_numpy(np.ascontiguousarray(patches[start:start + 64])).to(self.detector.device)))).float().cpu()
            for start in range(0, len(patches), 64)]
        return torch.cat(scores).numpy() if scores else np.zeros(0, dtype=np.float32)


FLIPS = [axes for n in range(4) for axes in itertools.combinations((1, 2, 3), n)]  # every set of a cube batch's z, y, x axes


def candidates_table(results: dict[str, list[Candidate]]) -> Findings:
    """Every scan's candidates as LUNA16 rows (seriesuid, world x, y, z, probability)."""
    rows = [(name, c) for name, cands in results.items() for c in cands]
    return Findings(np.array([n for n, _ in rows], dtype=str),
                    np.array([c.world_xyz for _, c in rows], dtype=float).reshape(-1, 3),
                    np.array([c.probability for _, c in rows], dtype=float))
