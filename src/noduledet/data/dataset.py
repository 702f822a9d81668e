"""A torch Dataset of 2.5D axial samples from a prepared cache, at the working pixel spacing.

Training items are every slice that cuts a nodule (positives) plus, each epoch, sampled
negatives: half of them centred on a vessel-like structure (a small bright spot in dark lung,
the confounder a 2D detector must learn to reject: hard negatives) and half on a random lung
slice. Training samples are square patches (``patch`` pixels at the working spacing) placed so
that the nodule falls anywhere inside; evaluation samples are whole slices of the scan region.
Every sample is resampled in-plane to ``pixel_mm`` (``slices.resample``), the spacing the
pipeline gives the detector at inference.

Training augmentation (``AugmentConfig``) copies what differs between scanners and patients: the
patch's scale (a nodule of another size, another pixel spacing), a shift and gain of the HU
scale (calibration, kernels), noise and blur (dose, reconstruction), and flips and quarter
turns (positions in the lung). Boxes and masks follow every geometric change exactly.

Each item is ``(image, target, info)``: image (C, H, W) float32 in [0, 1]; target with
``boxes`` (N, 4) x1,y1,x2,y2 pixels, ``labels`` (N,) int64 and, with ``masks``, ``masks``
(N, H, W) uint8; info with ``uid``, ``z`` (slice index in the cached region) and ``origin_yx``
(where the sample's top-left pixel lies in the region, native pixels).

Randomness (negatives, patch placement, augmentation) comes from (seed, epoch, index) alone,
so a run resumed at an epoch sees the samples it would have seen.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from noduledet.boxes import scale_boxes
from noduledet.config import AugmentConfig
from noduledet.data.cache import SliceCache
from noduledet.data.slices import (OFFSETS_MM, WINDOW_HU, resample, resample_masks, sample_planes, slice_targets,
                                   window, working_shape)


def collate(batch):
    """Lists of images, targets and infos (detection models take lists)."""
    images, targets, infos = zip(*batch)
    return list(images), list(targets), list(infos)


def vary_intensity(planes: np.ndarray, aug: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """HU planes (C, H, W) with a gain, shift, noise and blur drawn for this item."""
    planes = planes * (1 + rng.uniform(-aug.hu_gain, aug.hu_gain)) + rng.uniform(-aug.hu_shift, aug.hu_shift)
    if aug.noise_hu and rng.random() < 0.5:
        planes = planes + rng.normal(0, rng.uniform(0, aug.noise_hu), planes.shape).astype(np.float32)
    if aug.blur_px and rng.random() < 0.5:
        planes = ndimage.gaussian_filter(planes, (0, *(2 * [rng.uniform(0, aug.blur_px)])))
    return planes.astype(np.float32)


def flip_and_turn(image: torch.Tensor, target: dict, rng: np.random.Generator, rot90: bool) -> tuple[torch.Tensor, dict]:
    """Random horizontal and vertical flips and (with ``rot90``) quarter turns of a square
    sample, its boxes and masks."""
    size = image.shape[-1]
    boxes, masks = target["boxes"].clone(), target.get("masks")
    if rng.random() < 0.5:  # horizontal
        image, boxes[:, [0, 2]] = image.flip(-1), size - boxes[:, [2, 0]]
        masks = masks.flip(-1) if masks is not None else None
    if rng.random() < 0.5:  # vertical
        image, boxes[:, [1, 3]] = image.flip(-2), size - boxes[:, [3, 1]]
        masks = masks.flip(-2) if masks is not None else None
    if rot90 and rng.random() < 0.5:  # a quarter turn (transpose then flip): (x, y) -> (y, size - x)
        image, boxes = image.transpose(-1, -2).flip(-2), torch.stack(
            [boxes[:, 1], size - boxes[:, 2], boxes[:, 3], size - boxes[:, 0]], dim=1)
        masks = masks.transpose(-1, -2).flip(-2) if masks is not None else None
    out = {**target, "boxes": boxes}
    if masks is not None:
        out["masks"] = masks
    return image.contiguous(), out


class SliceDataset(Dataset):
    """Axial 2.5D samples of some scans of a cache.

    Args:
        cache: a prepared ``SliceCache``.
        uids: the scans to draw from (one side of a split).
        train: training items and patches (else every lung slice, whole).
        patch: training patch size in pixels at the working spacing.
        negatives: negatives per positive per epoch (training).
        offsets_mm: world z offsets of the channels.
        window_hu: HU mapped to 0 and 1.
        pixel_mm: the working pixel spacing (0: each scan's own).
        masks: also return instance masks (Mask R-CNN).
        augment: the training augmentation (None: none).
        slices: evaluation takes "all" lung slices or only the "positive" ones, those cutting a
            nodule (the paper's test set: "images of lung nodules").
        slice_stride: evaluation takes every ``slice_stride``-th of those slices.
        seed: the run's seed.
    """

    def __init__(self, cache: SliceCache, uids: list[str], train: bool = True, patch: int = 128,
                 negatives: float = 1.0, offsets_mm=OFFSETS_MM, window_hu=WINDOW_HU, pixel_mm: float = 0.0,
                 masks: bool = False, augment: AugmentConfig | None = AugmentConfig(), slices: str = "all",
                 slice_stride: int = 1, min_section: float = 0.5, seed: int = 0):
        if slices not in ("all", "positive"):
            raise ValueError(f"slices={slices!r}; choose from ['all', 'positive']")
        self.cache, self.uids, self.train = cache, list(uids), train
        self.patch, self.negatives, self.pixel_mm = patch, negatives, pixel_mm
        self.offsets_mm, self.window_hu = tuple(offsets_mm), tuple(window_hu)
        self.masks, self.augment, self.min_section, self.seed = masks, augment if train else None, min_section, seed
        self.epoch = 0
        self._nodules = {u: cache.nodules(u) for u in self.uids}
        self._geometry = {u: cache.geometry(u) for u in self.uids}
        self.positives: list[tuple[str, int]] = []
        self.negative_pool: list[tuple[str, int]] = []
        for u in self.uids:
            g = self._geometry[u]
            for z in cache.region(u).lung_slices:
                has = any(n.box(z, g.spacing, min_section) is not None for n in self._nodules[u])
                (self.positives if has else self.negative_pool).append((u, z))
        self.slices = (self.positives if slices == "positive" else
                       [(u, z) for u in self.uids for z in cache.region(u).lung_slices])[::slice_stride]
        self.n_negatives = int(round(negatives * len(self.positives))) if self.negative_pool else 0
        self._volumes: dict[str, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        """Choose this epoch's negatives and augmentations (call before building the loader)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.positives) + self.n_negatives if self.train else len(self.slices)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def volume(self, uid: str) -> np.ndarray:
        if uid not in self._volumes:
            self._volumes[uid] = self.cache.volume(uid)
        return self._volumes[uid]

    def item(self, index: int) -> tuple[str, int, bool]:
        """(uid, slice, positive?) of item ``index`` this epoch."""
        if not self.train:
            u, z = self.slices[index]
            return u, z, False
        if index < len(self.positives):
            return (*self.positives[index], True)
        u, z = self.negative_pool[self._rng(index).integers(len(self.negative_pool))]
        return u, z, False

    def __getitem__(self, index: int):
        uid, z, positive = self.item(index)
        vol, g = self.volume(uid), self._geometry[uid]
        rng = self._rng(index)
        if self.train:
            size = self._native_patch(g.spacing, rng)
            y0, x0 = self._place_patch(uid, z, positive, size, rng)
            out_hw = (self.patch, self.patch)
        else:
            size, (y0, x0) = vol.shape[1:], (0, 0)
            out_hw = working_shape(size, g.spacing, self.pixel_mm)
        rows, cols = slice(y0, y0 + size[0]), slice(x0, x0 + size[1])
        planes = self._planes(vol, z, g, rows, cols)
        if self.augment:
            planes = vary_intensity(planes, self.augment, rng)
        target = slice_targets(self._nodules[uid], z, g.spacing, rows, cols, self.masks, self.min_section)
        image = resample(window(planes, *self.window_hu), out_hw)
        boxes = torch.from_numpy(scale_boxes(target["boxes"], out_hw[1] / size[1], out_hw[0] / size[0]))
        out = {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64)}
        if self.masks:
            out["masks"] = resample_masks(target["masks"], out_hw)
        if self.augment:
            image, out = flip_and_turn(image, out, rng, self.augment.rot90)
        return image, out, {"uid": uid, "z": z, "origin_yx": (y0, x0)}

    def _native_patch(self, spacing_xyz, rng: np.random.Generator) -> tuple[int, int]:
        """(rows, cols) of the scan's own pixels a training patch covers: ``patch`` working pixels,
        times this item's scale."""
        scale = np.exp(rng.uniform(-1, 1) * np.log1p(self.augment.scale)) if self.augment else 1.0
        if not self.pixel_mm:
            return (int(round(self.patch * scale)),) * 2
        return (max(8, int(round(self.patch * self.pixel_mm * scale / spacing_xyz[1]))),
                max(8, int(round(self.patch * self.pixel_mm * scale / spacing_xyz[0]))))

    def _planes(self, vol: np.ndarray, z: int, g, rows: slice, cols: slice) -> np.ndarray:
        """HU planes of the region rows x cols, padded with air where it leaves the scan region."""
        h, w = vol.shape[1:]
        inside_r = slice(max(rows.start, 0), min(rows.stop, h))
        inside_c = slice(max(cols.start, 0), min(cols.stop, w))
        planes = sample_planes(vol, z, self.offsets_mm, g, inside_r, inside_c)
        pad = ((0, 0), (inside_r.start - rows.start, rows.stop - inside_r.stop),
               (inside_c.start - cols.start, cols.stop - inside_c.stop))
        return np.pad(planes, pad, constant_values=-1000.0) if any(sum(p) for p in pad) else planes

    def _place_patch(self, uid: str, z: int, positive: bool, size: tuple[int, int],
                     rng: np.random.Generator) -> tuple[int, int]:
        """Top-left corner of a training patch of ``size`` native pixels: around a nodule, a
        vessel-like spot or anywhere in the region."""
        vol = self.volume(uid)
        h, w = vol.shape[1:]
        ph, pw = size
        if positive:
            g = self._geometry[uid]
            boxes = [b for n in self._nodules[uid] if (b := n.box(z, g.spacing, self.min_section)) is not None]
            x1, y1, x2, y2 = boxes[rng.integers(len(boxes))]
            cy = rng.uniform(min(y2, y1 + 1), max(y1, y2 - 1)) if y2 - y1 > 2 else (y1 + y2) / 2
            cx = rng.uniform(min(x2, x1 + 1), max(x1, x2 - 1)) if x2 - x1 > 2 else (x1 + x2) / 2
            # the nodule anywhere in the patch, at least a sixteenth of it from its border when it fits
            my, mx = max(1, ph // 16), max(1, pw // 16)
            y0 = int(cy) - rng.integers(my, max(my + 1, ph - my))
            x0 = int(cx) - rng.integers(mx, max(mx + 1, pw - mx))
        else:
            spots = vessel_like(np.asarray(vol[z])) if rng.random() < 0.5 else None
            if spots is not None and len(spots[0]):
                i = rng.integers(len(spots[0]))
                y0, x0 = int(spots[0][i]) - ph // 2, int(spots[1][i]) - pw // 2
            else:
                y0, x0 = rng.integers(0, max(1, h - ph + 1)), rng.integers(0, max(1, w - pw + 1))
        return int(np.clip(y0, min(0, h - ph), max(0, h - ph))), int(np.clip(x0, min(0, w - pw), max(0, w - pw)))


def vessel_like(plane_hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of small bright structures in dark lung: dense (> -500 HU) with a dark
    (< -500 HU mean) 9x9 neighbourhood, i.e. vessels seen across or along the slice."""
    plane = plane_hu.astype(np.float32)
    return np.nonzero((plane > -500) & (ndimage.uniform_filter(plane, 9) < -500))
