"""The inference path: where a slice's time goes, and what each speed change buys.

    python benchmarks/bench_inference.py [--checkpoint runs/phantom-ccapm/best.pt] [--height 202 --width 370]

1. Stage breakdown of one slice (backbone, feature pyramid, RPN, RoI heads) at batch 1.
2. Per-slice time and achieved GFLOP/s (as a fraction of the fp32 matrix-product rate measured
   in this run) for batch 1/2/4/8, contiguous or channels_last, torch or ONNX Runtime.
3. torchvision's default Faster R-CNN (ResNet-18 FPN, resized to 800 px, 1000 proposals) on a
   512x512 slice, the reference a naive 2D detector starts from.

The default size is the lung box of a 512x512 phantom slice (202x370 px).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line, matmul_gflops  # noqa: E402

from noduledet import checkpoint as ckpt_io  # noqa: E402
from noduledet.inference import Detector  # noqa: E402
from noduledet.models import build_detector  # noqa: E402
from noduledet.models.profile import count_flops, time_call  # noqa: E402


def load(checkpoint: Path | None, batch: int, engine: str, channels_last: bool) -> Detector:
    if checkpoint and checkpoint.is_file():
        return Detector.from_checkpoint(ckpt_io.load(checkpoint), "cpu", batch, engine, channels_last)
    torch.manual_seed(0)
    return Detector(build_detector("ccapm"), (-5.0, 0.0, 5.0), (-1000.0, 400.0), "cpu", batch, engine, channels_last)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("runs/phantom-ccapm/best.pt"))
    p.add_argument("--height", type=int, default=202)
    p.add_argument("--width", type=int, default=370)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-reference", action="store_true", help="skip torchvision's default detector")
    args = p.parse_args()
    peak = matmul_gflops()
    print(f"machine: {machine_line()}")
    print(f"fp32 matrix product: {peak:.1f} GFLOP/s")
    h, w = args.height, args.width

    d = load(args.checkpoint, 1, "torch", False)
    m = d.model
    image = torch.rand(3, h, w)
    flops = count_flops(m, [image]) / 1e9
    with torch.inference_mode():
        batch, _ = m.transform([image])
        body = m.backbone.body(batch.tensors)
        feats = m.backbone(batch.tensors)
        props, _ = m.rpn(batch, feats)
        stages = {
            "backbone": time_call(lambda: m.backbone.body(batch.tensors), args.repeats),
            "feature pyramid": time_call(lambda: m.backbone.fpn(body), args.repeats),
            "RPN (head, anchors, decoding, NMS)": time_call(lambda: m.rpn(batch, feats), args.repeats),
            "RoI heads (RoIAlign, MLP, NMS)": time_call(lambda: m.roi_heads(feats, props, batch.image_sizes), args.repeats),
            "whole model": time_call(lambda: m([image]), args.repeats),
        }
    print(f"\n### one {h}x{w} slice, batch 1, contiguous, torch: {flops:.2f} GFLOPs\n")
    print("| stage | ms | share |\n|---|---:|---:|")
    for k, v in stages.items():
        print(f"| {k} | {v * 1e3:.1f} | {v / stages['whole model']:.0%} |")

    print(f"\n### per slice at {h}x{w}\n")
    print("| engine | layout | batch | ms per slice | GFLOP/s | of matmul peak |\n|---|---|---:|---:|---:|---:|")
    for engine, cl in (("torch", False), ("torch", True), ("onnx", False)):
        for b in (1, 2, 4, 8):
            det = load(args.checkpoint, b, engine, cl)
            images = [torch.rand(3, h, w) for _ in range(b)]
            with torch.inference_mode():
                t = time_call(lambda: det.model(images), args.repeats) / b
            print(f"| {engine} | {'channels_last' if cl else 'contiguous'} | {b} | {t * 1e3:.1f} | {flops / t:.1f} | "
                  f"{flops / t / peak:.0%} |")

    if not args.no_reference:
        from torchvision.models.detection import FasterRCNN
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

        ref = FasterRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None), num_classes=2).eval()
        x = [torch.rand(3, 512, 512)]
        rf = count_flops(ref, x) / 1e9
        with torch.inference_mode():
            t = time_call(lambda: ref(x), 2)
        print(f"\ntorchvision default Faster R-CNN ResNet-18 FPN on a 512x512 slice (resized to 800): "
              f"{rf:.1f} GFLOPs, {t:.2f} s per slice ({rf / t:.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
