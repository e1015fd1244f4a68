"""ONNX Runtime and TFLite backends for the shared `Detector`, built from an exported file.

Each backend takes the same uint8 BGR letterboxed batch as the torch backend and returns the
same per-level maps (class logits [N, C, H, W], distances in pixels [N, 4, H, W]), so the one
pre- and post-process in rtmdet.inference runs on every format. Outputs are matched to levels
by the names in the sidecar, never by order or shape (TFLite files reorder their outputs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rtmdet.export import ExportError
from rtmdet.export.sidecar import ExportMeta, read_meta

log = logging.getLogger(__name__)

RUNTIME_INSTALL = "pip install 'rtmdet[onnx]' (ONNX Runtime) or pip install ai-edge-litert (TFLite)"


def to_level_maps(outs: dict[str, np.ndarray], meta: ExportMeta) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Named outputs -> the Backend's maps. Outputs are channels-last, [N, H*W, C] (ONNX) or
    [N, H, W, C] (TFLite), logits and distances in stride units; both hold the same bytes."""
    cls_maps, reg_maps = [], []
    for stride, cls_name, reg_name in zip(meta.strides, meta.cls_outputs, meta.reg_outputs):
        side = meta.image_size // stride
        for name, dest, scale in ((cls_name, cls_maps, 1.0), (reg_name, reg_maps, float(stride))):
            out = torch.from_numpy(np.asarray(outs[name], dtype=np.float32))
            n, c = out.shape[0], out.shape[-1]
            if out.numel() != n * side * side * c:
                raise ExportError(f"output {name} of shape {list(out.shape)} is not {side}x{side} cells "
                                  f"for stride {stride}")
            # Multiplying by a power-of-two stride is exact in float32.
            dest.append(out.reshape(n, side, side, c).permute(0, 3, 1, 2) * scale)
    return cls_maps, reg_maps


class OnnxRuntimeBackend:
    """Runs an exported .onnx with ONNX Runtime (CPU by default)."""

    def __init__(self, path: str | Path, meta: ExportMeta | None = None, threads: int = 2,
                 providers: Sequence[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError(f"onnxruntime is not installed; install it with: {RUNTIME_INSTALL}") from None
        self.path = Path(path)
        self.meta = meta or read_meta(path)
        self.strides = tuple(self.meta.strides)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))
        inputs = {i.name: i for i in self.session.get_inputs()}
        if self.meta.input_name not in inputs:
            raise ExportError(f"{path}: no input named {self.meta.input_name!r} (has {', '.join(inputs)})")
        batch = inputs[self.meta.input_name].shape[0]
        self.static_batch = batch if isinstance(batch, int) else None
        self.output_names = [*self.meta.cls_outputs, *self.meta.reg_outputs]
        _check_names(path, self.output_names, [o.name for o in self.session.get_outputs()])

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """[N, 3, S, S] float pixels -> raw outputs by name (static-batch files run in chunks)."""
        step = self.static_batch or len(images)
        chunks = [self.session.run(self.output_names, {self.meta.input_name: images[i : i + step]})
                  for i in range(0, len(images), step)]
        return {name: np.concatenate([c[k] for c in chunks]) for k, name in enumerate(self.output_names)}

    def __call__(self, images_uint8: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        x = images_uint8.cpu().numpy().astype(np.float32)
        return to_level_maps(self.run(x), self.meta)


def make_interpreter(model: str | Path | bytes, threads: int = 2):
    """A LiteRT interpreter (ai-edge-litert, else TensorFlow's), tensors allocated."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tensorflow.lite.python.interpreter import Interpreter
        except ImportError:
            raise ExportError(f"no TFLite runtime is installed; install one with: {RUNTIME_INSTALL}") from None
    kwargs = {"model_content": bytes(model)} if isinstance(model, (bytes, bytearray)) else {"model_path": str(model)}
    interp = Interpreter(num_threads=threads, **kwargs)
    interp.allocate_tensors()
    return interp


class TFLiteRunner:
    """One TFLite model: float NHWC pixels in, dequantized float outputs by tensor name out."""

    def __init__(self, model: str | Path | bytes, input_name: str | None = None, threads: int = 2):
        self.interp = make_interpreter(model, threads)
        inputs = self.interp.get_input_details()
        matching = [d for d in inputs if input_name is None or d["name"] == input_name]
        if len(matching) != 1:
            raise ExportError(f"TFLite model has no single input named {input_name!r} "
                              f"(inputs: {', '.join(d['name'] for d in inputs)})")
        self.input = matching[0]
        self.outputs = {d["name"]: d for d in self.interp.get_output_details()}

    def __call__(self, image_nhwc: np.ndarray) -> dict[str, np.ndarray]:
        """One [1, S, S, 3] float image (0..255) -> {output name: float32 array}."""
        self.interp.set_tensor(self.input["index"], quantize(image_nhwc, self.input))
        self.interp.invoke()
        return {name: dequantize(self.interp.get_tensor(d["index"]), d) for name, d in self.outputs.items()}


def quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    """Float -> the tensor's dtype: round to nearest, add the zero point, clip (never truncate)."""
    dtype = detail["dtype"]
    if dtype == np.float32:
        return np.ascontiguousarray(x, dtype=np.float32)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.rint(x / scale) + zero_point, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, detail: dict) -> np.ndarray:
    """Tensor values -> float32: (q - zero_point) * scale for integer tensors."""
    if detail["dtype"] == np.float32:
        return np.array(q, dtype=np.float32)
    scale, zero_point = detail["quantization"]
    return (q.astype(np.float32) - zero_point) * np.float32(scale)


class TFLiteBackend:
    """Runs an exported .tflite (float32, float16 or int8) one image at a time."""

    def __init__(self, path: str | Path, meta: ExportMeta | None = None, threads: int = 2):
        self.path = Path(path)
        self.meta = meta or read_meta(path)
        self.strides = tuple(self.meta.strides)
        self.runner = TFLiteRunner(path, self.meta.input_name, threads)
        _check_names(path, [*self.meta.cls_outputs, *self.meta.reg_outputs], list(self.runner.outputs))

    def __call__(self, images_uint8: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        nhwc = images_uint8.cpu().permute(0, 2, 3, 1).numpy().astype(np.float32)
        per_image = [self.runner(nhwc[i : i + 1]) for i in range(len(nhwc))]
        outs = {name: np.concatenate([p[name] for p in per_image]) for name in per_image[0]}
        return to_level_maps(outs, self.meta)


def _check_names(path: str | Path, wanted: list[str], present: list[str]) -> None:
    missing = [n for n in wanted if n not in present]
    if missing:
        raise ExportError(f"{path}: outputs {', '.join(missing)} named in the sidecar are not in the model "
                          f"(it has {', '.join(present)})")


def open_backend(path: str | Path, threads: int = 2):
    """The backend for an exported file, chosen by its suffix (.onnx or .tflite)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: exported model not found")
    meta = read_meta(path)
    if path.suffix == ".onnx":
        return OnnxRuntimeBackend(path, meta, threads)
    if path.suffix == ".tflite":
        return TFLiteBackend(path, meta, threads)
    raise ExportError(f"{path}: unknown model format {path.suffix!r}; expected .onnx or .tflite")


def detector_from_export(path: str | Path, class_names: Sequence[str] | None = None, threads: int = 2,
                         batch_size: int = 8, **postprocess):
    """A Detector over an exported model; classes and image size come from its sidecar.

    postprocess: PostprocessConfig fields (score_thr, iou_thr, max_per_img, ...).
    """
    from rtmdet.inference.postprocess import PostprocessConfig
    from rtmdet.inference.predictor import Detector

    backend = open_backend(path, threads)
    names = list(class_names) if class_names is not None else backend.meta.classes
    if len(names) != len(backend.meta.classes):
        raise ExportError(f"{path}: {len(names)} class names given for a model with {len(backend.meta.classes)} classes")
    return Detector(backend, names, backend.meta.image_size, PostprocessConfig(**postprocess), batch_size)
