"""A torch Dataset of 2.5D axial samples from a prepared cache.

Training items are every slice that cuts a nodule (positives) plus, each epoch, sampled
negatives: half of them centred on a vessel-like structure (a small bright spot in dark lung,
the confounder a 2D detector must learn to reject: hard negatives) and half on a random lung
slice. Training samples are square patches (``patch`` pixels) placed so that the nodule falls
anywhere inside; evaluation samples are whole lung-cropped slices.

Each item is ``(image, target, info)``: image (C, H, W) float32 in [0, 1]; target with
``boxes`` (N, 4) x1,y1,x2,y2 pixels, ``labels`` (N,) int64 and, with ``masks``, ``masks``
(N, H, W) uint8; info with ``uid``, ``z`` (slice index in the cache's crop) and ``origin_yx``
(where the sample's top-left pixel lies in the crop).

Randomness (negatives, patch placement, augmentation) comes from (seed, epoch, index) alone,
so a run resumed at an epoch sees the samples it would have seen.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from noduledet.data.cache import SliceCache
from noduledet.data.slices import OFFSETS_MM, WINDOW_HU, sample_planes, slice_targets, window


def collate(batch):
    """Lists of images, targets and infos (detection models take lists)."""
    images, targets, infos = zip(*batch)
    return list(images), list(targets), list(infos)


class SliceDataset(Dataset):
    """Axial 2.5D samples of some scans of a cache.

    Args:
        cache: a prepared ``SliceCache``.
        uids: the scans to draw from (one side of a split).
        train: training items and patches (else every lung slice, whole).
        patch: training patch size in pixels.
        negatives: negatives per positive per epoch (training).
        offsets_mm: world z offsets of the channels.
        window_hu: HU mapped to 0 and 1.
        masks: also return instance masks (Mask R-CNN).
        augment: random flips, scaling and intensity jitter (training).
        slices: evaluation takes "all" lung slices or only the "positive" ones, those cutting a
            nodule (the paper's test set: "images of lung nodules").
        slice_stride: evaluation takes every ``slice_stride``-th of those slices.
        seed: the run's seed.
    """

    def __init__(self, cache: SliceCache, uids: list[str], train: bool = True, patch: int = 192,
                 negatives: float = 1.0, offsets_mm=OFFSETS_MM, window_hu=WINDOW_HU, masks: bool = False,
                 augment: bool = True, slices: str = "all", slice_stride: int = 1, min_section: float = 0.5,
                 seed: int = 0):
        if slices not in ("all", "positive"):
            raise ValueError(f"slices={slices!r}; choose from ['all', 'positive']")
        self.cache, self.uids, self.train = cache, list(uids), train
        self.patch, self.negatives = patch, negatives
        self.offsets_mm, self.window_hu = tuple(offsets_mm), tuple(window_hu)
        self.masks, self.augment, self.min_section, self.seed = masks, augment and train, min_section, seed
        self.epoch = 0
        self._nodules = {u: cache.nodules(u) for u in self.uids}
        self._geometry = {u: cache.geometry(u) for u in self.uids}
        self.positives: list[tuple[str, int]] = []
        self.negative_pool: list[tuple[str, int]] = []
        for u in self.uids:
            g = self._geometry[u]
            for z in cache.meta(u)["lung_slices"]:
                has = any(n.box(z, g.spacing, min_section) is not None for n in self._nodules[u])
                (self.positives if has else self.negative_pool).append((u, z))
        self.slices = (self.positives if slices == "positive" else
                       [(u, z) for u in self.uids for z in cache.meta(u)["lung_slices"]])[::slice_stride]
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
        vol = self.volume(uid)
        g = self._geometry[uid]
        h, w = vol.shape[1:]
        if self.train:
            rng = self._rng(index)
            y0, x0 = self._place_patch(uid, z, positive, rng)
        else:
            y0, x0 = 0, 0
        size_y, size_x = (self.patch, self.patch) if self.train else (h, w)
        rows, cols = slice(y0, min(y0 + size_y, h)), slice(x0, min(x0 + size_x, w))
        planes = window(sample_planes(vol, z, self.offsets_mm, g, rows, cols), *self.window_hu)
        target = slice_targets(self._nodules[uid], z, g.spacing, rows, cols, self.masks, self.min_section)
        if planes.shape[1:] != (size_y, size_x):  # a crop smaller than the patch: pad with air (0)
            pad = ((0, 0), (0, size_y - planes.shape[1]), (0, size_x - planes.shape[2]))
            planes = np.pad(planes, pad)
            if self.masks:
                target["masks"] = np.pad(target["masks"], pad)
        image = torch.from_numpy(planes)
        boxes = torch.from_numpy(target["boxes"])
        out = {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64)}
        if self.masks:
            out["masks"] = torch.from_numpy(target["masks"])
        if self.augment:
            image, out = self._augment(image, out, index)
        return image, out, {"uid": uid, "z": z, "origin_yx": (y0, x0)}

    def _place_patch(self, uid: str, z: int, positive: bool, rng: np.random.Generator) -> tuple[int, int]:
        """Top-left corner of a training patch: around a nodule, a vessel-like spot or anywhere."""
        vol = self.volume(uid)
        h, w = vol.shape[1:]
        p = self.patch
        if positive:
            g = self._geometry[uid]
            boxes = [b for n in self._nodules[uid] if (b := n.box(z, g.spacing, self.min_section)) is not None]
            x1, y1, x2, y2 = boxes[rng.integers(len(boxes))]
            cy = rng.uniform(min(y2, y1 + 1), max(y1, y2 - 1)) if y2 - y1 > 2 else (y1 + y2) / 2
            cx = rng.uniform(min(x2, x1 + 1), max(x1, x2 - 1)) if x2 - x1 > 2 else (x1 + x2) / 2
            # the nodule anywhere in the patch, at least 8 px from its border when it fits
            m = min(8, p // 4)
            y0 = int(cy) - rng.integers(m, max(m + 1, p - m))
            x0 = int(cx) - rng.integers(m, max(m + 1, p - m))
        else:
            spots = _vessel_like(np.asarray(vol[z])) if rng.random() < 0.5 else None
            if spots is not None and len(spots[0]):
                i = rng.integers(len(spots[0]))
                y0, x0 = int(spots[0][i]) - p // 2, int(spots[1][i]) - p // 2
            else:
                y0, x0 = rng.integers(0, max(1, h - p + 1)), rng.integers(0, max(1, w - p + 1))
        return int(np.clip(y0, 0, max(0, h - p))), int(np.clip(x0, 0, max(0, w - p)))

    def _augment(self, image: torch.Tensor, target: dict, index: int):
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        canvas = tuple(image.shape[-2:])
        sample = {"image": tv_tensors.Image(image),
                  "boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=canvas),
                  "labels": target["labels"]}
        if "masks" in target:
            sample["masks"] = tv_tensors.Mask(target["masks"])
        transform = v2.Compose([
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            # scaling keeps a box tight; rotation would not (a rotated box's box is larger)
            v2.RandomApply([v2.RandomAffine(degrees=0, scale=(0.85, 1.15))], p=0.5),
            v2.SanitizeBoundingBoxes(min_size=1.0),
        ])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self._rng(index).integers(2**62)))
            sample = transform(sample)
            gain = 1 + 0.05 * (2 * torch.rand(1) - 1)  # +-5% contrast
            image = (sample["image"].as_subclass(torch.Tensor) * gain).clamp_(0, 1)
        out = {"boxes": sample["boxes"].as_subclass(torch.Tensor), "labels": sample["labels"]}
        if "masks" in sample:
            out["masks"] = sample["masks"].as_subclass(torch.Tensor)
        return image, out


def _vessel_like(plane_hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of small bright structures in dark lung: dense (> -500 HU) with a dark
    (< -500 HU mean) 9x9 neighbourhood, i.e. vessels seen across or along the slice."""
    plane = plane_hu.astype(np.float32)
    return np.nonzero((plane > -500) & (ndimage.uniform_filter(plane, 9) < -500))
