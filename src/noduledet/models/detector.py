"""Faster/Mask R-CNN detectors on a feature pyramid, one builder per variant of the paper.

Table 3 of the paper compares attention modules on one ResNet carrier (``res``, ``res-se``,
``res-coord``, ``res-eca``, ``res-cbam``, ``resscblock``, ``ccasm``, ``ccapm``); Table 4
compares backbones (``vgg16``, ``resnet18``, ``resnet50``, ``efficientnet-b0``,
``mobilenet-v3-large`` and the three attention ResNets). Every variant is a backbone
returning four maps at strides 4, 8, 16, 32, a feature pyramid (P2..P5 plus a max-pooled P6),
an RPN on every level and RoI heads, built with torchvision and no pretrained weights. With
``neck="c4"`` any variant is built without the pyramid instead: RPN and RoIAlign on the one map
at stride 16 (``_c4_parts``), as the original Faster R-CNN ResNet and Fast R-CNN VGG detectors.

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

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_iou
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from noduledet.models.attention import SpatialChannel
from noduledet.models.resnet import AttnResNet
from noduledet.models.roi_align import PyramidRoIAlign


@dataclass(frozen=True)
class DetectorSpec:
    """Every size and setting of a detector; presets are instances, options override fields.

    Anchors are square (nodules are round), three sizes per octave, one tuple of sizes in
    pixels per pyramid level (P2..P6, strides 4..64), each repeated at ``anchor_offsets`` centres
    inside its grid cell (4: a quarter stride off the cell's centre in x and y), so that even a
    4 px box has an anchor close enough to reach IoU 0.5 (``anchor_coverage`` measures it). The
    defaults cover 4-100 px: 3-70 mm at the working pixel spacing of 0.7 mm (torchvision's
    32-512 px COCO anchors would miss nodules).
    """

    depth: int = 18  # depth of the Table 3 carrier ResNet (res, res-*, resscblock, ccasm, ccapm)
    width: float = 0.25  # multiplier on backbone widths
    in_channels: int = 3  # 2.5D slices per sample
    num_classes: int = 2  # includes background
    masks: bool = False  # Mask R-CNN head
    norm: str = "bn"
    attention_options: tuple[tuple[str, object], ...] = ()  # e.g. (("combine", "mul"),)
    fpn_channels: int = 64
    anchor_sizes: tuple[tuple[float, ...], ...] = tuple(
        tuple(round(4 * 2**level * 2 ** (k / 3), 2) for k in range(3)) for level in range(5))
    aspect_ratios: tuple[float, ...] = (1.0,)
    anchor_offsets: int = 4  # anchor centres per grid cell: 1 (the cell's) or 4 (a quarter stride around it)
    rpn_fg_iou_thresh: float = 0.5  # torchvision's 0.7 suits COCO's anchors, not 4 px boxes
    rpn_bg_iou_thresh: float = 0.3
    rpn_pre_nms_top_n_train: int = 600
    rpn_pre_nms_top_n_test: int = 300
    rpn_post_nms_top_n_train: int = 300
    rpn_post_nms_top_n_test: int = 100
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 64  # RoIAlign backward dominates a CPU step: few RoIs
    box_positive_fraction: float = 0.25
    representation_size: int = 256
    box_score_thresh: float = 0.01  # low: the second stage and the FROC rank what is kept
    box_nms_thresh: float = 0.3
    box_detections_per_img: int = 20
    mask_layers: tuple[int, ...] = (64, 64)
    # "fpn": the pyramid above (Table 4's model); "c4": one map at stride 16, no pyramid (the
    # original Faster R-CNN ResNet design, Table 3's "ResNet as carrier"; VGG: Fast R-CNN's conv5_3)
    neck: str = "fpn"
    c4_anchor_sizes: tuple[float, ...] = (8, 12, 16, 24, 32, 48, 64, 96)  # neck "c4": all on the one map

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
    if "anchor_sizes" in out:
        out["anchor_sizes"] = tuple(tuple(float(s) for s in level) for level in out["anchor_sizes"])
    for key in ("aspect_ratios", "c4_anchor_sizes"):
        if key in out:
            out[key] = tuple(float(v) for v in out[key])
    if "mask_layers" in out:
        out["mask_layers"] = tuple(out["mask_layers"])
    if "attention_options" in out:
        opts = out["attention_options"]
        items = opts.items() if isinstance(opts, dict) else opts
        out["attention_options"] = tuple(sorted((str(k), v) for k, v in items))
    return out


class NoduleAnchors(AnchorGenerator):
    """torchvision's anchor generator with exact (unrounded) sizes and each anchor repeated at
    several centres inside its grid cell.

    With ``offsets=4`` every size is placed a quarter stride up-left, up-right, down-left and
    down-right of the cell's anchor point: the anchors of a level are as dense as a feature map
    of half the stride, at no cost in features (the RPN head predicts 4x the anchors per cell).
    """

    OFFSETS = {1: ((0.0, 0.0),), 4: ((-0.25, -0.25), (0.25, -0.25), (-0.25, 0.25), (0.25, 0.25))}

    def __init__(self, sizes, aspect_ratios, offsets: int = 4):
        if offsets not in self.OFFSETS:
            raise ValueError(f"anchor_offsets={offsets}; choose from {sorted(self.OFFSETS)}")
        self.offsets = offsets
        super().__init__(sizes, aspect_ratios)

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        """Zero-centred (A, 4) boxes of every size and aspect ratio, not rounded to whole pixels."""
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
        ws = (scales[None, :] / h_ratios[:, None]).reshape(-1)
        hs = (scales[None, :] * h_ratios[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def set_cell_anchors(self, dtype: torch.dtype, device: torch.device) -> None:
        """Keep the anchors in fp32 whatever the feature maps' dtype: torchvision casts them to it,
        and under bf16 autocast a corner beyond 256 px would move by up to 2 px (and stay so)."""
        super().set_cell_anchors(torch.float32, device)

    def num_anchors_per_location(self) -> list[int]:
        return [n * self.offsets for n in super().num_anchors_per_location()]

    def grid_anchors(self, grid_sizes, strides):
        out = []
        for (gh, gw), (sh, sw), base in zip(grid_sizes, strides, self.cell_anchors):
            device = base.device
            ys = torch.arange(gh, device=device, dtype=base.dtype) * sh
            xs = torch.arange(gw, device=device, dtype=base.dtype) * sw
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            cells = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # (HW, 1, 4)
            off = torch.tensor(self.OFFSETS[self.offsets], dtype=base.dtype, device=device)
            off = (off * torch.stack([sw, sh]).to(base.dtype)).repeat(1, 2)  # (K, 4): dx, dy, dx, dy
            anchors = off[:, None, :] + base[None, :, :]  # (K, A, 4): channel k * A + a of the RPN head
            out.append((cells + anchors.reshape(1, -1, 4)).reshape(-1, 4))
        return out


class Fp32BoxCoder(BoxCoder):
    """torchvision's ``BoxCoder`` decoding in fp32 whatever the regression's dtype.

    torchvision casts the reference boxes to the regression output's dtype; under bf16 autocast
    (inference and training on a GPU) a corner beyond 256 px is then rounded to 2 px (1.4 mm at
    0.7 mm pixels), beyond 512 px to 4 px. MONAI and detectron2 decode in fp32; so do we.
    """

    def decode(self, rel_codes: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        return super().decode(rel_codes.float(), [b.float() for b in boxes])


def anchor_coverage(spec: DetectorSpec, sizes_px: tuple[float, float], boxes: int = 2000,
                    seed: int = 0) -> np.ndarray:
    """Best IoU between a square box and the anchors of ``spec``, for ``boxes`` random boxes of
    ``sizes_px[0]``-``sizes_px[1]`` pixels (log-uniform) at random positions; the RPN's positives
    come from the anchors at IoU >= ``rpn_fg_iou_thresh``."""
    rng = np.random.default_rng(seed)
    size = np.exp(rng.uniform(np.log(sizes_px[0]), np.log(sizes_px[1]), boxes))
    centre = rng.uniform(128, 192, (boxes, 2))  # two strides of the coarsest level: every phase
    gt = torch.tensor(np.concatenate([centre - size[:, None] / 2, centre + size[:, None] / 2], 1), dtype=torch.float32)
    model = build_from_spec("res", spec)
    image = torch.zeros(1, spec.in_channels, 320, 320)
    with torch.no_grad():
        features = list(model.backbone(image).values())
        anchors = model.rpn.anchor_generator(ImageList(image, [(320, 320)]), features)[0]
    near = anchors[(anchors[:, 0] < 256) & (anchors[:, 2] > 64) & (anchors[:, 1] < 256) & (anchors[:, 3] > 64)]
    return box_iou(gt, near).max(dim=1).values.numpy()


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


def paper_neck(table: int, variant: str) -> str:
    """The neck the paper's protocol gives a row: Table 3 compares attention on "ResNet as
    carrier" (no pyramid: "c4"); Table 4 compares "the pyramid model" ("fpn") with VGG as a
    "Fast RCNN architecture" ("c4")."""
    if variant not in TABLES.get(table, ()):
        raise ValueError(f"variant {variant!r} is not in Table {table}")
    return "c4" if table == 3 or variant == "vgg16" else "fpn"


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


def _fpn_pool(output_size: int) -> PyramidRoIAlign:
    """RoIAlign over P2..P5 (strides 4..32), two samples per bin."""
    return PyramidRoIAlign(["0", "1", "2", "3"], output_size, 2, first=2, last=5)


def _c4_pool(output_size: int) -> PyramidRoIAlign:
    """RoIAlign on the one stride-16 map of the C4 design."""
    return PyramidRoIAlign(["0"], output_size, 2, first=4, last=4)


NECKS = ("fpn", "c4")


class SingleMap(nn.Module):
    """``body`` up to its child ``layer``, returning {"0": that map}: the RPN's and RoIAlign's one
    feature map when there is no pyramid."""

    def __init__(self, body: nn.Module, layer: str, out_channels: int):
        super().__init__()
        self.body = IntermediateLayerGetter(body, {layer: "0"})
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.body(x)


class Res5Head(nn.Module):
    """ResNet's last stage run on every RoI (14x14 -> 7x7), then averaged: the box head of
    Faster R-CNN's ResNet C4 design (He et al. 2016), so every stage keeps its attention.

    Returns:
        (R, C5) features per RoI.
    """

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x).mean(dim=(2, 3))


def _c4_parts(body: nn.Module, return_layers: dict[str, str], channels: list[int], spec: DetectorSpec):
    """Neck "c4": backbone to stride 16, anchors on that map, RoIAlign and box head.

    ResNets: C4 (layer3) feeds the RPN and RoIAlign 14x14, layer4 is the box head (``Res5Head``).
    Other bodies (VGG: conv5_3, as Fast R-CNN): the last layer at stride 16, RoIAlign 7x7 and
    the two-layer MLP head (VGG's fc6/fc7).

    Returns:
        backbone, anchor generator, box RoI pool, box head, box head width, mask RoI pool.
    """
    anchors = NoduleAnchors((spec.c4_anchor_sizes,), (spec.aspect_ratios,), spec.anchor_offsets)
    if isinstance(body, AttnResNet):
        stage = body.layer4
        backbone = SingleMap(body, "layer3", channels[2])  # IntermediateLayerGetter drops layer4
        return backbone, anchors, _c4_pool(14), Res5Head(stage), channels[3], _c4_pool(14)
    layer = next(k for k, v in return_layers.items() if v == "2")  # the stride-16 tap
    backbone = SingleMap(body, layer, channels[2])
    box_head = TwoMLPHead(channels[2] * 7 * 7, spec.representation_size)
    return backbone, anchors, _c4_pool(7), box_head, spec.representation_size, _c4_pool(14)


def build_from_spec(variant: str, spec: DetectorSpec) -> FasterRCNN:
    """Build ``variant`` with every setting taken from ``spec`` (``spec.neck`` picks FPN or C4)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    if spec.neck not in NECKS:
        raise ValueError(f"neck={spec.neck!r}; choose from {list(NECKS)}")
    body, return_layers, channels = VARIANTS[variant](spec)
    if spec.neck == "c4":
        backbone, anchors, box_pool, box_head, box_width, mask_pool = _c4_parts(body, return_layers, channels, spec)
    else:
        backbone = BackboneWithFPN(body, return_layers, channels, spec.fpn_channels, extra_blocks=LastLevelMaxPool())
        anchors = NoduleAnchors(spec.anchor_sizes, (spec.aspect_ratios,) * len(spec.anchor_sizes), spec.anchor_offsets)
        box_pool, box_width, mask_pool = _fpn_pool(7), spec.representation_size, _fpn_pool(14)
        box_head = TwoMLPHead(spec.fpn_channels * 7 * 7, spec.representation_size)
    rpn_head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0])
    common = dict(
        num_classes=None,
        min_size=1, max_size=1, image_mean=[0.0], image_std=[1.0],  # replaced by CTTransform below
        rpn_anchor_generator=anchors, rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=spec.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=spec.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=spec.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=spec.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=spec.rpn_batch_size_per_image,
        rpn_fg_iou_thresh=spec.rpn_fg_iou_thresh, rpn_bg_iou_thresh=spec.rpn_bg_iou_thresh,
        box_roi_pool=box_pool, box_head=box_head,
        box_predictor=FastRCNNPredictor(box_width, spec.num_classes),
        box_score_thresh=spec.box_score_thresh, box_nms_thresh=spec.box_nms_thresh,
        box_detections_per_img=spec.box_detections_per_img,
        box_batch_size_per_image=spec.box_batch_size_per_image,
        box_positive_fraction=spec.box_positive_fraction,
    )
    if spec.masks:
        model = MaskRCNN(
            backbone, **common,
            mask_roi_pool=mask_pool,
            mask_head=MaskRCNNHeads(backbone.out_channels, spec.mask_layers, 1),
            mask_predictor=MaskRCNNPredictor(spec.mask_layers[-1], spec.mask_layers[-1], spec.num_classes),
        )
    else:
        model = FasterRCNN(backbone, **common)
    model.transform = CTTransform()
    model.rpn.box_coder = Fp32BoxCoder(model.rpn.box_coder.weights)
    model.roi_heads.box_coder = Fp32BoxCoder(model.roi_heads.box_coder.weights)
    model.variant = variant
    model.spec = spec
    return model


def describe_variant(variant: str, preset: str = "tiny", **options) -> str:
    """One line saying what ``build_detector(variant, preset, **options)`` builds: carrier,
    attention (with the CCAPM/CCASM form), neck and heads; for ``noduledet models``.

    Example:
        >>> describe_variant("ccapm", neck="c4")
        "ccapm: ResNet-18 x0.25, attention ccapm (form 'hou', combine 'add', chan_embed 'y'), neck c4 (...)"
    """
    from noduledet.models.attention import describe_attention

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    spec = resolve_spec(preset, **options)
    body, _, channels = VARIANTS[variant](spec)
    if isinstance(body, AttnResNet):
        carrier = f"ResNet-{body.depth} x{spec.width:g}, attention {describe_attention(body.layer1[0].attn)}"
    else:
        carrier = f"{variant} x{spec.width:g}"
    if spec.neck == "c4":
        head = "res5 head" if isinstance(body, AttnResNet) else f"RoIAlign 7x7, MLP head {spec.representation_size}"
        neck = f"neck c4 (one map at stride 16, {channels[2]} channels, {head})"
    else:
        neck = f"neck fpn (P2-P6, {spec.fpn_channels} channels)"
    return f"{variant}: {carrier}, {neck}, {'Mask' if spec.masks else 'Faster'} R-CNN"


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
