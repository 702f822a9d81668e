"""RoIAlign whose backward pass on the CPU is two matrix products instead of torchvision's loop.

torchvision's CPU ``roi_align`` backward visits every (RoI, channel, bin, sample) in one thread
and adds four weighted values into the gradient one by one: a third of a CPU training step of
the tiny detector (112 of 313 ms per batch of 8 patches, measured with torch.profiler). RoIAlign
with axis-aligned boxes is separable: each sample's bilinear weight is a weight along y times a
weight along x, so the pooled output of one RoI is ``Wy @ F @ Wx.T`` with ``Wy`` (bins x H) and
``Wx`` (bins x W) holding the summed sample weights of each bin, and the gradient of the feature
map is ``Wy.T @ G @ Wx``, batched over RoIs. The forward pass stays torchvision's, so outputs
and inference are unchanged; the gradient equals torchvision's to float rounding
(``tests/test_roi_align.py``). Used only where it pays: on the CPU, with gradients on.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, initLevelMapper


def axis_weights(lo: Tensor, hi: Tensor, scale: float, bins: int, sampling: int, size: int) -> Tensor:
    """(K, bins, size): each bin's weight on each row (or column) of the map, for RoIs spanning
    ``lo``..``hi`` in image pixels, with torchvision's rules (``aligned=False``): extent at least
    one map pixel, ``sampling`` samples per bin at its sub-bin centres, samples more than one
    pixel outside the map dropped, the others clamped to it and split between the two
    neighbouring rows; divided by ``sampling`` so that the two axes together average the bin."""
    start = lo * scale
    step = torch.clamp(hi * scale - start, min=1.0) / bins
    ranks = torch.arange(bins, dtype=lo.dtype, device=lo.device)[None, :, None]
    offsets = torch.arange(sampling, dtype=lo.dtype, device=lo.device)[None, None, :] + 0.5
    pos = start[:, None, None] + ranks * step[:, None, None] + offsets * step[:, None, None] / sampling
    valid = ((pos >= -1.0) & (pos <= size)).to(lo.dtype)
    pos = pos.clamp(min=0.0)
    low = pos.floor()
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    frac = torch.where(edge, torch.zeros_like(pos), pos - low)
    high = torch.where(edge, low, low + 1)
    weights = lo.new_zeros((len(lo), bins, size))
    weights.scatter_add_(2, low.long(), (1.0 - frac) * valid)
    weights.scatter_add_(2, high.long(), frac * valid)
    return weights / sampling


class _SeparableRoIAlign(torch.autograd.Function):
    """torchvision's ``roi_align`` forward; the backward as ``Wy.T @ G @ Wx`` per image, in the RoIs' dtype
    (under bf16 autocast the gradient arrives in bf16, the weights are the RoIs' fp32)."""

    @staticmethod
    def forward(ctx, feature: Tensor, rois: Tensor, output_size: tuple[int, int], scale: float,
                sampling: int) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.meta = (feature.shape, feature.dtype, output_size, scale, sampling)
        return roi_align(feature, rois, output_size, scale, sampling, aligned=False)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rois,) = ctx.saved_tensors
        (images, channels, height, width), dtype, (bins_y, bins_x), scale, sampling = ctx.meta
        grad = grad.to(rois.dtype)
        grad_feature = grad.new_zeros((images, channels, height, width))
        if len(rois):
            wy = axis_weights(rois[:, 2], rois[:, 4], scale, bins_y, sampling, height)
            wx = axis_weights(rois[:, 1], rois[:, 3], scale, bins_x, sampling, width)
            rows = grad.reshape(len(rois), channels * bins_y, bins_x).bmm(wx)  # G @ Wx, one product per RoI
            rows = rows.view(len(rois), channels, bins_y, width).transpose(1, 2)  # (K, bins_y, C, W)
            image_of = rois[:, 0].long()
            for image in image_of.unique().tolist():
                k = torch.nonzero(image_of == image)[:, 0]
                wy_k = wy[k].reshape(len(k) * bins_y, height)
                summed = wy_k.T @ rows[k].reshape(len(k) * bins_y, channels * width)  # (H, C * W)
                grad_feature[image] = summed.reshape(height, channels, width).transpose(0, 1)
        return grad_feature.to(dtype), None, None, None, None


def separable_roi_align(feature: Tensor, rois: Tensor, output_size: tuple[int, int], scale: float,
                        sampling: int) -> Tensor:
    """``torchvision.ops.roi_align(..., aligned=False)`` with the matrix-product backward."""
    return _SeparableRoIAlign.apply(feature, rois, output_size, scale, sampling)


class PyramidRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign with the levels' scales set (2^-first .. 2^-last), not inferred, and
    the matrix-product backward when it trains on the CPU.

    torchvision infers the scales on the first call from the feature and image sizes and keeps
    them; for slices of a few dozen pixels, padded to a multiple of 32, that guess is off by a
    level, and every later call inherits it.
    """

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int, first: int, last: int):
        super().__init__(featmap_names, output_size, sampling_ratio)
        if sampling_ratio < 1:
            raise ValueError(f"sampling_ratio={sampling_ratio}: a fixed number of samples per bin is needed")
        self.scales = [2.0**-k for k in range(first, last + 1)]
        self.map_levels = initLevelMapper(first, last, canonical_scale=self.canonical_scale,
                                          canonical_level=self.canonical_level)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        if not (torch.is_grad_enabled() and features[0].device.type == "cpu" and features[0].requires_grad):
            return super().forward(x, boxes, image_shapes)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes) if len(features) > 1 else torch.zeros(len(rois), dtype=torch.long)
        result = features[0].new_zeros((len(rois), features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            idx = torch.nonzero(levels == level)[:, 0]
            result[idx] = separable_roi_align(feature, rois[idx], self.output_size, scale, self.sampling_ratio)
        return result
