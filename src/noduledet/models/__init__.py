"""Attention modules, the attention ResNet and the detectors of the paper's Tables 3 and 4."""

from noduledet.models.attention import ATTENTIONS, build_attention
from noduledet.models.detector import PRESETS, TABLES, VARIANTS, DetectorSpec, build_detector, build_from_spec
from noduledet.models.resnet import AttnResNet

__all__ = [
    "ATTENTIONS", "PRESETS", "TABLES", "VARIANTS", "AttnResNet", "DetectorSpec",
    "build_attention", "build_detector", "build_from_spec",
]
