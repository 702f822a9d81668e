"""The 3D proposer (``noduledet.models.proposer3d``): its peaks in a scan, and its training.

Inference (``look``, ``propose``): the scan region is resampled to the proposer's isotropic grid
(``data.patches.isotropic_grid``), padded to a multiple of 8 with its edge, and the network's
centre heat map taken (``ProposerView``, which also gives the probability at any other
candidate of the pool); its local maxima (3x3x3) are the peaks, each placed by its offset, sized
by its diameter, kept when it lies in the lungs closed by a rolling ball (``LungMask.contains``:
a nodule on the pleura is in) and not within the radius of a stronger peak (``blobs.suppress``),
the ``count`` most probable returned as candidates.

Training (``train_proposer``), on the training scans' regions resampled once to the grid:

- patches of ``patch``^3 voxels, ``positives`` of them placed so that a training nodule lies
  anywhere inside, the rest centred on a random lung voxel; a zoom of up to ``scale`` (other
  nodule sizes), flips of every axis, quarter turns in the axial plane, a HU gain and offset and
  noise (as stage two's cubes);
- ``synthetic`` of the patches get a synthetic nodule (``noduledet.data.lesions``: 3-20 mm,
  solid, part-solid or ground glass, a new one every time) pasted where nodules are hard to find:
  a third on the chest wall, a third against a vessel, a third free in the lung
  (``lesions.place``). Where the background is brighter the background stays, so a nodule on the
  wall ends at the wall as a reader would outline it, and its centre is the centroid of what shows;
- targets on the output grid: a Gaussian of each nodule's centre (sigma a quarter of its
  diameter, at least one cell), 1 at the nearest cell; the offset and log diameter at the
  cells within one of it; around an excluded finding (``annotations_excluded.csv``) nothing is
  learnt;
- loss: CenterNet's focal loss on the heat map (penalty-reduced negatives near a centre),
  normalised by the nodules in the batch, plus the L1 of offset and size there.

Randomness comes from (seed, step) alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from noduledet.blobs import suppress
from noduledet.config import Config
from noduledet.data.cache import SliceCache
from noduledet.data.ct import CTVolume
from noduledet.data.lesions import LUNG_HU, paste_nodule
from noduledet.data.lung import LungMask, segment_lungs
from noduledet.data.patches import isotropic_grid, linear_weights, resample_separable
from noduledet.geometry import Geometry
from noduledet.candidates import Candidate
from noduledet.models.proposer3d import HEAT, OFFSET, SIZE, STRIDE, NoduleProposer3D, ProposerSpec, pad_to

EXCLUDED_MARGIN_MM = 2.0  # nothing is learnt this far around an excluded finding
SIZE_WEIGHT = 0.1  # the log-diameter loss beside the offset's
HARD_AFTER = 0.5  # with proposer.hard, the false peaks are mined this far into training ...
HARD_PEAKS = 20  # ... the strongest this many per scan


def proposer_spec(cfg: Config) -> ProposerSpec:
    p = cfg.proposer
    return ProposerSpec(p.spacing_mm, p.width, tuple(cfg.data.window_hu))


# ---- inference ------------------------------------------------------------------------------

@torch.inference_mode()
def heat_map(model: NoduleProposer3D, grid: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """The network's five output maps (5, D/2, H/2, W/2) for a HU grid (D, H, W), padded with its
    edge to a multiple of 8 (the maps of the padding are cut off)."""
    padded = pad_to(grid.shape)
    x = np.pad(grid, [(0, p - n) for p, n in zip(padded, grid.shape)], mode="edge")
    out = model(model.window(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(device)))[0]
    cells = [-(-n // STRIDE) for n in grid.shape]
    return out[:, :cells[0], :cells[1], :cells[2]].float().cpu().numpy()


def peaks(maps: np.ndarray, count: int, min_score: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``count`` strongest local maxima (3x3x3) of the heat map at least ``min_score``: their
    positions in grid voxels (K, 3) z, y, x, probabilities (K,) and diameters in mm (K,)."""
    heat = torch.sigmoid(torch.from_numpy(maps[HEAT]))[None, None]
    top = (heat == F.max_pool3d(heat, 3, 1, 1))[0, 0].numpy() & (heat[0, 0].numpy() >= min_score)
    cells = np.argwhere(top)
    score = heat[0, 0].numpy()[tuple(cells.T)]
    order = np.argsort(-score, kind="stable")[:count]
    cells, score = cells[order], score[order]
    offset = maps[OFFSET][(slice(None), *cells.T)].T  # (K, 3)
    return STRIDE * (cells + offset), score.astype(float), 10.0 * np.exp(maps[SIZE][tuple(cells.T)])


@dataclass
class ProposerView:
    """The proposer's maps of one scan region (``look``) and the way back to the region's voxels.

    Attributes:
        maps: (5, cells...) the network's output (``heat_map``).
        to_voxel: (3,) grid voxel i lies at region voxel ``i * to_voxel``.
    """

    maps: np.ndarray
    to_voxel: np.ndarray

    def heat_at(self, voxel_zyx: np.ndarray) -> np.ndarray:
        """(K,) the centre probability the proposer gives each region voxel point (K, 3): the
        highest within a cell of it (the map's cells are two grid voxels wide)."""
        heat = torch.sigmoid(torch.from_numpy(self.maps[HEAT]))[None, None]
        heat = F.max_pool3d(heat, 3, 1, 1)[0, 0].numpy()
        cell = np.rint(np.asarray(voxel_zyx, dtype=float).reshape(-1, 3) / self.to_voxel / STRIDE).astype(int)
        cell = np.clip(cell, 0, np.array(heat.shape) - 1)
        return heat[tuple(cell.T)].astype(float)


def look(model: NoduleProposer3D, hu: np.ndarray, geometry: Geometry, device: torch.device | str = "cpu") -> ProposerView:
    """The proposer's maps of a scan region (resampled to its grid, ``heat_map``)."""
    sx, sy, sz = geometry.spacing
    grid, to_voxel = isotropic_grid(np.asarray(hu, dtype=np.float32), (sz, sy, sx), model.spec.spacing_mm)
    return ProposerView(heat_map(model, grid, device), to_voxel)


def propose(view: ProposerView, geometry: Geometry, lungs: LungMask, count: int, min_score: float = 0.01) -> list[Candidate]:
    """Up to ``count`` candidates of the proposer in a scan region (``view``: its maps, ``lungs``:
    its lung mask), most probable first; voxel indices in the region's frame."""
    if count <= 0 or lungs.empty:
        return []
    at, score, diameter = peaks(view.maps, 4 * count, min_score)
    voxel = at * view.to_voxel
    inside = lungs.contains(voxel, geometry.spacing)
    voxel, score, diameter = voxel[inside], score[inside], diameter[inside]
    world = geometry.voxel_to_world(voxel).reshape(-1, 3)
    out = []
    for i in suppress(world, diameter / 2, count):  # one peak per nodule: the strongest
        half = int(np.ceil(diameter[i] / 2 / geometry.spacing[2]))
        z = int(round(voxel[i][0]))
        out.append(Candidate(voxel[i], world[i], float(score[i]), float(diameter[i]), 0, (z - half, z + half), [],
                             sources=("proposer",), proposer=float(score[i])))
    return out


# ---- training data --------------------------------------------------------------------------

@dataclass
class GridScan:
    """A training scan on the proposer's grid.

    Attributes:
        hu: (D, H, W) int16 HU.
        nodules: (N, 4) centre z, y, x in grid voxels and diameter mm.
        excluded: (M, 4) the same for excluded findings (diameter -1: unknown, taken as 5 mm).
        lung: (K, 3) int grid voxels in the lungs (where random patches are centred).
        hard: (H, 3) grid voxels of the proposer's own false peaks, once mined (``mine_hard``).
    """

    hu: np.ndarray
    nodules: np.ndarray
    excluded: np.ndarray
    lung: np.ndarray
    hard: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))


def grid_scan(cache: SliceCache, uid: str, spacing_mm: float) -> GridScan:
    """One cached scan region resampled to the grid, with its findings there."""
    hu, g = np.asarray(cache.volume(uid)), cache.geometry(uid)
    sx, sy, sz = g.spacing
    grid, to_voxel = isotropic_grid(hu.astype(np.float32), (sz, sy, sx), spacing_mm)
    meta = cache.meta(uid)

    def on_grid(items) -> np.ndarray:
        rows = [[*(g.world_to_voxel(n["world_xyz"]) / to_voxel), n["diameter_mm"]] for n in items]
        return np.array(rows, dtype=float).reshape(-1, 4)

    lungs = segment_lungs(CTVolume(hu, g))
    lung = np.argwhere(grid[::2, ::2, ::2] < LUNG_HU) * 2  # every 8th voxel is plenty to draw from
    lung = lung[lungs.contains(lung * to_voxel, g.spacing, 0.0)] if len(lung) else lung
    return GridScan(np.clip(np.rint(grid), -32768, 32767).astype(np.int16), on_grid(meta["nodules"]),
                    on_grid(meta["excluded"]), lung)


def sample_patch(scan: GridScan, size: int, rng: np.random.Generator, positive: bool, scale: float,
                 hard: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A patch (size^3 float32 HU) of the scan with a zoom of up to ``scale``, around a random
    nodule (``positive``), else with probability ``hard`` around one of the proposer's false peaks
    (once mined) or around a random lung voxel; the nodules and excluded findings in its frame,
    (N, 4) z, y, x patch voxels and diameter in the patch's voxels times the grid spacing (mm)."""
    zoom = float(np.exp(rng.uniform(-np.log1p(scale), np.log1p(scale))))
    extent = zoom * (size - 1)
    if positive and len(scan.nodules):
        centre = scan.nodules[rng.integers(len(scan.nodules)), :3] + rng.uniform(-0.3, 0.3, 3) * extent
    elif len(scan.hard) and rng.random() < hard:
        centre = scan.hard[rng.integers(len(scan.hard))] + rng.uniform(-0.3, 0.3, 3) * extent
    elif len(scan.lung):
        centre = scan.lung[rng.integers(len(scan.lung))] + rng.uniform(-1, 1, 3)
    else:
        centre = (np.array(scan.hu.shape) - 1) / 2
    start = centre - extent / 2
    weights = [linear_weights(s + zoom * np.arange(size), n) for s, n in zip(start, scan.hu.shape)]
    patch = resample_separable(scan.hu, weights).astype(np.float32)

    def moved(rows: np.ndarray) -> np.ndarray:
        out = rows.copy()
        out[:, :3] = (rows[:, :3] - start) / zoom
        out[:, 3] = np.where(rows[:, 3] > 0, rows[:, 3] / zoom, rows[:, 3])
        return out

    return patch, moved(scan.nodules), moved(scan.excluded)


def flip_patch(patch: np.ndarray, rows: list[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """Random flips of every axis and a quarter turn in the axial plane, the rows (z, y, x, d) following."""
    n = patch.shape[0] - 1
    rows = [r.copy() for r in rows]
    for axis in range(3):
        if rng.random() < 0.5:
            patch = np.flip(patch, axis)
            for r in rows:
                r[:, axis] = n - r[:, axis]
    if rng.random() < 0.5:
        patch = np.swapaxes(patch, 1, 2)
        for r in rows:
            r[:, [1, 2]] = r[:, [2, 1]]
    return np.ascontiguousarray(patch), rows


def targets(nodules: np.ndarray, excluded: np.ndarray, size: int, spacing_mm: float) -> dict[str, np.ndarray]:
    """Training targets on the output grid (size / 2 cells per side) of a patch's nodules and
    excluded findings (N, 4) z, y, x patch voxels and diameter mm (module docstring)."""
    cells = size // STRIDE
    axis = np.arange(cells) * STRIDE  # input voxel at each cell's centre
    zz, yy, xx = np.meshgrid(axis, axis, axis, indexing="ij")
    heat = np.zeros((cells,) * 3, dtype=np.float32)
    weight = np.ones_like(heat)
    regress = np.zeros((4, cells, cells, cells), dtype=np.float32)
    near = np.zeros_like(heat)
    for z, y, x, d in nodules:
        if not (0 <= z < size and 0 <= y < size and 0 <= x < size):
            continue
        sigma = max(STRIDE, d / 4 / spacing_mm)  # input voxels
        heat = np.maximum(heat, np.exp(-((zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma ** 2)))
        k = np.clip(np.rint(np.array([z, y, x]) / STRIDE).astype(int), 0, cells - 1)
        heat[tuple(k)] = 1.0
        for dk in np.ndindex(3, 3, 3):
            j = k + np.array(dk) - 1
            if (j >= 0).all() and (j < cells).all():
                regress[:3, j[0], j[1], j[2]] = (np.array([z, y, x]) / STRIDE - j)
                regress[3, j[0], j[1], j[2]] = np.log(d / 10.0)
                near[tuple(j)] = 1.0
    for z, y, x, d in excluded:
        r = (max(d, 5.0) / 2 + EXCLUDED_MARGIN_MM) / spacing_mm
        weight[((zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2) <= r ** 2] = 0.0
    return {"heat": heat, "weight": weight, "regress": regress, "near": near}


def make_batch(scans: list[GridScan], cfg: Config, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One training batch: (B, P, P, P) HU and the stacked targets."""
    p = cfg.proposer
    patches, items = [], []
    for _ in range(p.batch_size):
        scan = scans[rng.integers(len(scans))]
        patch, nodules, excluded = sample_patch(scan, p.patch, rng, rng.random() < p.positives, p.scale, p.hard)
        if rng.random() < p.synthetic:
            patch, pasted = paste_nodule(patch, p.spacing_mm, rng, offset=None)
            if pasted is not None:
                nodules = np.vstack([nodules, pasted])
        patch, (nodules, excluded) = flip_patch(patch, [nodules, excluded], rng)
        patch = patch * rng.uniform(0.93, 1.07) + rng.uniform(-30, 30)
        if rng.random() < 0.5:
            patch = patch + rng.normal(0.0, rng.uniform(0, 25.0), patch.shape)
        patches.append(patch.astype(np.float32))
        items.append(targets(nodules, excluded, p.patch, p.spacing_mm))
    return np.stack(patches), {k: np.stack([t[k] for t in items]) for k in items[0]}


# ---- training -------------------------------------------------------------------------------

def focal_loss(logits: torch.Tensor, heat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4), summed, over the cells of ``weight``."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = heat >= 1.0
    pos_loss = -((1 - p) ** 2 * torch.log(p))[pos].sum()
    neg_loss = -((1 - heat) ** 4 * p ** 2 * torch.log(1 - p) * weight)[~pos].sum()
    return pos_loss + neg_loss


def proposer_loss(out: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's loss: focal loss on the heat map and the L1 of offset and size near each centre,
    normalised by the number of nodules."""
    n = t["heat"].ge(1.0).sum().clamp(min=1)
    heat = focal_loss(out[:, HEAT], t["heat"], t["weight"])
    near = t["near"].unsqueeze(1)
    l1 = (out[:, 1:] - t["regress"]).abs() * near
    regress = l1[:, :3].sum() + SIZE_WEIGHT * l1[:, 3].sum()
    return (heat + regress / 27) / n  # 27 cells around each centre carry a regression target


def train_proposer(cfg: Config, cache: SliceCache, uids: list[str], device: torch.device, log=None) -> NoduleProposer3D:
    """Train the proposer on the scans ``uids`` of ``cache`` (module docstring); return it in eval mode."""
    t0 = time.perf_counter()
    scans = [grid_scan(cache, uid, cfg.proposer.spacing_mm) for uid in uids]
    if log:
        log(f"proposer: {len(scans)} training scans on a {cfg.proposer.spacing_mm:g} mm grid, "
            f"{sum(len(s.nodules) for s in scans)} nodules, {time.perf_counter() - t0:.0f} s")
    return fit_proposer(scans, cfg, device, log)


def fit_proposer(scans: list[GridScan], cfg: Config, device: torch.device, log=None) -> NoduleProposer3D:
    """Train the proposer on ``scans`` for ``proposer.steps`` steps; return it in eval mode."""
    p = cfg.proposer
    torch.manual_seed(cfg.train.seed + 2)
    model = NoduleProposer3D(proposer_spec(cfg)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, p.lr, total_steps=p.steps, pct_start=0.1)
    model.train()
    total, count, t0 = 0.0, 0, time.perf_counter()
    every = max(1, p.steps // 5)
    for step in range(p.steps):
        if p.hard and step == int(HARD_AFTER * p.steps):
            found = mine_hard(model, scans)
            if log:
                log(f"proposer: {found} false peaks of its own on the training scans, its hard negatives from here on")
        x, t = make_batch(scans, cfg, np.random.default_rng([cfg.train.seed, step, 5]))
        out = model(model.window(torch.from_numpy(x).to(device)))
        loss = proposer_loss(out, {k: torch.from_numpy(v).to(device) for k, v in t.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total, count = total + float(loss.detach()), count + 1
        if log and ((step + 1) % every == 0 or step + 1 == p.steps):
            log(f"proposer step {step + 1}/{p.steps}: loss {total / count:.3f}, {time.perf_counter() - t0:.0f} s")
            total, count = 0.0, 0
    return model.eval()


def mine_hard(model: NoduleProposer3D, scans: list[GridScan], count: int = HARD_PEAKS) -> int:
    """Each scan's ``count`` strongest peaks of ``model`` that are no nodule (further than its
    radius plus a cell from every nodule and excluded finding) into ``scan.hard``; returns how many
    in all. The model is back in training mode afterwards."""
    model.eval()
    total = 0
    for scan in scans:
        at, _, _ = peaks(heat_map(model, scan.hu.astype(np.float32), next(model.parameters()).device), 4 * count, 0.0)
        findings = np.vstack([scan.nodules, scan.excluded])
        reach = (np.maximum(findings[:, 3], 5.0) / 2 / model.spec.spacing_mm + STRIDE)[None]
        near = (np.linalg.norm(at[:, None] - findings[None, :, :3], axis=-1) < reach).any(axis=1) if len(findings) else \
            np.zeros(len(at), dtype=bool)
        scan.hard = at[~near][:count]
        total += len(scan.hard)
    model.train()
    return total


def proposer_state(model: NoduleProposer3D) -> dict:
    """What a checkpoint keeps of the proposer: {"spec": ..., "state": ...}."""
    return {"spec": model.spec.to_dict(), "state": {k: v.cpu() for k, v in model.state_dict().items()}}


def proposer_from_state(stored: dict) -> NoduleProposer3D:
    model = NoduleProposer3D(ProposerSpec.from_dict(stored["spec"]))
    model.load_state_dict(stored["state"])
    return model.eval()
