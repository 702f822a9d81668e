"""ResNet with attention on the residual branch of every block ("Residual Module-X").

The block output is ReLU(shortcut(x) + attn(U)) where U is the residual branch. Module names
follow torchvision's ResNet (conv1, bn1, layer1.0.conv1, layer1.0.downsample.0, ...), so with
attention "none" and width 1 the state dict is torchvision's, less ``fc``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from noduledet.models.attention import build_attention

AttentionFactory = Callable[[int], nn.Module]

DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}

BASE_WIDTHS = (64, 128, 256, 512)


def make_norm(kind: str) -> Callable[[int], nn.Module]:
    """Normalisation layer factory: "bn" (BatchNorm2d) or "gn" (GroupNorm, up to 32 groups)."""
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "gn":
        return lambda c: nn.GroupNorm(min(32, c // 4) or 1, c)
    raise ValueError(f"unknown norm {kind!r}; choose from ['bn', 'gn']")


def scaled_widths(width: float) -> tuple[int, int, int, int]:
    """Stage widths 64, 128, 256, 512 times ``width``, rounded to multiples of 8 (at least 8)."""
    return tuple(max(8, int(round(c * width / 8)) * 8) for c in BASE_WIDTHS)  # type: ignore[return-value]


def attention_factory(attention: str | AttentionFactory | None, **options) -> AttentionFactory:
    """Turn an attention name (see ``ATTENTIONS``) or a callable into ``channels -> module``."""
    if callable(attention):
        return attention
    build_attention(attention, 8, **options)  # fail now on a bad name or option, not mid-build
    return lambda channels: build_attention(attention, channels, **options)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None,
                 norm: Callable[[int], nn.Module], attn: AttentionFactory):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.attn = attn(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        u = self.relu(self.bn1(self.conv1(x)))
        u = self.bn2(self.conv2(u))
        return self.relu(shortcut + self.attn(u))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv, as torchvision)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None,
                 norm: Callable[[int], nn.Module], attn: AttentionFactory):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = norm(out)
        self.relu = nn.ReLU(inplace=True)
        self.attn = attn(out)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        u = self.relu(self.bn1(self.conv1(x)))
        u = self.relu(self.bn2(self.conv2(u)))
        u = self.bn3(self.conv3(u))
        return self.relu(shortcut + self.attn(u))


class AttnResNet(nn.Module):
    """A ResNet of depth 18, 34 or 50 whose every block carries an attention module.

    Args:
        depth: 18, 34 or 50.
        width: multiplier on the stage widths (1.0 = torchvision's 64..512).
        in_channels: input channels (the number of 2.5D slices).
        attention: a name from ``ATTENTIONS``, or a callable ``channels -> nn.Module``.
        attention_options: keyword options for the named attention.
        norm: "bn" or "gn".

    ``forward`` returns the last stage; ``out_channels`` lists the channels of C2..C5
    (layer1..layer4, strides 4, 8, 16, 32), which a feature pyramid takes.
    """

    def __init__(self, depth: int = 50, width: float = 1.0, in_channels: int = 3,
                 attention: str | AttentionFactory | None = None,
                 attention_options: dict | None = None, norm: str = "bn"):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"unsupported depth {depth}; choose from {sorted(DEPTHS)}")
        kind, layers = DEPTHS[depth]
        self.depth = depth
        block = BasicBlock if kind == "basic" else Bottleneck
        widths = scaled_widths(width)
        norm_layer = make_norm(norm)
        attn = attention_factory(attention, **(attention_options or {}))
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = widths[0]
        self.out_channels: list[int] = []
        for i, (planes, n) in enumerate(zip(widths, layers)):
            stride = 1 if i == 0 else 2
            out = planes * block.expansion
            downsample = None
            if stride != 1 or inplanes != out:
                downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), norm_layer(out))
            blocks = [block(inplanes, planes, stride, downsample, norm_layer, attn)]
            blocks += [block(out, planes, 1, None, norm_layer, attn) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.out_channels.append(out)
            inplanes = out
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
