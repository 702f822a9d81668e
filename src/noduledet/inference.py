"""Run a trained detector over the slices of a volume.

``Detector`` holds a model with the sampling it was trained with (2.5D offsets, HU window,
working pixel spacing) and turns a (z, y, x) volume into per-slice detections, batching slices
and without autograd. Slices are resampled to the working spacing on the way in and the boxes
and masks mapped back to the volume's own pixels on the way out.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from noduledet.boxes import scale_boxes, shift_boxes
from noduledet.candidates import SliceDetections
from noduledet.checkpoint import Checkpoint, load_weights
from noduledet.data.slices import resample, resample_masks, sample_planes, window, working_shape
from noduledet.errors import UserError
from noduledet.geometry import Geometry
from noduledet.models.detector import DetectorSpec, build_from_spec


MIN_BOX_PX = 1.0  # boxes narrower than a working pixel (clipped at a slice's edge) are no finding
PRECISIONS = {"auto": None, "bf16": torch.bfloat16, "fp32": None}  # Detector's precision -> autocast dtype


class Detector:
    """A model plus its input sampling: volume in, per-slice detections out.

    Args:
        model: a detector from ``build_detector``.
        offsets_mm: world z offsets of the 2.5D channels the model was trained with.
        window_hu: HU window mapped to [0, 1].
        device: where to run.
        batch_size: slices per forward pass (4 is fastest on a 2-core CPU; see docs/benchmarks.md).
        engine: "torch", or "onnx" (the convolutions on ONNX Runtime; CPU, Faster R-CNN).
        channels_last: NHWC weights, faster for oneDNN and cuDNN convolutions.
        pixel_mm: the working pixel spacing the model was trained at (0: each volume's own).
        precision: "auto" (bf16 autocast on a GPU, fp32 on the CPU), "bf16" or "fp32"; boxes are
            decoded in fp32 either way (``Fp32BoxCoder``).
    """

    def __init__(self, model: torch.nn.Module, offsets_mm, window_hu, device: torch.device | str = "cpu",
                 batch_size: int = 4, engine: str = "torch", channels_last: bool = True, pixel_mm: float = 0.0,
                 precision: str = "auto"):
        self.device = torch.device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}; choose from {sorted(PRECISIONS)}")
        self.autocast = PRECISIONS[precision] if precision != "auto" else (
            torch.bfloat16 if self.device.type == "cuda" else None)  # the autocast dtype, None: fp32
        self.variant, self.spec = model.variant, model.spec
        model = model.to(self.device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if engine == "onnx":
            if self.device.type != "cpu":
                raise UserError("the onnx engine runs on the CPU; use --device cpu or --engine torch")
            from noduledet.onnx_engine import OnnxDetector

            model = OnnxDetector(model)
        elif engine != "torch":
            raise UserError(f"engine {engine!r}; choose from ['onnx', 'torch']")
        self.model = model
        self.offsets_mm, self.window_hu, self.pixel_mm = tuple(offsets_mm), tuple(window_hu), pixel_mm
        self.batch_size = batch_size
        self.timings = {"prepare_s": 0.0, "model_s": 0.0}  # accumulated over detect() calls

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, device: torch.device | str = "cpu", batch_size: int = 4,
                        engine: str = "torch", channels_last: bool = True) -> Detector:
        """The checkpoint's model with the sampling of its run."""
        model = build_from_spec(ckpt.variant, DetectorSpec.from_dict(ckpt.spec))
        load_weights(model, ckpt.model, ckpt.path, f"the {ckpt.variant} variant its spec describes")
        data = ckpt.config.data
        return cls(model, data.offsets_mm, data.window_hu, device, batch_size, engine, channels_last, data.pixel_mm)

    @property
    def masks(self) -> bool:
        return bool(self.spec.masks)

    def sample(self, hu: np.ndarray, geometry: Geometry, z: int, rows: slice, cols: slice) -> torch.Tensor:
        """The (C, h, w) input for slice ``z`` of the region ``rows`` x ``cols``, at the working spacing."""
        planes = window(sample_planes(hu, z, self.offsets_mm, geometry, rows, cols), *self.window_hu)
        return resample(planes, working_shape(planes.shape[1:], geometry.spacing, self.pixel_mm))

    @torch.inference_mode()
    def detect(self, hu: np.ndarray, geometry: Geometry, slices, rows: slice | None = None,
               cols: slice | None = None, progress=None) -> list[SliceDetections]:
        """Detections on each slice in ``slices``, boxes in the volume's pixel frame.

        Args:
            hu: (Z, Y, X) HU volume (array or memory map).
            geometry: its geometry.
            slices: slice indices to run on.
            rows, cols: the region of each slice to look at (default: all of it).
            progress: optional callable wrapping the batch iterator.
        """
        rows = rows or slice(0, hu.shape[1])
        cols = cols or slice(0, hu.shape[2])
        native = (rows.stop - rows.start, cols.stop - cols.start)
        work = working_shape(native, geometry.spacing, self.pixel_mm)
        back = (native[1] / work[1], native[0] / work[0])  # working pixels -> the volume's, x and y
        slices = list(slices)
        batches = [slices[i:i + self.batch_size] for i in range(0, len(slices), self.batch_size)]
        out = []
        for batch in progress(batches) if progress else batches:
            t0 = time.perf_counter()
            images = [self.sample(hu, geometry, z, rows, cols).to(self.device) for z in batch]
            t1 = time.perf_counter()
            with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16,
                                enabled=self.autocast is not None):
                results = self.model(images)
            self.timings["prepare_s"] += t1 - t0
            self.timings["model_s"] += time.perf_counter() - t1
            for z, r in zip(batch, results):
                b = r["boxes"].float().cpu()
                keep = ((b[:, 2] - b[:, 0]) >= MIN_BOX_PX) & ((b[:, 3] - b[:, 1]) >= MIN_BOX_PX)
                boxes = shift_boxes(scale_boxes(b[keep].numpy(), *back), cols.start, rows.start)
                masks = None
                if "masks" in r:
                    masks = resample_masks(r["masks"][keep, 0] >= 0.5, native).numpy().astype(bool)
                out.append(SliceDetections(int(z), boxes, r["scores"][keep].float().cpu().numpy(), masks,
                                           (rows.start, cols.start)))
        return out
