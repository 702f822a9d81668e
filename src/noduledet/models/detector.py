"""Faster/Mask R-CNN detectors on a feature pyramid, one builder per variant of the paper.

Table 3 of the paper compares attention modules on one ResNet carrier (``res``, ``res-se``,
``res-coord``, ``res-eca``, ``res-cbam``, ``resscblock``, ``ccasm``, ``ccapm``); Table 4
compares backbones (``vgg16``, ``resnet18``, ``resnet50``, ``efficientnet-b0``,
``mobilenet-v3-large`` and the three attention ResNets). Every variant is a backbone
returning four maps at strides 4, 8, 16, 32, a feature pyramid (P2..P5 plus a max-pooled P6),
an RPN on every level and RoI heads, built with torchvision and no pretrained weights.

Train/eval contract (torchvision's): in ``train()`` mode ``model(images, targets)`` returns a
dict of losses; in ``eval()`` mode ``model(images)`` returns one dict per image with
``boxes`` (N, 4) x1,y1,x2,y2 pixels, ``scores`` (N,), ``labels`` (N,) and, with masks on,
``masks`` (N, 1, H, W) in [0, 1]. Images are (C, H, W) float tensors already windowed to
[0, 1]; they are neither resized nor normalised (no ImageNet statistics for CT).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import initLevelMapper
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from noduledet.models.attention import SpatialChannel
from noduledet.models.resnet import AttnResNet


@dataclass(frozen=True)
class DetectorSpec:
    """Every size and setting of a detector; presets are instances, options override fields.

    Anchor sizes are in pixels, one tuple per pyramid level (P2..P6, strides 4..64): the
    defaults cover 4-96 px, that is 3-30 mm nodules at 0.5-1 mm per pixel (torchvision's
    32-512 px COCO anchors would miss them).
    """

    depth: int = 18  # depth of the Table 3 carrier ResNet (res, res-*, resscblock, ccasm, ccapm)
    width: float = 0.25  # multiplier on backbone widths
    in_channels: int = 3  # 2.5D slices per sample
    num_classes: int = 2  # includes background
    masks: bool = False  # Mask R-CNN head
    norm: str = "bn"
    attention_options: tuple[tuple[str, object], ...] = ()  # e.g. (("combine", "mul"),)
    fpn_channels: int = 64
    anchor_sizes: tuple[tuple[int, ...], ...] = ((4, 6), (8, 12), (16, 24), (32, 48), (64, 96))
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 600
    rpn_pre_nms_top_n_test: int = 300
    rpn_post_nms_top_n_train: int = 300
    rpn_post_nms_top_n_test: int = 100
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 64  # RoIAlign backward dominates a CPU step: few RoIs
    box_positive_fraction: float = 0.25
    representation_size: int = 256
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.3
    box_detections_per_img: int = 20
    mask_layers: tuple[int, ...] = (64, 64)

    def to_dict(self) -> dict:
        """Plain dict (lists for tuples) for configs and checkpoints."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, values: dict) -> DetectorSpec:
        """Inverse of ``to_dict``; unknown keys raise ValueError naming them."""
        return replace(cls(), **_as_spec_fields(values))


PRESETS: dict[str, DetectorSpec] = {
    # trains on a 2-core CPU in minutes: ResNet-18 at a quarter width, 64-channel pyramid
    "tiny": DetectorSpec(),
    # the paper's size, for a GPU: ResNet-50 width, 256-channel pyramid, torchvision's counts
    "paper": DetectorSpec(
        depth=50, width=1.0, fpn_channels=256, rpn_pre_nms_top_n_train=2000,
        rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_train=2000, rpn_post_nms_top_n_test=1000,
        box_batch_size_per_image=512, representation_size=1024, box_detections_per_img=100,
        mask_layers=(256, 256, 256, 256),
    ),
}


def _as_spec_fields(values: dict) -> dict:
    names = {f.name for f in fields(DetectorSpec)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown detector option(s) {unknown}; choose from {sorted(names)}")
    out = dict(values)
    for key in ("anchor_sizes",):
        if key in out:
            out[key] = tuple(tuple(int(s) for s in level) for level in out[key])
    for key in ("aspect_ratios", "mask_layers"):
        if key in out:
            out[key] = tuple(out[key])
    if "attention_options" in out:
        opts = out["attention_options"]
        items = opts.items() if isinstance(opts, dict) else opts
        out["attention_options"] = tuple(sorted((str(k), v) for k, v in items))
    return out


class CTTransform(GeneralizedRCNNTransform):
    """Batching only: CT slices arrive windowed to [0, 1] at their native pixel size.

    torchvision's transform resizes to 800-1333 px and subtracts ImageNet statistics; both
    are wrong for CT (the resize changes the pixel spacing the anchors were chosen for).
    """

    def __init__(self, size_divisible: int = 32):
        super().__init__(min_size=0, max_size=0, image_mean=[], image_std=[], size_divisible=size_divisible)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if not image.is_floating_point():
            raise TypeError(f"images must be float tensors in [0, 1], got {image.dtype}")
        return image

    def resize(self, image, target=None):
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size_divisible={self.size_divisible})"


# A backbone builder returns (body, return_layers, channels of the four returned maps).
Backbone = tuple[nn.Module, dict[str, str], list[int]]

_RESNET_LAYERS = {f"layer{i + 1}": str(i) for i in range(4)}


def _attn_resnet(attention, depth: int | None = None) -> Callable[[DetectorSpec], Backbone]:
    def build(spec: DetectorSpec) -> Backbone:
        options = dict(spec.attention_options) if isinstance(attention, str) else {}
        body = AttnResNet(depth or spec.depth, spec.width, spec.in_channels, attention, options, spec.norm)
        return body, dict(_RESNET_LAYERS), body.out_channels

    return build


def _replace_first_conv(module: nn.Module, in_channels: int) -> None:
    """Swap the first Conv2d for one taking ``in_channels`` (torchvision stems take 3)."""
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    setattr(parent, name, nn.Conv2d(
                        in_channels, child.out_channels, child.kernel_size, child.stride,
                        child.padding, bias=child.bias is not None))
                return


def _tap_strides(features: nn.Sequential, in_channels: int) -> Backbone:
    """Return the last child of ``features`` at each stride 4, 8, 16, 32, and their channels.

    The strides and channels are read off a forward pass on a 64x64 input, so the rule holds
    for any torchvision feature stack (VGG, EfficientNet, MobileNet) at any width.
    """
    taps: dict[int, tuple[int, int]] = {}
    x = torch.zeros(1, in_channels, 64, 64)
    was_training = features.training
    features.eval()
    with torch.no_grad():
        for i, child in enumerate(features):
            x = child(x)
            stride = 64 // x.shape[-1]
            if stride in (4, 8, 16, 32):
                taps[stride] = (i, x.shape[1])
    features.train(was_training)
    last = taps[32][0]
    body = nn.Sequential(*list(features.children())[: last + 1])
    return_layers = {str(taps[s][0]): str(k) for k, s in enumerate((4, 8, 16, 32))}
    return body, return_layers, [taps[s][1] for s in (4, 8, 16, 32)]


def _vgg16(spec: DetectorSpec) -> Backbone:
    # VGG-16 with BatchNorm: from scratch the plain VGG-16 trains poorly on small batches
    cfg = [v if v == "M" else max(8, int(round(v * spec.width / 8)) * 8)
           for v in torchvision.models.vgg.cfgs["D"]]
    features = torchvision.models.vgg.make_layers(cfg, batch_norm=True)
    _replace_first_conv(features, spec.in_channels)
    return _tap_strides(features, spec.in_channels)


def _efficientnet_b0(spec: DetectorSpec) -> Backbone:
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    setting, last_channel = _efficientnet_conf("efficientnet_b0", width_mult=spec.width, depth_mult=1.0)
    features = EfficientNet(setting, dropout=0.2, last_channel=last_channel).features
    _replace_first_conv(features, spec.in_channels)
    return _tap_strides(features, spec.in_channels)


def _mobilenet_v3_large(spec: DetectorSpec) -> Backbone:
    features = torchvision.models.mobilenet_v3_large(weights=None, width_mult=spec.width).features
    _replace_first_conv(features, spec.in_channels)
    return _tap_strides(features, spec.in_channels)


VARIANTS: dict[str, Callable[[DetectorSpec], Backbone]] = {
    # Table 3: attention modules on the same ResNet carrier (depth and width from the preset)
    "res": _attn_resnet(None),
    "res-se": _attn_resnet("se"),
    "res-coord": _attn_resnet("coord"),
    "res-eca": _attn_resnet("eca"),
    "res-cbam": _attn_resnet("cbam"),
    "resscblock": _attn_resnet(SpatialChannel),
    "ccasm": _attn_resnet("ccasm"),
    "ccapm": _attn_resnet("ccapm"),
    # Table 4: backbones (width from the preset; ResNets are torchvision's layout, see resnet.py)
    "vgg16": _vgg16,
    "resnet18": _attn_resnet(None, depth=18),
    "resnet50": _attn_resnet(None, depth=50),
    "efficientnet-b0": _efficientnet_b0,
    "mobilenet-v3-large": _mobilenet_v3_large,
}

TABLES: dict[int, tuple[str, ...]] = {
    3: ("res", "res-se", "res-coord", "res-eca", "res-cbam", "resscblock", "ccasm", "ccapm"),
    4: ("vgg16", "resnet18", "resnet50", "efficientnet-b0", "mobilenet-v3-large", "resscblock", "ccasm", "ccapm"),
}


def same_network(variant: str, preset: str = "tiny") -> str:
    """The Table 3 variant that builds exactly ``variant``'s network at ``preset``, else ``variant``.

    Table 3's carrier is a plain ResNet of the preset's depth, so Table 4's ``resnet18`` is
    ``res`` at the tiny preset and ``resnet50`` is ``res`` at the paper preset.
    """
    depth = {"resnet18": 18, "resnet50": 50}.get(variant)
    return "res" if depth == resolve_spec(preset).depth else variant


def resolve_spec(preset: str = "tiny", **options) -> DetectorSpec:
    """The preset's ``DetectorSpec`` with ``options`` replacing its fields."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[preset], **_as_spec_fields(options))


def build_detector(variant: str, preset: str = "tiny", **options) -> FasterRCNN:
    """Build a detector by variant name.

    Args:
        variant: one of ``VARIANTS``.
        preset: "tiny" (CPU) or "paper" (GPU, the paper's size).
        **options: any ``DetectorSpec`` field, e.g. ``masks=True``, ``in_channels=5``,
            ``fpn_channels=128``, ``attention_options={"combine": "mul"}``.

    Returns:
        A torchvision ``FasterRCNN`` (``MaskRCNN`` when ``masks``), with ``.variant`` and
        ``.spec`` set so that it can be rebuilt from a checkpoint.

    Example:
        >>> model = build_detector("ccapm", preset="tiny", masks=True).eval()
        >>> out = model([torch.rand(3, 128, 128)])[0]  # boxes, scores, labels, masks
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    spec = resolve_spec(preset, **options)
    return build_from_spec(variant, spec)


def _roi_align(output_size: int) -> MultiScaleRoIAlign:
    """RoIAlign over P2..P5 with the levels' scales set (1/4 .. 1/32), not inferred.

    torchvision infers them on the first call from the feature and image sizes and keeps them;
    for slices of a few dozen pixels, padded to a multiple of 32, that guess is off by a level,
    and every later call inherits it.
    """
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size, 2)
    pool.scales = [2.0**-k for k in range(2, 6)]
    pool.map_levels = initLevelMapper(2, 5, canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level)
    return pool


def build_from_spec(variant: str, spec: DetectorSpec) -> FasterRCNN:
    """Build ``variant`` with every setting taken from ``spec``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    body, return_layers, channels = VARIANTS[variant](spec)
    backbone = BackboneWithFPN(body, return_layers, channels, spec.fpn_channels, extra_blocks=LastLevelMaxPool())
    anchors = AnchorGenerator(spec.anchor_sizes, (spec.aspect_ratios,) * len(spec.anchor_sizes))
    rpn_head = RPNHead(spec.fpn_channels, anchors.num_anchors_per_location()[0])
    box_head = TwoMLPHead(spec.fpn_channels * 7 * 7, spec.representation_size)
    common = dict(
        num_classes=None,
        min_size=1, max_size=1, image_mean=[0.0], image_std=[1.0],  # replaced by CTTransform below
        rpn_anchor_generator=anchors, rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=spec.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=spec.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=spec.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=spec.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=spec.rpn_batch_size_per_image,
        box_roi_pool=_roi_align(7), box_head=box_head,
        box_predictor=FastRCNNPredictor(spec.representation_size, spec.num_classes),
        box_score_thresh=spec.box_score_thresh, box_nms_thresh=spec.box_nms_thresh,
        box_detections_per_img=spec.box_detections_per_img,
        box_batch_size_per_image=spec.box_batch_size_per_image,
        box_positive_fraction=spec.box_positive_fraction,
    )
    if spec.masks:
        model = MaskRCNN(
            backbone, **common,
            mask_roi_pool=_roi_align(14),
            mask_head=MaskRCNNHeads(spec.fpn_channels, spec.mask_layers, 1),
            mask_predictor=MaskRCNNPredictor(spec.mask_layers[-1], spec.mask_layers[-1], spec.num_classes),
        )
    else:
        model = FasterRCNN(backbone, **common)
    model.transform = CTTransform()
    model.variant = variant
    model.spec = spec
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
