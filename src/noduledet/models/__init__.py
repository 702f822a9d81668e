"""Attention modules, the attention ResNet and the detectors of the paper's Tables 3 and 4."""

from noduledet.models.attention import ATTENTIONS, build_attention, describe_attention
from noduledet.models.detector import (NECKS, PRESETS, TABLES, VARIANTS, DetectorSpec, build_detector, build_from_spec,
                                       describe_variant, paper_neck)
from noduledet.models.resnet import AttnResNet

__all__ = [
    "ATTENTIONS", "NECKS", "PRESETS", "TABLES", "VARIANTS", "AttnResNet", "DetectorSpec",
    "build_attention", "build_detector", "build_from_spec", "describe_attention", "describe_variant", "paper_neck",
]
