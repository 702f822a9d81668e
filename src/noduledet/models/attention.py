"""Attention modules for the residual branch, built by name.

Every module takes ``channels`` first and maps a feature map (B, C, H, W) to a tensor of the
same shape. One convention holds for all of them, so that in a comparison the attention is the
only thing that differs:

- no bias in any attention conv or MLP (a bias before BatchNorm or a sigmoid gate adds nothing
  the gate cannot learn);
- the channel MLP is 1x1 conv C -> ``reduced_width(C)`` -> C with ReLU, ``reduction`` 16 and
  at least 8 hidden units;
- the coordinate embedding is 1x1 conv C -> m, BatchNorm, h-swish with m = max(8, C // 32);
- BatchNorm only where its statistics cover more than one value per channel (the coordinate
  strips and the CBAM spatial map), so that batch 1 trains.

The channel-coordinate fusions follow the paper (Zhao, Zhao & Ahn, Traitement du Signal 2024)
as resolved in DESIGN.md::

    CCAPM(F): s = ChannelGate(F); ax, ay = CoordCore(mean_W F, s * mean_H F); F * (ax + ay)
    CCASM(F): ax, ay = CoordCore(mean_W F, mean_H F); A = F * ax * ay; A * ChannelGate(A)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def reduced_width(channels: int, reduction: int = 16, minimum: int = 8) -> int:
    """Hidden width of the channel MLP: ``channels // reduction``, at least ``minimum``."""
    return max(minimum, channels // reduction)


def channel_mlp(channels: int, reduction: int = 16) -> nn.Sequential:
    """The channel MLP of SE and CBAM: 1x1 conv C -> ``reduced_width(C)`` -> C, ReLU between, no bias."""
    hidden = reduced_width(channels, reduction)
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 1, bias=False),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, channels, 1, bias=False),
    )


def coord_width(channels: int) -> int:
    """Width m of the coordinate embedding (Hou et al. 2021): max(8, C // 32)."""
    return max(8, channels // 32)


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA's adaptive kernel: the odd number nearest above |log2(C) / gamma + b / gamma|."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ChannelGate(nn.Module):
    """CBAM's channel weights: sigmoid(MLP(mean_hw X) + MLP(max_hw X)), shape (B, C, 1, 1).

    The shared MLP runs once on both descriptors stacked, as matrix products (the 1x1 convs'
    weights viewed as matrices): a third faster than two conv calls on 1x1 maps.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.mlp = channel_mlp(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))])  # (2B, C): means, then maxima
        y = F.linear(F.relu(F.linear(pooled, self.mlp[0].weight.flatten(1))), self.mlp[2].weight.flatten(1))
        return torch.sigmoid(y[:b] + y[b:]).view(b, c, 1, 1)


class ChannelAttention(nn.Module):
    """The channel gate alone: X * ChannelGate(X)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.gate = ChannelGate(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): X * sigmoid(MLP(mean_hw X))."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.mlp = channel_mlp(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.mlp(x.mean(dim=(2, 3), keepdim=True)))


class EfficientChannelAttn(nn.Module):
    """ECA (Wang et al. 2020): a 1D conv across channels of the pooled descriptor, no MLP."""

    def __init__(self, channels: int, kernel_size: int | None = None):
        super().__init__()
        k = kernel_size or eca_kernel_size(channels)
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean(dim=(2, 3))  # (B, C)
        y = self.conv(y.unsqueeze(1)).squeeze(1)  # (B, C)
        return x * torch.sigmoid(y)[:, :, None, None]


class SpatialGate(nn.Module):
    """CBAM's spatial weights: sigmoid(BN(conv7x7([mean_c X, max_c X]))), shape (B, 1, H, W)."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.bn(self.conv(pooled)))


class Cbam(nn.Module):
    """CBAM (Woo et al. 2018): channel attention, then 7x7 spatial attention."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.channel = ChannelGate(channels, reduction)
        self.spatial = SpatialGate(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel(x)
        return x * self.spatial(x)


class SpatialChannel(nn.Module):
    """Spatial attention, then channel attention: our reading of ResSCBlock's attention.

    Cao et al. (Sci Rep 13, 2023) name a residual block with spatial ("S") and channel ("C")
    attention without giving its layout in a form we can check; we read the name as the serial
    order spatial -> channel, the reverse of CBAM, with the same two gates as CBAM.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.spatial = SpatialGate(kernel_size)
        self.channel = ChannelGate(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.spatial(x)
        return x * self.channel(x)


class CoordCore(nn.Module):
    """Shared coordinate embedding of two strips into two attention maps (Hou et al. 2021).

    Args:
        zx: (B, C, H, 1) the map pooled along W (one value per row).
        zy: (B, C, 1, W) the map pooled along H (one value per column).

    Returns:
        ax (B, C, H, 1) and ay (B, C, 1, W), each in (0, 1).
    """

    def __init__(self, channels: int):
        super().__init__()
        m = coord_width(channels)
        self.embed = nn.Sequential(
            nn.Conv2d(channels, m, 1, bias=False), nn.BatchNorm2d(m), nn.Hardswish(inplace=True)
        )
        self.conv_x = nn.Conv2d(m, channels, 1, bias=False)
        self.conv_y = nn.Conv2d(m, channels, 1, bias=False)

    def forward(self, zx: torch.Tensor, zy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the strips as 1D signals (B, C, H+W): 1x1 conv1d is the 2D conv's arithmetic, faster
        b, c, h, _ = zx.shape
        w = zy.shape[3]
        conv, norm, act = self.embed
        z = F.conv1d(torch.cat([zx.reshape(b, c, h), zy.reshape(b, c, w)], dim=2), conv.weight.flatten(2))
        z = act(norm(z.unsqueeze(3)).squeeze(3))  # (B, m, H+W)
        zx, zy = torch.split(z, [h, w], dim=2)
        ax = torch.sigmoid(F.conv1d(zx, self.conv_x.weight.flatten(2))).view(b, c, h, 1)
        ay = torch.sigmoid(F.conv1d(zy, self.conv_y.weight.flatten(2))).view(b, c, 1, w)
        return ax, ay


def _strips(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool (B, C, H, W) along W and along H: (B, C, H, 1) and (B, C, 1, W)."""
    return x.mean(dim=3, keepdim=True), x.mean(dim=2, keepdim=True)


def _combine(x: torch.Tensor, ax: torch.Tensor, ay: torch.Tensor, how: str) -> torch.Tensor:
    return x * (ax + ay) if how == "add" else x * ax * ay


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose from {list(choices)}")


class CoordAttention(nn.Module):
    """Coordinate attention (Hou et al., CVPR 2021): X * ax * ay."""

    def __init__(self, channels: int):
        super().__init__()
        self.core = CoordCore(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ax, ay = self.core(*_strips(x))
        return x * ax * ay


class CCAPM(nn.Module):
    """Channel-coordinate attention, parallel mechanism (the paper's CCAPM).

    The channel weights are embedded into the coordinate strips before the shared coordinate
    embedding, so both attentions are computed from the same input in parallel.

    Args:
        channels: C.
        combine: "add" (the paper's ADD, F * (ax + ay)) or "mul" (coordinate attention's
            F * ax * ay).
        chan_embed: which strips carry the channel weights: "y" (the W strip, default), "xy"
            (both) or "" (none: then CCAPM with combine="mul" is coordinate attention).
        reduction: channel-MLP reduction.
    """

    def __init__(self, channels: int, combine: str = "add", chan_embed: str = "y", reduction: int = 16):
        super().__init__()
        _check_choice("combine", combine, ("add", "mul"))
        _check_choice("chan_embed", chan_embed, ("y", "xy", ""))
        self.combine, self.chan_embed = combine, chan_embed
        self.gate = ChannelGate(channels, reduction) if chan_embed else None
        self.core = CoordCore(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zx, zy = _strips(x)
        if self.gate is not None:
            s = self.gate(x)  # (B, C, 1, 1)
            zy = s * zy
            if self.chan_embed == "xy":
                zx = s * zx
        ax, ay = self.core(zx, zy)
        return _combine(x, ax, ay, self.combine)


class CCASM(nn.Module):
    """Channel-coordinate attention, serial mechanism (the paper's CCASM).

    Coordinate attention first, channel attention on its output.

    Args:
        channels: C.
        combine: how the two coordinate maps weight F: "mul" (default, Hou et al.) or "add".
        reduction: channel-MLP reduction.
    """

    def __init__(self, channels: int, combine: str = "mul", reduction: int = 16):
        super().__init__()
        _check_choice("combine", combine, ("add", "mul"))
        self.combine = combine
        self.core = CoordCore(channels)
        self.gate = ChannelGate(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ax, ay = self.core(*_strips(x))
        a = _combine(x, ax, ay, self.combine)
        return a * self.gate(a)


ATTENTIONS: dict[str, type[nn.Module] | None] = {
    "none": None,
    "se": SqueezeExcite,
    "eca": EfficientChannelAttn,
    "cbam": Cbam,
    "coord": CoordAttention,
    "channel": ChannelAttention,
    "ccapm": CCAPM,
    "ccasm": CCASM,
}


def build_attention(name: str | None, channels: int, **options) -> nn.Module:
    """Build the attention module ``name`` for ``channels`` channels.

    Args:
        name: one of ``ATTENTIONS``; ``None`` or "none" gives ``nn.Identity``.
        channels: C of the (B, C, H, W) input.
        **options: passed to the module (e.g. ``combine``, ``chan_embed``, ``reduction``).

    Returns:
        A module mapping (B, C, H, W) -> (B, C, H, W).

    Example:
        >>> build_attention("ccapm", 64, combine="mul")(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """
    key = "none" if name is None else name
    if key not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; choose from {sorted(ATTENTIONS)}")
    cls = ATTENTIONS[key]
    if cls is None:
        if options:
            raise ValueError(f"attention 'none' takes no options, got {sorted(options)}")
        return nn.Identity()
    return cls(channels, **options)
