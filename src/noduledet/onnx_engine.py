"""The convolutional part of a detector on ONNX Runtime, the rest in torchvision.

On a CPU, ONNX Runtime runs the backbone, the feature pyramid and the RPN head (the
convolutions: three quarters of a slice's time) about twice as fast as eager PyTorch — it folds
BatchNorm into the convolutions and fuses activations. Proposal decoding, NMS and the RoI heads
stay torchvision's, so the output follows the same code. The graph is exported in memory from
the loaded weights (dynamic batch, height and width); nothing is written or downloaded.
"""

from __future__ import annotations

import io
import warnings

import torch
from torchvision.models.detection.rpn import concat_box_prediction_layers

from noduledet.errors import UserError


class _Convolutional(torch.nn.Module):
    """backbone + FPN + RPN head, returning a flat tuple: levels, objectness, deltas."""

    def __init__(self, model):
        super().__init__()
        self.backbone, self.head = model.backbone, model.rpn.head

    def forward(self, x):
        features = list(self.backbone(x).values())
        objectness, deltas = self.head(features)
        return (*features, *objectness, *deltas)


class OnnxDetector(torch.nn.Module):
    """Eval-mode drop-in for a torchvision ``FasterRCNN`` built by ``build_detector``.

    Called as ``model(list_of_images)``; returns torchvision's per-image dicts.
    """

    def __init__(self, model, threads: int = 0):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("the onnx engine needs onnxruntime: pip install 'noduledet[onnx]'") from None
        if model.spec.masks:
            raise UserError("the onnx engine runs Faster R-CNN checkpoints; this one has a mask head")
        self.model = model.eval()
        example = torch.zeros(1, model.spec.in_channels, 64, 64)
        with torch.no_grad():
            self.levels = list(model.backbone(example).keys())  # "0".."3", "pool"
        buffer = io.BytesIO()
        names = [f"p{i}" for i in range(len(self.levels))]
        names += [f"obj{i}" for i in range(len(self.levels))] + [f"box{i}" for i in range(len(self.levels))]
        dynamic = {"x": {0: "batch", 2: "height", 3: "width"}, **{n: {0: "batch", 2: f"h_{n}", 3: f"w_{n}"} for n in names}}
        # the TorchScript exporter: it needs no onnxscript and handles the dynamic sizes here
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(_Convolutional(model), example, buffer, input_names=["x"], output_names=names,
                              dynamic_axes=dynamic, opset_version=17, dynamo=False)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    @torch.inference_mode()
    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        m = self.model
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        batch, _ = m.transform(images)
        outputs = [torch.from_numpy(o) for o in self.session.run(None, {"x": batch.tensors.numpy()})]
        n = len(self.levels)
        features = dict(zip(self.levels, outputs[:n]))
        objectness, deltas = outputs[n:2 * n], outputs[2 * n:]
        proposals = _proposals(m.rpn, batch, list(features.values()), objectness, deltas)
        detections, _ = m.roi_heads(features, proposals, batch.image_sizes)
        return m.transform.postprocess(detections, batch.image_sizes, original_sizes)


def _proposals(rpn, images, features, objectness, deltas):
    """torchvision's RPN after its head (eval): anchors, decoding, per-level top-k and NMS."""
    anchors = rpn.anchor_generator(images, features)
    per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(deltas, anchors).view(len(anchors), -1, 4)
    boxes, _ = rpn.filter_proposals(proposals, objectness, images.image_sizes, per_level)
    return boxes
