"""ONNX export: the model's own modules, normalization inside, six raw per-level outputs.

Output layout, per stride s in (8, 16, 32):
  `cls_s{s}`: [N, H*W, num_classes] class logits (no sigmoid), row-major cells
  `reg_s{s}`: [N, H*W, 4] (left, top, right, bottom) distances in STRIDE units
  `ang_s{s}`: [N, H*W, 1] angles in radians, raw (rotate models, RTMDet-R; their distances are
             measured along the box's own axes, decoded by rtmdet.inference.rotated)
This is SSCMA's layout, so device code written for SSCMA's RTMDet reads ours. The TFLite
files have the same outputs as NHWC maps [1, H, W, C]: the same bytes (see tflite.py).
Measured on a nano at 192 (random weights made lively, 100 calibration / 50 valid facemask
images; int8 vs float32 TFLite of the same graph, so quantization loss alone):
  * per level, logits, stride units (this layout): scores max 0.053 / mean 8.7e-4, box
    distances max 3.5 px / mean 0.33 px.
  * distances in pixels instead: identical (TFLite folds the x stride into the conv); stride
    units matter only once levels share a tensor.
  * sigmoid in the graph: score mean error x2.1, and 76% of the scores in [0.001, 0.004) come
    out as exactly 0 (the fixed 1/256 output scale); mAP counts scores down to 0.001.
  * one [N, anchors, 4 + C] tensor (stride units + logits): box mean error +60%, max x1.9.
  * one tensor of decoded xyxy boxes + sigmoid scores: score mean error x34 (max 0.75).
The input is `images`: [N, 3, S, S] float BGR pixels 0..255; normalization ((x - mean) / std)
is the first op of the graph, so every runtime feeds raw pixels and int8 files can take raw
uint8 pixels exactly (input scale 1). NMS stays outside; decoding is rtmdet's post-process.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rtmdet.export import ExportError
from rtmdet.export.sidecar import INPUT_NAME, ExportMeta, write_atomic, write_meta

if TYPE_CHECKING:
    import torch

    from rtmdet.models.detector import RTMDet

log = logging.getLogger(__name__)

OPSET = 17
ONNX_INSTALL = "pip install 'rtmdet[onnx]'"


def output_names(strides: tuple[int, ...] | list[int]) -> tuple[list[str], list[str]]:
    """The class-logit and distance output names, in stride order."""
    return [f"cls_s{s}" for s in strides], [f"reg_s{s}" for s in strides]


MASK_FEAT_NAME = "mask_feat"  # the segment task's mask features [N, (S/8)^2, 8] (ONNX)


def mask_output_names(strides: tuple[int, ...] | list[int]) -> tuple[list[str], str]:
    """A segment model's extra outputs: its kernels per level (169 dynamic-conv parameters per
    cell, [N, H*W, 169]) and the mask features of the whole canvas."""
    return [f"ker_s{s}" for s in strides], MASK_FEAT_NAME


def angle_output_names(strides: tuple[int, ...] | list[int]) -> list[str]:
    """A rotate model's extra outputs: its angle per cell and level (radians, [N, H*W, 1])."""
    return [f"ang_s{s}" for s in strides]


def all_output_names(model: "RTMDet") -> list[str]:
    """Every output of the export, in the graph's order."""
    cls_names, reg_names = output_names(model.strides)
    if model.cfg.task == "rotate":
        return cls_names + reg_names + angle_output_names(model.strides)
    if model.cfg.task != "segment":
        return cls_names + reg_names
    ker_names, mask_name = mask_output_names(model.strides)
    return cls_names + reg_names + ker_names + [mask_name]


def input_normalization(mean: "torch.Tensor", std: "torch.Tensor") -> "torch.nn.Module":
    """The export graph's (x - mean) / std as ONE op: a per-channel 1x1 convolution (weight 1/std,
    bias -mean/std), or a multiply when the mean is 0 (x / 255).

    Written as a subtraction and a division, TF's int8 converter gives the difference its own int8
    tensor: x - mean spans ~275 values, a step of 1.08 pixel levels, rounded again by the
    division. One op has one int8 output: the single rounding the fake-quant model simulates
    (rtmdet.quantization.model: q_input, q_norm). On a trashnet CSPNeXt-tiny classifier the
    two roundings put a third of the normalized pixels 1 step off the simulation's."""
    import torch
    from torch import nn

    class Scale(nn.Module):
        def __init__(self, factor: torch.Tensor):
            super().__init__()
            self.register_buffer("factor", factor.view(1, -1, 1, 1).clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.factor

    mean, std = mean.detach().float().reshape(-1), std.detach().float().reshape(-1)
    if not bool(mean.any()):
        return Scale(1.0 / std)
    conv = nn.Conv2d(len(mean), len(mean), 1, groups=len(mean))
    with torch.no_grad():
        conv.weight.copy_((1.0 / std).view(-1, 1, 1, 1))
        conv.bias.copy_(-mean / std)
    return conv.eval()


def _wrapper(model: "RTMDet", layout: str = "flat"):
    from torch import nn

    task = model.cfg.task

    class ExportWrapper(nn.Module):
        """Raw pixels in, six per-level tensors out (distances in stride units): flattened
        [N, H*W, C] ("flat") or the head's own NCHW maps ("maps", what onnx2tf is given). A
        segment model adds its per-level kernels and the mask features, a rotate model its
        per-level angles, laid out alike."""

        def __init__(self, model: "RTMDet"):
            super().__init__()
            net = copy.deepcopy(model).cpu().float().eval()
            # The head multiplies distances by each stride; a stride of 1 leaves them in stride
            # units with no extra op in the graph (the Mul by 1 is folded away).
            net.bbox_head.strides = (1,) * len(net.strides)
            self.net = net
            self.normalize = input_normalization(net.mean, net.std)

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            outputs = self.net(self.normalize(images))
            maps = [*outputs[0], *outputs[1]]
            if task == "segment":  # kernels per level, then the mask features
                maps += [*outputs[2], outputs[3]]
            elif task == "rotate":  # angles per level (radians: no stride in them)
                maps += [*outputs[2]]
            if layout == "maps":
                return tuple(maps)
            return tuple(t.permute(0, 2, 3, 1).flatten(1, 2) for t in maps)

    return ExportWrapper(model)


def _require(module: str, install: str = ONNX_INSTALL):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"the Python package {module!r} is not installed; install it with: {install}") from None


def onnx_model_bytes(model: "RTMDet", *, batch: int = 1, dynamic_batch: bool = False, opset: int = OPSET,
                     layout: str = "flat") -> bytes:
    """Trace the model to ONNX and simplify it; the bytes are identical for identical weights.

    layout "flat" gives the [N, H*W, C] outputs of the .onnx file; "maps" the NCHW head maps,
    the graph handed to onnx2tf (see rtmdet.export.tflite for why).
    """
    return trace_onnx(_wrapper(model, layout), model.cfg.image_size, all_output_names(model), batch=batch,
                      dynamic_batch=dynamic_batch, opset=opset)


def trace_onnx(wrapper, size: int, names: list[str], *, batch: int = 1, dynamic_batch: bool = False,
               opset: int = OPSET) -> bytes:
    """Trace a raw-pixels-in module (input `images` [batch, 3, size, size]) to simplified ONNX bytes."""
    import torch

    onnx = _require("onnx")
    dummy = torch.full((batch, 3, size, size), 114.0)
    axes = {n: {0: "batch"} for n in [INPUT_NAME, *names]} if dynamic_batch else None
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy (TorchScript) exporter: fast, honours opset 17, and names stay ours. It
        # warns that it is deprecated on every call; the dynamo exporter cannot give opset 17.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(wrapper, (dummy,), buf, input_names=[INPUT_NAME], output_names=names,
                          opset_version=opset, dynamic_axes=axes, do_constant_folding=True, dynamo=False)
    proto = _simplify(onnx.load_from_string(buf.getvalue()))
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _simplify(proto):
    """onnxslim (pure Python) or else onnxsim: folds constants and renames nodes stably."""
    try:
        import onnxslim
    except ImportError:
        onnxslim = None
    if onnxslim is not None:
        return onnxslim.slim(proto)
    try:
        import onnxsim
    except ImportError:
        raise ExportError(f"neither onnxslim nor onnxsim is installed; install one with: {ONNX_INSTALL}") from None
    simplified, ok = onnxsim.simplify(proto)
    if not ok:
        raise ExportError("onnxsim could not validate the simplified ONNX graph")
    return simplified


def fixed_inputs(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    """Deterministic test canvases [batch, 3, S, S] uint8: smooth noise with a 114 pad band."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (batch, 3, size // 8 + 1, size // 8 + 1)).astype(np.float32)
    x = np.repeat(np.repeat(low, 8, axis=2), 8, axis=3)[:, :, :size, :size]
    x += rng.normal(0, 12, x.shape)
    x[:, :, size * 3 // 4 :, :] = 114  # like the letterbox padding of a wide image
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def torch_reference(model: "RTMDet", images_uint8: np.ndarray) -> dict[str, np.ndarray]:
    """The wrapper's outputs in torch, by output name: what every export is checked against."""
    import torch

    wrapper = _wrapper(model)
    with torch.no_grad():
        outs = wrapper(torch.from_numpy(images_uint8).float())
    return {n: o.numpy() for n, o in zip(all_output_names(model), outs)}


def check_onnx(model: "RTMDet", data: bytes, batch: int, rtol: float = 2e-3) -> dict[str, float]:
    """Run the ONNX bytes in ONNX Runtime against torch; raise if an output differs by more than
    rtol of its largest magnitude (float32 summation order alone moves a deep net's outputs ~1e-4
    of their range; a real export bug moves them by whole units)."""
    images = fixed_inputs(model.cfg.image_size, batch)
    return compare_onnx(data, images, torch_reference(model, images), rtol)


def compare_onnx(data: bytes, images: np.ndarray, ref: dict[str, np.ndarray], rtol: float = 2e-3) -> dict[str, float]:
    """ONNX Runtime on `images` (uint8 NCHW) against `ref` by output name; raise beyond rtol (see check_onnx)."""
    ort = _require("onnxruntime")
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = sess.run(list(ref), {INPUT_NAME: images.astype(np.float32)})
    diffs = {name: float(np.abs(g - ref[name]).max()) for name, g in zip(ref, got)}
    worst = max(diffs, key=diffs.get)
    for name, diff in diffs.items():
        limit = rtol * max(1.0, float(np.abs(ref[name]).max()))
        if diff > limit:
            raise ExportError(f"ONNX Runtime disagrees with torch on output {name}: max abs diff {diff:.3g} > {limit:.3g}")
    log.info("ONNX Runtime vs torch: max abs diff %.2g (%s)", diffs[worst], worst)
    return diffs


@dataclass
class OnnxExport:
    """What export_onnx wrote and how close it is to torch."""

    path: Path
    meta: ExportMeta
    max_diff: dict[str, float]


def base_meta(model: "RTMDet", classes: list[str] | None, category_ids: list[int] | None,
              source: dict | None, fmt: str, precision: str) -> ExportMeta:
    """The sidecar fields every format shares."""
    from rtmdet import __version__
    from rtmdet.inference.preprocess import NORMALIZATIONS

    n = model.cfg.num_classes
    classes = list(classes) if classes else [f"class_{i}" for i in range(n)]
    if len(classes) != n:
        raise ExportError(f"{len(classes)} class names given for a model with {n} classes")
    mean, std = NORMALIZATIONS[model.cfg.normalization]
    cls_names, reg_names = output_names(model.strides)
    meta = ExportMeta(format=fmt, precision=precision, classes=classes,
                      category_ids=list(category_ids) if category_ids else list(range(n)),
                      image_size=model.cfg.image_size, strides=list(model.strides),
                      normalization=model.cfg.normalization, mean=list(mean), std=list(std),
                      cls_outputs=cls_names, reg_outputs=reg_names, model=model.cfg.to_dict(),
                      source=dict(source or {}), rtmdet_version=__version__)
    if model.cfg.task == "segment":
        meta.kernel_outputs, meta.mask_output = mask_output_names(model.strides)
    elif model.cfg.task == "rotate":
        meta.angle_outputs = angle_output_names(model.strides)
    return meta


def export_onnx(model: "RTMDet", path: str | Path, *, classes: list[str] | None = None,
                category_ids: list[int] | None = None, source: dict | None = None,
                dynamic_batch: bool = False, opset: int = OPSET) -> OnnxExport:
    """Export `model` to `path` (+ `path.json` sidecar), checked against torch in ONNX Runtime."""
    path = Path(path)
    _check_size(model.cfg.image_size)
    data = onnx_model_bytes(model, dynamic_batch=dynamic_batch, opset=opset)
    diffs = check_onnx(model, data, batch=2 if dynamic_batch else 1)
    meta = base_meta(model, classes, category_ids, source, "onnx", "fp32")
    meta.dynamic_batch = dynamic_batch
    write_atomic(path, data)
    write_meta(path, meta)
    log.info("wrote %s (%.1f KB, sha256 %s)", path, len(data) / 1024, hashlib.sha256(data).hexdigest()[:12])
    return OnnxExport(path, meta, diffs)


def _check_size(size: int) -> None:
    if size % 32 or size < 32:
        raise ExportError(f"image size {size} is not a positive multiple of 32 (the largest stride); "
                          "export needs a size every level divides exactly")
