"""The second stage: a small 3D CNN that tells a nodule from what a slice detector mistakes for one.

On one axial slice a vessel seen end-on and a nodule are both a bright disc; in 3D the vessel is
a tube running through the slices and the nodule a blob. The classifier sees an isotropic cube
around each stage-one candidate (``data.patches``) and scores it.

Architecture: a 3x3x3 stem convolution at full resolution, then two stages of two 3x3x3
convolutions (BatchNorm, ReLU), each stage after a max-pool that halves the cube, then global
average and max pooling and a linear layer: 0.23 GFLOPs for a 24^3 patch at width 16.
With ``context`` k >= 2 a second branch of the same layers sees a coarser cube around the same
point: k times the edge at k times the spacing (38.4 mm at 1.6 mm beside the 19.2 mm cube at 0.8 mm),
where a vessel is seen to run on and to fork; the two branches' pooled features meet in the head.
Input: HU windowed to [0, 1]; output: one logit per patch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ClassifierSpec:
    """What the classifier sees and its size (stored beside its weights in a checkpoint; the
    defaults are the config's, ``noduledet.fpr.classifier_spec``)."""

    size: int  # patch edge, voxels ...
    spacing_mm: float  # ... of this size
    width: int  # channels of the first stage (then x2, x4)
    window_hu: tuple[float, float]
    context: int = 0  # k >= 2: a second cube of k times the edge at k times the spacing; 0: none (older checkpoints)

    @property
    def edge(self) -> int:
        """Voxels (at ``spacing_mm``) of the cube cut around a candidate: both views come from it."""
        return self.size * max(1, self.context)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["window_hu"] = list(self.window_hu)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierSpec:
        return cls(**{**d, "window_hu": tuple(d["window_hu"])})


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]


class _HalvingMaxPool(nn.Module):
    """``nn.MaxPool3d(2)``. Without gradients (inference) as the maximum of two strided halves
    along each axis: the same values, 6.5 times faster on the CPU than torch's 3D max pooling for a
    batch of 32 first-stage cubes (benchmarks/bench_training.py); with gradients torch's, whose
    backward is fast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            return nn.functional.max_pool3d(x, 2)
        x = x[:, :, : x.shape[2] // 2 * 2, : x.shape[3] // 2 * 2, : x.shape[4] // 2 * 2]  # pooling floors odd sizes
        x = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
        x = torch.maximum(x[:, :, :, 0::2], x[:, :, :, 1::2])
        return torch.maximum(x[..., 0::2], x[..., 1::2])


def _stage(cin: int, cout: int) -> nn.Sequential:
    """Max-pool (halves the cube), then two convolutions."""
    return nn.Sequential(_HalvingMaxPool(), *_conv(cin, cout), *_conv(cout, cout))


def _branch(w: int) -> nn.Sequential:
    """The stem and both stages: one view of the cube -> 4w feature maps."""
    return nn.Sequential(*_conv(1, w), _stage(w, 2 * w), _stage(2 * w, 4 * w))


class NoduleClassifier3D(nn.Module):
    """Nodule or not, from an isotropic HU cube.

    ``forward(x)``: x (B, C, D, D, D) in [0, 1] (``window``'s views: C = 1, or 2 with context)
    -> (B,) logits.
    """

    def __init__(self, spec: ClassifierSpec):
        super().__init__()
        self.spec = spec
        w = spec.width
        self.features = _branch(w)
        self.context = _branch(w) if spec.context else None
        self.head = nn.Linear(8 * w * (2 if spec.context else 1), 1)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.features(x[:, :1])] + ([self.context(x[:, 1:])] if self.context is not None else [])
        pooled = torch.cat([p for f in branches for p in (f.mean(dim=(2, 3, 4)), f.amax(dim=(2, 3, 4)))], dim=1)
        return self.head(pooled).squeeze(1)

    def window(self, hu: torch.Tensor) -> torch.Tensor:
        """HU cubes (B, E, E, E) of ``spec.edge`` -> the network's input (B, C, S, S, S) in [0, 1]
        of ``spec.size``: the central S cube, and with context the whole cube averaged over k^3
        blocks. For an even size both views are symmetric about the centre: a flip of the cube flips them."""
        lo, hi = self.spec.window_hu
        x = ((hu - lo) / (hi - lo)).clamp_(0, 1).unsqueeze(1)
        if not self.spec.context:
            return x
        a = (x.shape[2] - self.spec.size) // 2
        centre = x[:, :, a:a + self.spec.size, a:a + self.spec.size, a:a + self.spec.size]
        return torch.cat([centre, nn.functional.avg_pool3d(x, self.spec.context)], dim=1)
