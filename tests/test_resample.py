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
