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

The channel-coordinate fusions of the paper (Zhao, Zhao & Ahn, Traitement du Signal 2024) come
in two forms (``form``; docs/model.md gives both sets of equations and the reading of the OCR):

- "hou" (default): the reading of DESIGN.md, built on Hou et al.'s coordinate-attention core::

    CCAPM(F): s = ChannelGate(F); ax, ay = CoordCore(mean_W F, s * mean_H F); F * (ax + ay)
    CCASM(F): ax, ay = CoordCore(mean_W F, mean_H F); A = F * ax * ay; A * ChannelGate(A)

- "paper": the paper's eq 11-18 as written: a sigmoid(Conv1) gate per direction, full-width
  (C -> C) 1x1 convs where the paper names a convolution, no coordinate core.
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


FORMS = ("hou", "paper")


def _gate_conv(channels: int) -> nn.Conv2d:
    """The paper's Conv1 / conv2d: a 1x1 conv C -> C without bias (one gate value per channel)."""
    return nn.Conv2d(channels, channels, 1, bias=False)


def _conv_strip(conv: nn.Conv2d, z: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv on strips (B, C, L): the 2D conv's arithmetic as conv1d, which is faster."""
    return F.conv1d(z, conv.weight.flatten(2))


class CCAPM(nn.Module):
    """Channel-coordinate attention, parallel mechanism (the paper's CCAPM).

    Both forms embed the channel weights into the coordinate strips, so the two attentions are
    computed from the same input in parallel, and return F * (gain along H + gain along W).

    ``form="hou"`` (default): the strips go through Hou et al.'s coordinate core (shared 1x1
    conv to m channels, BatchNorm, h-swish, split, a 1x1 conv back to C per direction,
    sigmoid); the channel weights s sit on the W strip (``chan_embed="y"``)::

        ax, ay = CoordCore(mean_W F, s * mean_H F);  F * (ax + ay)

    ``form="paper"``: eq 11-14 and Table 1 as written, per direction a gate E = sigmoid(Conv1(strip))
    (Conv1 a 1x1 conv C -> C), both strips channel-weighted, then concat, conv2d (1x1, C -> C),
    BatchNorm, split, sigmoid and ADD (E_w is the paper's E_x, E_h its E_y)::

        E_w = sigmoid(Conv1_w(mean_H F)) (B,C,1,W);  E_h = sigmoid(Conv1_h(mean_W F)) (B,C,H,1)
        F_w = E_w * s * mean_H F;  F_h = E_h * s * mean_W F     # eq 11-12: Pool_avg(E x F_c)
        a_h, a_w = split(BN(conv2d(cat[F_h, F_w^T])), [H, W])    # eq 13
        F * (sigmoid(a_h) + sigmoid(a_w))                        # ADD; eq 14's + F is the block's

    Args:
        channels: C.
        form: "hou" or "paper".
        combine: form "hou" only: "add" (default, the paper's ADD, F * (ax + ay)) or "mul"
            (coordinate attention's F * ax * ay).
        chan_embed: form "hou" only: which strips carry the channel weights: "y" (the W strip,
            default), "xy" (both) or "" (none: then with combine="mul" it is coordinate attention).
        reduction: channel-MLP reduction.
    """

    def __init__(self, channels: int, form: str = "hou", combine: str | None = None,
                 chan_embed: str | None = None, reduction: int = 16):
        super().__init__()
        _check_choice("form", form, FORMS)
        self.form = form
        if form == "paper":
            _refuse_hou_options(combine=combine, chan_embed=chan_embed)
            self.combine, self.chan_embed = "add", "xy"
            self.gate = ChannelGate(channels, reduction)
            self.conv_h, self.conv_w = _gate_conv(channels), _gate_conv(channels)  # Conv1 of E_y, E_x
            self.fuse = _gate_conv(channels)  # eq 13's conv2d
            self.bn = nn.BatchNorm2d(channels)
            return
        combine = "add" if combine is None else combine
        chan_embed = "y" if chan_embed is None else chan_embed
        _check_choice("combine", combine, ("add", "mul"))
        _check_choice("chan_embed", chan_embed, ("y", "xy", ""))
        self.combine, self.chan_embed = combine, chan_embed
        self.gate = ChannelGate(channels, reduction) if chan_embed else None
        self.core = CoordCore(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._paper(x) if self.form == "paper" else self._hou(x)

    def _hou(self, x: torch.Tensor) -> torch.Tensor:
        zx, zy = _strips(x)
        if self.gate is not None:
            s = self.gate(x)  # (B, C, 1, 1)
            zy = s * zy
            if self.chan_embed == "xy":
                zx = s * zx
        ax, ay = self.core(zx, zy)
        return _combine(x, ax, ay, self.combine)

    def _paper(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s = self.gate(x).view(b, c, 1)
        zh, zw = x.mean(dim=3), x.mean(dim=2)  # (B, C, H) pooled along W, (B, C, W) along H
        fh = torch.sigmoid(_conv_strip(self.conv_h, zh)) * s * zh  # E_h * mean_W(F_c)
        fw = torch.sigmoid(_conv_strip(self.conv_w, zw)) * s * zw  # E_w * mean_H(F_c)
        z = _conv_strip(self.fuse, torch.cat([fh, fw], dim=2))  # (B, C, H+W)
        ah, aw = torch.split(self.bn(z.unsqueeze(3)).squeeze(3), [h, w], dim=2)
        return x * (torch.sigmoid(ah).view(b, c, h, 1) + torch.sigmoid(aw).view(b, c, 1, w))

    def extra_repr(self) -> str:
        return f"form={self.form!r}, combine={self.combine!r}, chan_embed={self.chan_embed!r}"


class CCASM(nn.Module):
    """Channel-coordinate attention, serial mechanism (the paper's CCASM).

    Coordinate attention first, channel attention on its output.

    ``form="hou"`` (default): Hou et al.'s coordinate attention, then CBAM's channel gate::

        ax, ay = CoordCore(mean_W F, mean_H F);  A = F * ax * ay;  A * ChannelGate(A)

    ``form="paper"``: eq 15-18, Fig. 2 and Table 2 as written: the outer product of the two
    per-direction gates, conv2d (1x1, C -> C), BatchNorm, non-linearity (h-swish), channel
    attention, sigmoid; the map weights F::

        A = sigmoid(Conv1_h(mean_W F)) (B,C,H,1) x sigmoid(Conv1_w(mean_H F)) (B,C,1,W)  # eq 15
        G = hswish(BN(conv2d(A)))                                                        # eq 16
        F * sigmoid(G * ChannelGate(G))                                                  # eq 17

    Args:
        channels: C.
        form: "hou" or "paper".
        combine: form "hou" only: how the two coordinate maps weight F: "mul" (default, Hou et
            al.) or "add".
        reduction: channel-MLP reduction.
    """

    def __init__(self, channels: int, form: str = "hou", combine: str | None = None, reduction: int = 16):
        super().__init__()
        _check_choice("form", form, FORMS)
        self.form = form
        if form == "paper":
            _refuse_hou_options(combine=combine)
            self.combine = "outer"
            self.conv_h, self.conv_w = _gate_conv(channels), _gate_conv(channels)  # Conv1 of eq 15
            self.fuse = _gate_conv(channels)  # eq 16's Conv2d
            self.bn = nn.BatchNorm2d(channels)
            self.act = nn.Hardswish()
        else:
            combine = "mul" if combine is None else combine
            _check_choice("combine", combine, ("add", "mul"))
            self.combine = combine
            self.core = CoordCore(channels)
        self.gate = ChannelGate(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "paper":
            zh, zw = _strips(x)
            a = torch.sigmoid(self.conv_h(zh)) * torch.sigmoid(self.conv_w(zw))  # (B, C, H, W), eq 15
            g = self.act(self.bn(self.fuse(a)))  # eq 16
            return x * torch.sigmoid(g * self.gate(g))  # eq 17
        ax, ay = self.core(*_strips(x))
        a = _combine(x, ax, ay, self.combine)
        return a * self.gate(a)

    def extra_repr(self) -> str:
        return f"form={self.form!r}, combine={self.combine!r}"


def _refuse_hou_options(**options) -> None:
    given = sorted(k for k, v in options.items() if v is not None)
    if given:
        raise ValueError(f"form='paper' fixes {given} (the paper's equations); they apply to form='hou' only")


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


def describe_attention(attention: str | None | nn.Module, **options) -> str:
    """One line naming an attention (a name with options, or a built module) and, for
    ccapm/ccasm, its form and options.

    Example:
        >>> describe_attention("ccapm", form="paper")
        "ccapm (form 'paper', combine 'add', chan_embed 'xy')"
    """
    module = attention if isinstance(attention, nn.Module) else build_attention(attention, 8, **options)
    if isinstance(module, nn.Identity):
        return "none"
    name = {cls: n for n, cls in ATTENTIONS.items() if cls is not None}.get(type(module), type(module).__name__)
    if isinstance(module, (CCAPM, CCASM)):
        settings = (("form", module.form), ("combine", module.combine), ("chan_embed", getattr(module, "chan_embed", None)))
        return f"{name} (" + ", ".join(f"{k} {v!r}" for k, v in settings if v is not None) + ")"
    return name


def build_attention(name: str | None, channels: int, **options) -> nn.Module:
    """Build the attention module ``name`` for ``channels`` channels.

    Args:
        name: one of ``ATTENTIONS``; ``None`` or "none" gives ``nn.Identity``.
        channels: C of the (B, C, H, W) input.
        **options: passed to the module (e.g. ``form``, ``combine``, ``chan_embed``, ``reduction``).

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
