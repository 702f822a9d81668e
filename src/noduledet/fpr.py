"""The second stage (false-positive reduction) and the operating points, trained after the detector.

``train_stage2`` runs once the detector's epochs are done (``noduledet train`` calls it):

1. stage one (the run's ``best.pt``) runs over the training scans, through the same
   ``Pipeline`` as ``predict``, and each candidate of stage two's pool (stage one's, the 3D
   proposer's peaks, the blob filter's spots: ``Pipeline.pool``) gets the FROC's label: one that
   hits a nodule is a positive, one that hits only an excluded finding is dropped, any other is
   a false positive — the hard negatives, mostly vessels seen end-on and bumps of the chest
   wall; a few vessel-like spots per scan join the negatives, so that the classifier sees more
   than its proposers' mistakes;
2. an isotropic cube is cut around every candidate and every annotated nodule (a little larger
   than the classifier's, so that training can shift it; with ``stage2.context`` k, k times as
   wide, the coarser view's);
3. the 3D classifier trains on balanced batches (half nodules, half false positives) with flips
   on all three axes, quarter turns in the axial plane, shifts, zooms of up to 15% (nodule sizes
   the training scans lack), HU gain and offset, and noise; a fraction of the cubes
   (``stage2.synthetic``) get a synthetic nodule (then a nodule cube) or vessel (a false positive)
   pasted in (``noduledet.data.lesions``): nodules and vessels of every size and kind, nodules on
   the chest wall and against vessels as often as free ones, not only the few dozen that the
   training scans hold;
4. both stages run over the validation scans; the thresholds expected to give 1/2, 1, 2 and 4
   false positives per new scan, read off them (``calibrated_thresholds``), are the operating points.

The classifier and the operating points are saved into ``best.pt`` and ``last.pt``. Randomness
comes from the run's seed alone, so a run interrupted here and resumed ends the same.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from noduledet import checkpoint
from noduledet.config import Config
from noduledet.data.cache import SliceCache
from noduledet.data.dataset import vessel_like
from noduledet.data.lesions import paste_nodule, paste_vessel, pasteable
from noduledet.data.luna16 import Findings
from noduledet.data.patches import extract_patches, linear_weights, resample_separable
from noduledet.metrics.froc import (OPERATING_RATES, calibrated_max_findings, calibrated_thresholds, froc_curve, hits,
                                     scan_outcome, sensitivities_at)
from noduledet.models.classifier3d import ClassifierSpec, NoduleClassifier3D
from noduledet.pipeline import Pipeline, candidates_table
from noduledet.progress import track
from noduledet.runfolder import RunFolder
from noduledet.staging import write_json


def scan_findings(cache: SliceCache, uid: str) -> tuple[Findings, Findings]:
    """The scan's nodules and excluded findings (world mm, diameter) from the cache."""
    meta = cache.meta(uid)

    def rows(items) -> Findings:
        return Findings(np.array([uid] * len(items), dtype=str),
                        np.array([n["world_xyz"] for n in items], dtype=float).reshape(-1, 3),
                        np.array([n["diameter_mm"] for n in items], dtype=float))

    return rows(meta["nodules"]), rows(meta["excluded"])


def vessel_spots(cache: SliceCache, uid: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """World points of up to ``count`` vessel-like spots on random lung slices of a scan."""
    vol, g, region = cache.volume(uid), cache.geometry(uid), cache.region(uid)
    points = []
    for z in rng.choice(region.lung_slices, min(count, len(region.lung_slices)), replace=False):
        ys, xs = vessel_like(np.asarray(vol[z]))
        if len(ys):
            i = rng.integers(len(ys))
            points.append(g.voxel_to_world([z, ys[i], xs[i]]))
    return np.array(points, dtype=float).reshape(-1, 3)


def mine(pipeline: Pipeline, cache: SliceCache, uids: list[str], seed: int = 0, spots: int = 8,
         progress=None) -> list[dict]:
    """Stage two's pool on ``uids`` (stage one's candidates, the proposer's peaks, the blob
    filter's spots: ``Pipeline.pool``) with their labels (1 nodule, 0 false positive), every
    annotated nodule (1) and ``spots`` vessel-like spots per scan (0): {"uid", "world_xyz", "label"}."""
    items = []
    for k, uid in enumerate(track(progress, uids)):
        nodules, excluded = scan_findings(cache, uid)
        hu, g, region = cache.volume(uid), cache.geometry(uid), cache.region(uid)
        result = pipeline.run(hu, g, region)
        found = [c.world_xyz for c in pipeline.pool(hu, g, region, result.candidates)]
        points = found + list(vessel_spots(cache, uid, spots, np.random.default_rng([seed, k, 3])))
        for i, xyz in enumerate(points):
            on_nodule = bool(hits(xyz, nodules).any())
            if (on_nodule and i < len(found)) or not (on_nodule or hits(xyz, excluded, 10.0).any()):
                items.append({"uid": uid, "world_xyz": np.asarray(xyz).tolist(), "label": int(on_nodule)})
        items += [{"uid": uid, "world_xyz": xyz.tolist(), "label": 1} for xyz in nodules.xyz]
    return items


def cut(cache: SliceCache, items: list[dict], spec: ClassifierSpec, margin: int) -> np.ndarray:
    """(N, E, E, E) int16 HU cubes around the items, ``margin`` voxels wider than the classifier's
    ``spec.edge``."""
    out = np.empty((len(items), *(3 * [spec.edge + 2 * margin])), dtype=np.int16)
    by_scan: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_scan.setdefault(item["uid"], []).append(i)
    for uid, index in by_scan.items():
        centres = [items[i]["world_xyz"] for i in index]
        cubes = extract_patches(cache.volume(uid), cache.geometry(uid), centres, spec.edge + 2 * margin, spec.spacing_mm)
        out[index] = np.clip(np.rint(cubes), -32768, 32767)
    return out


CUBE_GAIN = (0.93, 1.07)  # stage two's training cubes: HU times a gain drawn uniformly from here ...
CUBE_OFFSET_HU = (-30.0, 30.0)  # ... plus an offset drawn from here (calibration, kernels) ...
CUBE_NOISE_HU = 25.0  # ... and, on half of them, noise of a sigma drawn from 0..this (dose)


def augment_cube(cube: np.ndarray, size: int, rng: np.random.Generator, shift: float | None = None,
                 scale: float = 0.0, noise_hu: float = CUBE_NOISE_HU) -> np.ndarray:
    """A ``size`` cube from a larger one: a random shift by up to ``shift`` voxels (default: as far
    as the cube allows), a zoom by up to ``scale`` (other nodule
    sizes than the training scans hold), flips on each axis, a quarter turn in the axial plane,
    a HU gain (``CUBE_GAIN``) and offset (``CUBE_OFFSET_HU``), and noise of up to ``noise_hu`` on
    half the cubes."""
    zoom = float(np.exp(rng.uniform(-np.log1p(scale), np.log1p(scale))))
    room = (cube.shape[0] - 1 - zoom * (size - 1)) / 2  # how far the sampled grid may move off centre
    room = max(0.0, room if shift is None else min(room, shift))  # zoomed out past the cube: edges repeat
    start = (cube.shape[0] - 1) / 2 - zoom * (size - 1) / 2 + rng.uniform(-room, room, 3)
    c = zoom_shift(cube, zoom, start, size)
    for axis in range(3):
        if rng.random() < 0.5:
            c = np.flip(c, axis)
    if rng.random() < 0.5:
        c = np.swapaxes(c, 1, 2)  # with the flips: every quarter turn about z
    c = c * rng.uniform(*CUBE_GAIN) + rng.uniform(*CUBE_OFFSET_HU)
    if rng.random() < 0.5:
        c = c + rng.normal(0.0, rng.uniform(0, noise_hu), c.shape).astype(np.float32)
    return np.ascontiguousarray(c, dtype=np.float32)


def zoom_shift(cube: np.ndarray, zoom: float, start: np.ndarray, size: int) -> np.ndarray:
    """A ``size`` cube (float32) sampled from ``cube`` at ``start + zoom * i`` along each axis,
    trilinear, the cube's edge repeating beyond it: ``ndimage.affine_transform`` with order 1 and
    mode "nearest", one axis at a time (4.4 times faster: benchmarks/bench_training.py). Its float64
    sums run in another order, so about one float32 value in 50 million differs in its last bit
    (a training run then rounds apart from one with affine_transform)."""
    weights = [linear_weights(s + zoom * np.arange(size), n) for s, n in zip(start, cube.shape)]
    return resample_separable(cube, weights).astype(np.float32)


def fit(cubes: np.ndarray, labels: np.ndarray, cfg: Config, device: torch.device, log=None) -> NoduleClassifier3D:
    """Train the classifier on balanced batches of augmented cubes; return it in eval mode."""
    s = cfg.stage2
    torch.manual_seed(cfg.train.seed + 1)
    model = NoduleClassifier3D(classifier_spec(cfg)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=1e-4)
    steps = s.epochs * math.ceil(s.samples_per_epoch / s.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, s.lr, total_steps=steps, pct_start=0.1)
    pos, neg = np.nonzero(labels == 1)[0], np.nonzero(labels == 0)[0]
    hosts = neg[pasteable(cubes, 10.0, s.spacing_mm, HOST_LUNG)[neg]] if s.synthetic else neg[:0]  # no copy of the cubes
    shift = s.shift_mm / s.spacing_mm
    half = s.samples_per_epoch // 2
    for epoch in range(s.epochs):
        rng = np.random.default_rng([cfg.train.seed, epoch, 2])
        picks = np.concatenate([rng.choice(pos, half), rng.choice(neg, half)])
        pasted = np.zeros(len(picks), dtype=bool)  # a synthetic nodule or vessel goes into these
        if len(hosts):
            pasted[:] = rng.random(len(picks)) < s.synthetic
            picks[pasted] = rng.choice(hosts, int(pasted.sum()))
        target = np.repeat([1, 0], half)  # a pasted nodule makes a positive, a pasted vessel a negative
        order = rng.permutation(len(picks))
        picks, pasted, target = picks[order], pasted[order], target[order]
        model.train()
        total, t0 = 0.0, time.perf_counter()
        for start in range(0, len(picks), s.batch_size):
            batch = slice(start, start + s.batch_size)
            x = np.stack([augment_cube(PASTE[y](cubes[i], s.spacing_mm, rng, shift) if p else cubes[i], model.spec.edge, rng,
                                       shift, s.scale) for i, p, y in zip(picks[batch], pasted[batch], target[batch])])
            logits = model(model.window(torch.from_numpy(x).to(device)))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, torch.from_numpy(target[batch]).float().to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(x)
        if log:
            log(f"stage 2 epoch {epoch + 1}/{s.epochs}: loss {total / len(picks):.3f}, {time.perf_counter() - t0:.0f} s")
    return model.eval()


PASTE = {1: lambda *args: paste_nodule(*args)[0], 0: paste_vessel}
HOST_LUNG = 0.25  # a false positive's cube takes a synthetic nodule when a quarter of its central 10 mm is lung (the chest wall's too)


def stage_outcomes(pipeline: Pipeline, cache: SliceCache, uids: list[str], progress=None) -> tuple[list, list, list]:
    """Each scan's ``ScanOutcome`` (FROC rules) of stage one alone and of both stages, and the
    probabilities of the candidates it lists (both stages)."""
    one, both, listed = [], [], []
    for uid in track(progress, uids):
        nodules, excluded = scan_findings(cache, uid)
        result = pipeline.run(cache.volume(uid), cache.geometry(uid), cache.region(uid))
        alone, final = (candidates_table({uid: cands}) for cands in (result.stage1, result.candidates))
        one.append(scan_outcome(nodules, excluded, alone, pipeline.settings.max_candidates))
        both.append(scan_outcome(nodules, excluded, final, pipeline.settings.max_candidates))
        listed.append(final.value)  # the pipeline keeps at most max_candidates
    return one, both, listed


def calibrate(pipeline: Pipeline, cache: SliceCache, uids: list[str], progress=None) -> dict:
    """Both stages over ``uids``: the thresholds expected to give ``OPERATING_RATES`` false
    positives per new scan (``calibrated_thresholds``) and the findings per scan at most there
    (``calibrated_max_findings``), and the CPM of stage one alone and of both stages there."""
    one, both, listed = stage_outcomes(pipeline, cache, uids, progress)
    thresholds = calibrated_thresholds(both)
    return {"fp_rates": list(OPERATING_RATES), "thresholds": thresholds,
            "max_findings": calibrated_max_findings(listed, thresholds), "scans": len(uids),
            "cpm_stage1": float(sensitivities_at(*froc_curve(one)).mean()),
            "cpm": float(sensitivities_at(*froc_curve(both)).mean())}


def train_stage2(cfg: Config, run: RunFolder, cache: SliceCache, splits: dict, device: torch.device,
                 log=print, progress=None) -> None:
    """Mine, cut, fit and calibrate (module docstring); save into the run's checkpoints."""
    s = cfg.stage2
    mined = run.path / "stage2_candidates.json"
    stage1 = Pipeline.from_checkpoint(run.best, device, stage2=False)
    if not mined.is_file():  # the slow part, kept for a resumed run
        t = time.perf_counter()
        miner = Pipeline(stage1.detector, replace(stage1.settings, max_candidates=s.candidates), stage1.config,
                         proposer=stage1.proposer)
        write_json(mined, mine(miner, cache, splits["train"], cfg.train.seed, progress=progress))
        if log:
            log(f"stage 2: stage one ran over {len(splits['train'])} training scans in {time.perf_counter() - t:.0f} s")
    items = json.loads(mined.read_text())
    labels = np.array([i["label"] for i in items], dtype=np.int64)
    if log:
        log(f"stage 2: {int(labels.sum())} nodule cubes, {int((labels == 0).sum())} false positives of stage one")
    if labels.min(initial=1) == 1 or labels.max(initial=0) == 0:
        raise RuntimeError("stage 2 needs both nodules and false positives among the training scans' candidates")
    spec = classifier_spec(cfg)
    model = fit(cut(cache, items, spec, cube_margin(s, spec)), labels, cfg, device, log)
    stage2 = {"spec": model.spec.to_dict(), "state": {k: v.cpu() for k, v in model.state_dict().items()}}
    both = Pipeline(stage1.detector, stage1.settings, stage1.config, stage1.epoch, model, proposer=stage1.proposer)
    points = calibrate(both, cache, splits["val"], progress) if splits["val"] else None
    if log and points:
        log(f"stage 2 on {points['scans']} validation scans: CPM {points['cpm_stage1']:.3f} (stage one) -> "
            f"{points['cpm']:.3f} (both stages)")
    run.update(stage2=stage2, operating_points=points)


def cube_margin(s, spec: ClassifierSpec) -> int:
    """Voxels cut beyond the classifier's cube (``spec.edge``) on each side: room for the shifts
    and the zoom out of ``s`` (the run's ``stage2`` settings)."""
    return int(math.ceil(s.shift_mm / spec.spacing_mm + s.scale * spec.edge / 2))


def classifier_spec(cfg: Config) -> ClassifierSpec:
    """The classifier's patch geometry from the run's ``stage2`` settings."""
    s = cfg.stage2
    return ClassifierSpec(s.size, s.spacing_mm, s.width, tuple(cfg.data.window_hu), s.context)


def stage2_done(path: Path) -> bool:
    """True when the checkpoint at ``path`` holds a trained second stage."""
    return path.is_file() and checkpoint.load(path).stage2 is not None
