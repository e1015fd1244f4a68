"""Compare a fake-quant model with an int8 .tflite, tensor by tensor and output by output.

`match_scales` finds, for every activation quantizer, the TFLite tensor that holds the same
values (same element count, best correlation on one image: layouts differ and onnx2tf's
tensor names say nothing about ours) and sets their scales side by side. It answers "does
the trained model quantize where and how the exported file does?" with numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rtmdet.export.onnx import angle_output_names, output_names
from rtmdet.quantization.fakequant import quantizers, set_fake_quant
from rtmdet.quantization.model import QATDetector


@dataclass
class ScaleMatch:
    """One quantizer and the TFLite tensor found to hold the same values."""

    quantizer: str
    tensor: str
    torch_scale: float
    torch_zero_point: int
    tflite_scale: float
    tflite_zero_point: int
    correlation: float

    @property
    def ratio(self) -> float:
        return self.tflite_scale / self.torch_scale


def _interpreter(path: str | Path | bytes, preserve: bool):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tensorflow.lite.python.interpreter import Interpreter
    src = {"model_content": bytes(path)} if isinstance(path, (bytes, bytearray)) else {"model_path": str(path)}
    interp = Interpreter(num_threads=2, experimental_preserve_all_tensors=preserve, **src)
    interp.allocate_tensors()
    return interp


def _activations(model: QATDetector, image_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """Float value at every quantizer of one image (fake-quant off: what a calibrator sees)."""
    seen: dict[str, np.ndarray] = {}

    def keep(name: str):
        def hook(module, inputs, output) -> None:
            seen.setdefault(name, inputs[0].detach().cpu().numpy())
        return hook

    hooks = [q.register_forward_hook(keep(name)) for name, q in quantizers(model) if q.fixed is None]
    set_fake_quant(model, False)
    try:
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(image_nhwc)).permute(0, 3, 1, 2).float()
            model.eval()(model.normalize(x.to(next(model.parameters()).device)))
    finally:
        set_fake_quant(model, True)
        for h in hooks:
            h.remove()
    return seen


def match_scales(model: QATDetector, tflite: str | Path | bytes, image_nhwc: np.ndarray) -> list[ScaleMatch]:
    """Pair each quantizer of `model` with the int8 TFLite tensor holding its values on one
    [1, S, S, 3] image, and list both scales (torch's from the model's current ranges)."""
    interp = _interpreter(tflite, preserve=True)
    inp = interp.get_input_details()[0]
    from rtmdet.export.backends import quantize

    interp.set_tensor(inp["index"], quantize(image_nhwc.astype(np.float32), inp))
    interp.invoke()
    tensors = []
    for d in interp.get_tensor_details():
        scale, zp = d["quantization"]
        if d["dtype"] != np.int8 or not scale or len(d["shape"]) not in (2, 3, 4):
            continue
        try:
            values = (interp.get_tensor(d["index"]).astype(np.float32) - zp) * scale
        except ValueError:  # constants and freed buffers
            continue
        tensors.append((d["name"], float(scale), int(zp), values))
    named = dict(quantizers(model))
    matches = []
    for name, act in _activations(model, image_nhwc).items():
        # Tensors that are linear maps of each other (the input and its x/255) correlate equally:
        # among near-ties, the one whose value range is closest to ours holds our values.
        span = float(act.max() - act.min()) or 1.0
        best = max(((_layout_corr(act, v), t, s, z, float(v.max() - v.min()) or 1.0)
                    for t, s, z, v in tensors if v.size == act.size),
                   default=None, key=lambda r: (round(r[0], 4), -abs(np.log(r[4] / span))))
        if best is None:
            continue
        scale, zp = named[name].scale_zero_point()
        matches.append(ScaleMatch(name, best[1], float(scale), int(zp), best[2], best[3], best[0]))
    return matches


def _layout_corr(torch_nchw: np.ndarray, tfl: np.ndarray) -> float:
    """Correlation of a torch NCHW tensor with a TFLite tensor in NHWC or NCHW layout."""
    candidates = [tfl.reshape(torch_nchw.shape)]
    if torch_nchw.ndim == 4:
        n, c, h, w = torch_nchw.shape
        if tfl.shape == (n, h, w, c) or tfl.size == torch_nchw.size:
            candidates.append(tfl.reshape(n, h, w, c).transpose(0, 3, 1, 2))
    a = torch_nchw.ravel() - torch_nchw.mean()
    best = -1.0
    for cand in candidates:
        b = cand.ravel() - cand.mean()
        denom = float(np.linalg.norm(a) * np.linalg.norm(b))
        best = max(best, float(a @ b) / denom if denom > 0 else -1.0)
    return best


def output_agreement(model: QATDetector, tflite: str | Path, images_nhwc: np.ndarray) -> dict[str, dict[str, float]]:
    """Per output: max and mean |fake-quant torch - int8 TFLite| and the max in output steps
    (the int8 output's scale, the model's own); in export units (logits, stride-unit distances,
    a rotate model's angles in radians)."""
    from rtmdet.export.backends import TFLiteRunner

    runner = TFLiteRunner(tflite)
    cls_names, reg_names = output_names(model.strides)
    rotate = model.cfg.task == "rotate"
    ang_names = angle_output_names(model.strides) if rotate else []
    device = next(model.parameters()).device
    named = dict(quantizers(model))
    heads = (("rtm_cls", cls_names), ("rtm_reg", reg_names), ("rtm_ang", ang_names))
    steps = {name: float(named[f"net.bbox_head.{head}.{lvl}.q"].scale_zero_point()[0])
             for head, names in heads for lvl, name in enumerate(names)}
    result: dict[str, dict[str, float]] = {}
    for i in range(len(images_nhwc)):
        image = images_nhwc[i : i + 1].astype(np.float32)
        got = runner(image)
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2).to(device)
            outputs = model.eval()(model.normalize(x))  # a segment model's kernels and masks are not compared
        ours = {n: t for n, t in zip(cls_names, outputs[0])}
        ours.update({n: t / s for n, t, s in zip(reg_names, outputs[1], model.strides)})
        ours.update(zip(ang_names, outputs[2] if rotate else []))  # a rotate model's angles (radians)
        for name, t in ours.items():
            ref = t.permute(0, 2, 3, 1).cpu().numpy()
            diff = np.abs(got[name].reshape(ref.shape) - ref)
            step = steps[name]
            row = result.setdefault(name, {"max_abs": 0.0, "mean_abs": 0.0, "max_steps": 0.0, "scale": step})
            row["max_abs"] = max(row["max_abs"], float(diff.max()))
            row["mean_abs"] += float(diff.mean()) / len(images_nhwc)
            row["max_steps"] = max(row["max_steps"], float(diff.max()) / step)
    return result


def kernel_agreement(tflite: str | Path, images_nhwc: np.ndarray) -> dict[str, dict[str, float]]:
    """Per output: max and mean |XNNPACK - builtin kernels| of one int8 file: how far two
    correct int8 runtimes of the same file drift apart (the yardstick for output_agreement)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from rtmdet.export.backends import dequantize, quantize

    runs = []
    for resolver in (OpResolverType.AUTO, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES):
        interp = Interpreter(model_path=str(tflite), num_threads=2, experimental_op_resolver_type=resolver)
        interp.allocate_tensors()
        inp = interp.get_input_details()[0]
        outs: dict[str, list[np.ndarray]] = {}
        for i in range(len(images_nhwc)):
            interp.set_tensor(inp["index"], quantize(images_nhwc[i : i + 1].astype(np.float32), inp))
            interp.invoke()
            for d in interp.get_output_details():
                outs.setdefault(d["name"], []).append(dequantize(interp.get_tensor(d["index"]), d))
        runs.append({k: np.concatenate(v) for k, v in outs.items()})
    return {name: {"max_abs": float(np.abs(runs[0][name] - runs[1][name]).max()),
                   "mean_abs": float(np.abs(runs[0][name] - runs[1][name]).mean())} for name in runs[0]}
