"""The working pixel spacing: slices resampled on the way in, boxes and masks mapped back."""

import numpy as np
import torch

from noduledet.boxes import scale_boxes
from noduledet.config import AugmentConfig
from noduledet.data.dataset import flip_and_turn, vary_intensity
from noduledet.data.slices import resample, resample_masks, working_shape


def test_working_shape_follows_the_spacing():
    assert working_shape((100, 200), (0.35, 0.5), 0.7) == (71, 100)  # y by 0.5 mm, x by 0.35 mm
    assert working_shape((100, 200), (0.35, 0.5), 0.0) == (100, 200)  # 0: the scan's own pixels


def test_a_box_scaled_to_the_resampled_frame_still_holds_its_square():
    image = np.zeros((1, 60, 90), dtype=np.float32)
    image[0, 12:30, 45:63] = 1.0  # the square [45, 12, 63, 30] in pixel coordinates
    out = resample(image, (40, 45)).numpy()[0]  # y x2/3, x x1/2
    x1, y1, x2, y2 = scale_boxes([[45, 12, 63, 30]], 45 / 90, 40 / 60)[0]
    assert (x1, y1, x2, y2) == (22.5, 8.0, 31.5, 20.0)
    assert out[int(y1) + 1:int(y2) - 1, int(np.ceil(x1)) + 1:int(x2) - 1].min() > 0.9
    assert out[:, :int(x1) - 1].max() < 0.05 and out[int(y2) + 1:].max() < 0.05


def test_masks_resample_by_nearest_and_keep_their_count():
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[0, 2:4, 2:4] = 1
    out = resample_masks(masks, (16, 16))
    assert out.shape == (2, 16, 16) and out.dtype == torch.uint8
    assert out[0].sum() == 16 and out[1].sum() == 0 and set(out.unique().tolist()) <= {0, 1}
    assert resample_masks(np.zeros((0, 8, 8), np.uint8), (4, 4)).shape == (0, 4, 4)


def _square(size=32, box=(4, 6, 12, 10)):
    image = torch.zeros(1, size, size)
    x1, y1, x2, y2 = box
    image[0, y1:y2, x1:x2] = 1
    masks = image.to(torch.uint8).clone()
    return image, {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.ones(1, dtype=torch.int64),
                   "masks": masks}


def test_flips_and_quarter_turns_keep_box_mask_and_pixels_together():
    for seed in range(16):  # every combination of the three random choices comes up
        image, target = _square()
        out_image, out = flip_and_turn(image, target, np.random.default_rng(seed), rot90=True)
        ys, xs = torch.nonzero(out_image[0] > 0.5, as_tuple=True)
        assert out["boxes"][0].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert torch.equal(out["masks"][0].bool(), out_image[0] > 0.5)


def test_intensity_changes_stay_within_their_bounds():
    planes = np.full((3, 16, 16), -800.0, dtype=np.float32)
    aug = AugmentConfig(hu_shift=30, hu_gain=0.05, noise_hu=0, blur_px=0)
    out = vary_intensity(planes, aug, np.random.default_rng(0))
    assert np.allclose(out, out.flat[0]) and -800 * 1.05 - 30 <= out.flat[0] <= -800 * 0.95 + 30
    quiet = AugmentConfig(hu_shift=0, hu_gain=0, noise_hu=0, blur_px=0)
    np.testing.assert_array_equal(vary_intensity(planes, quiet, np.random.default_rng(0)), planes)


class SizedBlobs(torch.nn.Module):
    """A detector without learning that, like a trained one, knows sizes in pixels only: every
    bright blob of the middle channel 7 to 22 px wide (5-15 mm at the working 0.7 mm)."""

    variant = "sized-blobs"

    def __init__(self):
        super().__init__()
        from noduledet.models.detector import DetectorSpec

        self.spec = DetectorSpec()

    def forward(self, images):
        from scipy import ndimage

        out = []
        for image in images:
            labels, _ = ndimage.label(image[image.shape[0] // 2].numpy() > 0.6)
            boxes = [[xs.start, ys.start, xs.stop, ys.stop] for ys, xs in ndimage.find_objects(labels)
                     if ys.start > 0 and xs.start > 0 and ys.stop < labels.shape[0] and xs.stop < labels.shape[1]
                     and 7 <= max(ys.stop - ys.start, xs.stop - xs.start) <= 22]
            b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            out.append({"boxes": b, "scores": torch.full((len(b),), 0.9), "labels": torch.ones(len(b), dtype=torch.int64)})
        return out


DIAMETERS = (6.0, 8.0, 10.0, 12.0, 14.0)


def _chest(pixel_mm: float):
    """Air-filled lungs in soft tissue, 100 mm across, with nodules of ``DIAMETERS`` on a ring at
    mid-height, sampled at ``pixel_mm`` in-plane (1.5 mm slices); the nodules' world centres."""
    from noduledet.data.ct import CTVolume
    from noduledet.geometry import Geometry

    n, nz, sz = int(round(100 / pixel_mm)), 30, 1.5
    y, x = (np.mgrid[:n, :n] + 0.5) * pixel_mm - 50  # mm from the centre
    body, lungs = (y / 55) ** 2 + (x / 55) ** 2 <= 1, (y / 38) ** 2 + (x / 40) ** 2 <= 1
    hu = np.repeat(np.where(lungs, -850, np.where(body, 40, -1000)).astype(np.int16)[None], nz, axis=0)
    hu[:3] = hu[-3:] = np.where(body, 40, -1000)
    z = (np.arange(nz) + 0.5) * sz - nz * sz / 2
    centres = []
    for k, d in enumerate(DIAMETERS):
        cy, cx = 22 * np.sin(2 * np.pi * k / len(DIAMETERS)), 22 * np.cos(2 * np.pi * k / len(DIAMETERS))
        ball = (z[:, None, None] ** 2 + (y - cy)[None] ** 2 + (x - cx)[None] ** 2) <= (d / 2) ** 2
        hu[ball] = 40
        centres.append([cx, cy, 0.0])
    g = Geometry((pixel_mm, pixel_mm, sz), (-50 + pixel_mm / 2, -50 + pixel_mm / 2, z[0]), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                 hu.shape)
    return CTVolume(hu, g), np.array(centres)


def _cpm_and_found(pixel_mm_model: float, pixel_mm_scan: float) -> tuple[float, list[bool]]:
    from noduledet.config import Config, EvalConfig
    from noduledet.data.luna16 import Findings
    from noduledet.inference import Detector
    from noduledet.metrics.froc import froc_curve, scan_outcome, sensitivities_at
    from noduledet.pipeline import Pipeline

    volume, centres = _chest(pixel_mm_scan)
    detector = Detector(SizedBlobs(), (-3.0, 0.0, 3.0), (-1000.0, 400.0), channels_last=False, pixel_mm=pixel_mm_model)
    cands = Pipeline(detector, EvalConfig(), Config()).run_volume(volume).candidates
    uid = np.array(["s"] * len(centres))
    nodules = Findings(uid, centres, np.array(DIAMETERS))
    table = Findings(np.array(["s"] * len(cands), dtype=str), np.array([c.world_xyz for c in cands]).reshape(-1, 3),
                     np.array([c.probability for c in cands]))
    outcome = scan_outcome(nodules, Findings.empty(), table)
    return float(sensitivities_at(*froc_curve([outcome])).mean()), list(np.isfinite(outcome.nodule_probs))


def test_the_same_scan_at_0_6_and_1_0_mm_pixels_scores_the_same():
    """At the working spacing the detector meets every nodule at the size it learnt, whatever the
    scan's pixels; at the scans' own spacing the same detector loses the small nodule of the
    1.0 mm scan, and the two scans' results differ."""
    fine, coarse = _cpm_and_found(0.7, 0.6), _cpm_and_found(0.7, 1.0)
    assert abs(fine[0] - coarse[0]) <= 0.05 and all(fine[1]) and all(coarse[1])
    native_fine, native_coarse = _cpm_and_found(0.0, 0.6), _cpm_and_found(0.0, 1.0)
    assert native_fine[1] != native_coarse[1] and not native_coarse[1][0]  # the 6 mm nodule is 6 px there
