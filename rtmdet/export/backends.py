"""ONNX Runtime and TFLite backends for the shared `Detector`, built from an exported file.

Each backend takes the same uint8 BGR letterboxed batch as the torch backend and returns the
same per-level maps (class logits [N, C, H, W], distances in pixels [N, 4, H, W]; a segment
model's kernels and mask features, a rotate model's angles after them), so the one pre- and
post-process in rtmdet.inference runs on every format (rotated boxes: rtmdet.export.rotated). Outputs are matched to levels
by the names in the sidecar, never by order or shape (TFLite files reorder their outputs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Sequence

import numpy as np
import torch

from rtmdet.errors import first_line
from rtmdet.export import ExportError
from rtmdet.export.kernel_scale import apply_kernel_scale
from rtmdet.export.sidecar import ExportMeta, meta_path, read_meta

log = logging.getLogger(__name__)

RUNTIME_INSTALL = "pip install 'rtmdet[onnx]' (ONNX Runtime) or pip install ai-edge-litert (TFLite)"


def to_level_maps(outs: dict[str, np.ndarray], meta: ExportMeta) -> tuple:
    """Named outputs -> the Backend's maps. Outputs are channels-last, [N, H*W, C] (ONNX) or
    [N, H, W, C] (TFLite), logits and distances in stride units; both hold the same bytes. A
    segment model's kernels and mask features come as two more entries (NCHW, as torch's), a
    rotate model's angles per level as one more (radians, [N, 1, H, W])."""
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
    if meta.angle_outputs:
        return cls_maps, reg_maps, [_nchw(outs[name], meta.image_size // stride, name)
                                    for stride, name in zip(meta.strides, meta.angle_outputs)]
    if not meta.kernel_outputs:
        return cls_maps, reg_maps
    kernels = apply_kernel_scale([_nchw(outs[name], meta.image_size // stride, name) for stride, name in
                                  zip(meta.strides, meta.kernel_outputs)], meta.kernel_scale)
    return cls_maps, reg_maps, kernels, _nchw(outs[meta.mask_output], meta.image_size // min(meta.strides),
                                              meta.mask_output)


def _nchw(out: np.ndarray, side: int, name: str) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(out, dtype=np.float32))
    n, c = t.shape[0], t.shape[-1]
    if t.numel() != n * side * side * c:
        raise ExportError(f"output {name} of shape {list(t.shape)} is not {side}x{side} cells")
    return t.reshape(n, side, side, c).permute(0, 3, 1, 2)


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
        self.session = _onnx_session(ort, self.path, opts, list(providers or ["CPUExecutionProvider"]))
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        check_contract(self.path, self.meta, "onnx", inputs, {o.name: o.shape for o in self.session.get_outputs()})
        batch = inputs[self.meta.input_name][0]
        self.static_batch = batch if isinstance(batch, int) else None
        self.output_names = [*self.meta.cls_outputs, *self.meta.reg_outputs, *extra_outputs(self.meta)]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """[N, 3, S, S] float pixels -> raw outputs by name (static-batch files run in chunks)."""
        step = self.static_batch or len(images)
        chunks = [self.session.run(self.output_names, {self.meta.input_name: images[i : i + step]})
                  for i in range(0, len(images), step)]
        return {name: np.concatenate([c[k] for c in chunks]) for k, name in enumerate(self.output_names)}

    def __call__(self, images_uint8: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        x = images_uint8.cpu().numpy().astype(np.float32)
        return to_level_maps(self.run(x), self.meta)


def _onnx_session(ort, path: Path, opts, providers: list[str]):
    """An InferenceSession, or one line naming the file when ONNX Runtime cannot load it."""
    if path.stat().st_size == 0:
        raise _unreadable(path, "ONNX", "empty file, 0 bytes")
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:  # ORT's pybind errors (InvalidProtobuf, Fail, ...) share no narrower base
        raise _unreadable(path, "ONNX", f"truncated or corrupt: {_runtime_reason(exc)}") from None


def _unreadable(where: str | Path, fmt: str, reason: str) -> ExportError:
    return ExportError(f"{where}: not a readable {fmt} model ({reason})")


def _runtime_reason(exc: BaseException) -> str:
    """A runtime's message cut to one short line: ORT repeats the path and adds C++ locations."""
    text = first_line(exc, 1000).rsplit("failed:", 1)[-1].strip().rstrip(".")
    return (text or type(exc).__name__)[:120]


def _tflite_modules():
    """(Interpreter, schema module) of ai-edge-litert, else of TensorFlow."""
    try:
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tensorflow.lite.python import schema_py_generated as schema
            from tensorflow.lite.python.interpreter import Interpreter
        except ImportError:
            raise ExportError(f"no TFLite runtime is installed; install one with: {RUNTIME_INSTALL}") from None
    return Interpreter, schema


def check_tflite_bytes(data: bytes, where: str | Path, schema: ModuleType) -> None:
    """Parse the whole flatbuffer in Python before an interpreter sees it: LiteRT does not verify
    a model, and a truncated file crashes the process (segfault) instead of raising."""
    if not data:
        raise _unreadable(where, "TFLite", "empty file, 0 bytes")
    if data[4:8] != b"TFL3":  # the file identifier every TFLite flatbuffer carries
        raise _unreadable(where, "TFLite", f"no TFLite file identifier; starts with {bytes(data[:8])!r}")
    try:
        model = schema.ModelT.InitFromPackedBuf(data, 0)  # reads every table, vector and buffer
    except Exception as exc:  # out-of-range reads surface as struct.error, IndexError, ValueError
        raise _unreadable(where, "TFLite", f"truncated or corrupt: its {len(data)} bytes do not hold "
                                           "the model its tables describe") from None
    # Buffers of models over 2 GB live after the flatbuffer, addressed by offset and size.
    if any(b.offset > 1 and b.offset + b.size > len(data) for b in model.buffers or []):
        raise _unreadable(where, "TFLite", f"truncated: a weight buffer lies past its {len(data)} bytes")


def tflite_operators(path: str | Path) -> dict[str, int]:
    """How often each operator occurs in a TFLite file, by name ("CONV_2D": 41, ...), sorted:
    what a runtime, a microcontroller's included, must implement to run it."""
    _, schema = _tflite_modules()
    data = Path(path).read_bytes()
    check_tflite_bytes(data, path, schema)
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    counts: dict[str, int] = {}
    for graph in model.subgraphs or []:
        for op in graph.operators or []:
            code = model.operatorCodes[op.opcodeIndex]
            # Codes past 127 live in builtinCode; the deprecated byte holds the rest (schema v3a).
            builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
            name = (code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode) \
                if names.get(builtin) == "CUSTOM" else names.get(builtin, f"BUILTIN_{builtin}")
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def make_interpreter(model: str | Path | bytes, threads: int = 2):
    """A LiteRT interpreter (ai-edge-litert, else TensorFlow's), tensors allocated; one-line
    ExportError for a file that is not a complete TFLite model."""
    Interpreter, schema = _tflite_modules()
    in_memory = isinstance(model, (bytes, bytearray))
    where = "in-memory TFLite model" if in_memory else str(model)
    try:
        data = bytes(model) if in_memory else Path(model).read_bytes()
    except OSError as exc:
        raise ExportError(f"{model}: cannot read the TFLite model ({exc.strerror or exc})") from None
    check_tflite_bytes(data, where, schema)
    try:
        # The path, not the bytes just read: the interpreter maps the file instead of copying it.
        interp = Interpreter(num_threads=threads, **({"model_content": data} if in_memory else {"model_path": where}))
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise _unreadable(where, "TFLite", f"the runtime rejects it: {_runtime_reason(exc)}") from None
    return interp


class TFLiteRunner:
    """One TFLite model: float NHWC pixels in, dequantized float outputs by tensor name out."""

    def __init__(self, model: str | Path | bytes | None, input_name: str | None = None, threads: int = 2, *,
                 interpreter=None):
        """model: a file or its bytes; or None with `interpreter`, one made by make_interpreter."""
        self.interp = interpreter if interpreter is not None else make_interpreter(model, threads)
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
        interp = make_interpreter(self.path, threads)
        inputs = {d["name"]: d["shape"] for d in interp.get_input_details()}
        check_contract(self.path, self.meta, "tflite", inputs,
                       {d["name"]: d["shape"] for d in interp.get_output_details()})
        self.runner = TFLiteRunner(None, self.meta.input_name, interpreter=interp)

    def __call__(self, images_uint8: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        nhwc = images_uint8.cpu().permute(0, 2, 3, 1).numpy().astype(np.float32)
        per_image = [self.runner(nhwc[i : i + 1]) for i in range(len(nhwc))]
        outs = {name: np.concatenate([p[name] for p in per_image]) for name in per_image[0]}
        return to_level_maps(outs, self.meta)


def check_contract(path: Path, meta: ExportMeta, fmt: str, inputs: dict[str, Sequence],
                   outputs: dict[str, Sequence]) -> None:
    """The sidecar against the model beside it (input and output names and shapes by name):
    a sidecar of another export fails here in one line, not later as wrong boxes."""
    problem = _contract_problem(meta, fmt, inputs, outputs)
    if problem:
        raise ExportError(f"{meta_path(path)}: does not match {path.name}: {problem}")


def _contract_problem(meta: ExportMeta, fmt: str, inputs: dict[str, Sequence],
                      outputs: dict[str, Sequence]) -> str | None:
    if meta.format != fmt:
        return f"its format is {meta.format!r}, not {fmt!r}"
    if meta.input_name not in inputs:
        return f"the model has no input named {meta.input_name!r} (it has {', '.join(inputs)})"
    missing = [n for n in (*meta.cls_outputs, *meta.reg_outputs, *extra_outputs(meta)) if n not in outputs]
    if missing:
        return f"outputs {', '.join(missing)} named in the sidecar are not in the model (it has {', '.join(outputs)})"
    input_dims = _dims(inputs[meta.input_name])
    side = input_dims[2:4] if fmt == "onnx" else input_dims[1:3]  # ONNX takes NCHW, TFLite NHWC
    if any(d is not None and d != meta.image_size for d in side):
        return f"image size {meta.image_size} in the sidecar, but the model takes {'x'.join(map(_dim_text, side))}"
    angles = meta.angle_outputs or [None] * len(meta.strides)
    for stride, cls_name, reg_name, ang_name in zip(meta.strides, meta.cls_outputs, meta.reg_outputs, angles):
        cells = (meta.image_size // stride) ** 2
        checks = [(cls_name, len(meta.classes), "classes"), (reg_name, 4, "box distances")]
        for name, channels, what in checks + ([(ang_name, 1, "angles")] if ang_name else []):
            shape = _dims(outputs[name])
            cell_dims = shape[1:-1]  # ONNX [N, H*W, C], TFLite [1, H, W, C]
            if None not in shape[1:] and (len(shape) < 3 or shape[-1] != channels or np.prod(cell_dims) != cells):
                return (f"output {name} has shape [{', '.join(map(_dim_text, shape))}], not {cells} cells of "
                        f"{channels} {what} (stride {stride} at {meta.image_size} px)")
    return None


def extra_outputs(meta: ExportMeta) -> list[str]:
    """The outputs a task adds to the class logits and distances, in the graph's order."""
    return [*meta.kernel_outputs, *([meta.mask_output] if meta.mask_output else []), *meta.angle_outputs]


def _dims(shape: Sequence) -> list[int | None]:
    """A runtime's shape as ints, None for a dynamic dimension (ORT: a name or None)."""
    return [int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape]


def _dim_text(dim: int | None) -> str:
    return "?" if dim is None else str(dim)


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
    from rtmdet.inference.postprocess_ins import InsPostprocessConfig
    from rtmdet.inference.predictor import Detector

    if Path(path).suffix.lower() == ".pt2":  # an AOTInductor package: torch's own runtime
        from rtmdet.inference.backends import AotiBackend

        backend = AotiBackend(path)
    else:
        backend = open_backend(path, threads)
    if backend.meta.angle_outputs:
        raise ExportError(f"{path}: a rotated-box (RTMDet-R) export; run it with "
                          "rtmdet.export.rotated.rotated_from_export, which returns rotated boxes")
    names = list(class_names) if class_names is not None else backend.meta.classes
    if len(names) != len(backend.meta.classes):
        raise ExportError(f"{path}: {len(names)} class names given for a model with {len(backend.meta.classes)} classes")
    if backend.meta.kernel_outputs:  # a segment model: masks from its kernels and mask features
        return Detector(backend, names, backend.meta.image_size, InsPostprocessConfig(**postprocess), batch_size,
                        task="segment")
    return Detector(backend, names, backend.meta.image_size, PostprocessConfig(**postprocess), batch_size)
