"""The 3D proposer: a small fully convolutional network that marks nodule centres in a whole scan.

A slice detector sees a disc; a bump on the pleura, a thickening of a vessel or a faint
ground-glass blob over several slices is plain only in 3D. The proposer looks at the scan region
resampled to a coarse isotropic grid (``spacing_mm``, about 1.25 mm) and answers, for every cell
of a grid twice as coarse, how likely a nodule's centre lies there, where in the cell, and how
large the nodule is: a centre heat map, as CenterNet (Zhou et al. 2019) and CPM-Net (Song et
al., MICCAI 2020) predict them. Its peaks join stage one's candidates before stage two ranks them.

Architecture (``width`` w): a stride-2 stem and a convolution at half resolution (w channels),
two more halvings (2w, then 4w with a dilated convolution: about 70 mm of view), and a decoder
that upsamples twice and adds the encoder's maps of the same resolution; a 1x1 head gives five
maps at half the input's resolution: the centre logit, the offset of the centre from the cell
(z, y, x, in cells) and the log of the diameter in units of 10 mm. 3x3x3 convolutions with
BatchNorm and ReLU; the input's sides must be multiples of 8 (``pad_to``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

STRIDE = 2  # input voxels per output cell
MULTIPLE = 8  # the input's sides are multiples of this (three halvings)
HEAT, OFFSET, SIZE = 0, slice(1, 4), 4  # output channels
PRIOR = 0.01  # the initial centre probability of every cell (focal-loss practice)


@dataclass(frozen=True)
class ProposerSpec:
    """What the proposer sees and its size (stored beside its weights in a checkpoint)."""

    spacing_mm: float  # the isotropic grid the scan is resampled to
    width: int  # channels at half resolution (then x2, x4)
    window_hu: tuple[float, float]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["window_hu"] = list(self.window_hu)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ProposerSpec:
        return cls(**{**d, "window_hu": tuple(d["window_hu"])})


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class NoduleProposer3D(nn.Module):
    """Centre heat map of nodules in a volume.

    ``forward(x)``: x (B, 1, D, H, W) in [0, 1] (``window``), sides multiples of 8 ->
    (B, 5, D/2, H/2, W/2): channel 0 the centre logit, 1-3 the centre's offset (z, y, x) from the
    cell in cells, 4 log(diameter / 10 mm). Cell k of an axis is centred on input voxel 2k.
    """

    def __init__(self, spec: ProposerSpec):
        super().__init__()
        self.spec = spec
        w = spec.width
        self.down2 = nn.Sequential(_conv(1, w, 2), _conv(w, w))
        self.down4 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))
        self.down8 = nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w), _conv(4 * w, 4 * w, dilation=2))
        self.lateral8 = nn.Conv3d(4 * w, 2 * w, 1)
        self.fuse4 = _conv(2 * w, 2 * w)
        self.lateral4 = nn.Conv3d(2 * w, w, 1)
        self.fuse2 = _conv(w, w)
        self.head = nn.Conv3d(w, 5, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv3d) and m is not self.head:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.bias[HEAT] = -math.log((1 - PRIOR) / PRIOR)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f2 = self.down2(x)
        f4 = self.down4(f2)
        f8 = self.down8(f4)
        u4 = self.fuse4(f4 + nn.functional.interpolate(self.lateral8(f8), size=f4.shape[2:], mode="nearest"))
        u2 = self.fuse2(f2 + nn.functional.interpolate(self.lateral4(u4), size=f2.shape[2:], mode="nearest"))
        return self.head(u2)

    def window(self, hu: torch.Tensor) -> torch.Tensor:
        """HU (B, D, H, W) -> the network's input (B, 1, D, H, W) in [0, 1]."""
        lo, hi = self.spec.window_hu
        return ((hu - lo) / (hi - lo)).clamp_(0, 1).unsqueeze(1)


def pad_to(shape: tuple[int, ...], multiple: int = MULTIPLE) -> tuple[int, ...]:
    """Each side of ``shape`` rounded up to a multiple of ``multiple``."""
    return tuple(-(-n // multiple) * multiple for n in shape)
