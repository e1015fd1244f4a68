"""TFLite export through onnx2tf (TensorFlow's converter): float32, float16 and int8, offline.

One onnx2tf call converts a copy of the ONNX graph (onnx2tf rewrites its input file) in a
temporary folder and yields the float files and a SavedModel; TF's converter quantizes that
SavedModel (see _convert for why not onnx2tf's own int8). int8 is full-integer with per-channel
weights, calibrated on the user's own training images, pre-processed exactly as at inference (BGR,
letterbox with 114, raw 0..255 pixels: normalization is the graph's first op). onnx2tf is
never given a chance to fetch its sample data. Its output names cannot be trusted (the float
files come back with names rotated between outputs), so every file is checked against torch
numerically, its outputs renamed and put in our order, and only then written, atomically.

Layout transposes: a nano's TFLite graph keeps 9 TRANSPOSE ops (3 per residual CSP stage of
the backbone) because onnx2tf 2.6.9's Add converter compares its NHWC result with the ONNX
NCHW shape and "rescues" the add into NCHW. They are exact in int8 and cost nothing that
measured above noise; turning the Adds into Sum removes them but gives ADD_N, which has no
int8 kernel (14 extra quantize/dequantize ops), so they stay. The 12 more that flattening the
outputs in the graph would add are avoided by ending the graph at the maps.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from rtmdet.export import ExportError
from rtmdet.export.kernel_scale import scaled_kernel_model
from rtmdet.export.onnx import _check_size, base_meta, onnx_model_bytes, torch_reference
from rtmdet.export.sidecar import INPUT_NAME, ExportMeta, write_atomic, write_meta

if TYPE_CHECKING:
    from rtmdet.models.detector import RTMDet

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
INT8_IO = ("float", "int8", "uint8")
TFLITE_INSTALL = "pip install 'rtmdet[export]' && python -m rtmdet.export.install"
# onnx2tf's file for each of our (precision, int8 I/O) choices.
_ONNX2TF_FILES = {("fp32", None): "model_float32", ("fp16", None): "model_float16",
                  ("int8", "float"): "model_integer_quant", ("int8", "int8"): "model_full_integer_quant",
                  ("int8", "uint8"): "model_full_integer_quant"}


def calibration_files(data_root, count: int, seed: int = 0) -> list[Path]:
    """`count` images of the dataset's training split, a fixed random sample (all if fewer).

    data_root: a dataset root folder, or an already loaded DetectionDataset (the prepared data)."""
    from rtmdet.data.coco import load_dataset

    dataset = load_dataset(data_root, check_images=False) if isinstance(data_root, (str, Path)) else data_root
    if "train" not in dataset.splits:
        raise ExportError(f"{data_root}: no training split to calibrate on (splits: {', '.join(dataset.splits)})")
    files = sorted({r.file for r in dataset.splits["train"].records})
    if count < len(files):
        files = sorted(random.Random(seed).sample(files, count))
    return files


def load_calibration(files: Sequence[str | Path], image_size: int) -> tuple[np.ndarray, list[Path]]:
    """Read and letterbox images as inference does: [n, S, S, 3] float32 BGR 0..255 + files used."""
    from rtmdet.errors import DataError
    from rtmdet.imageio import read_image
    from rtmdet.inference.preprocess import letterbox

    canvases, used = [], []
    for f in files:
        try:
            canvases.append(letterbox(read_image(f), image_size)[0])
            used.append(Path(f))
        except DataError as exc:
            log.warning("calibration: skipped %s", exc)
    if not canvases:
        where = Path(files[0]).parent if files else "the training split"
        raise ExportError(f"{where}: no readable calibration image among {len(files)} files")
    return np.stack(canvases).astype(np.float32), used


@dataclass
class TFLiteExport:
    """One written TFLite file, its sidecar, and its max abs difference from torch per output."""

    path: Path
    meta: ExportMeta
    max_diff: dict[str, float]


def export_tflite(model: "RTMDet", out_dir: str | Path, precisions: Sequence[str] = PRECISIONS, *,
                  calibration: np.ndarray | None = None, calib_files: Sequence[Path] = (),
                  int8_io: str = "float", stem: str = "model", classes: list[str] | None = None,
                  category_ids: list[int] | None = None, source: dict | None = None) -> list[TFLiteExport]:
    """Convert `model` to TFLite files `<out_dir>/<stem>_<precision>.tflite` (+ `.json` sidecars).

    calibration: [n, S, S, 3] float32 BGR 0..255 letterboxed images (see load_calibration),
    required for int8; calib_files: the files they came from (recorded in the sidecar).
    int8_io: "float" keeps float32 input/output; "int8"/"uint8" make them integer so device
    code feeds raw pixels (input scale 1 when calibration spans 0..255).
    """
    precisions = _check_args(model, precisions, calibration, int8_io)
    onnx2tf = _require_onnx2tf()
    kernel_scale = None
    if model.cfg.task == "segment" and calibration is not None:
        # The files of this run hold per-channel scaled kernel outputs (export/kernel_scale.py);
        # the model compared with them below is the scaled one, the sidecar has the scales.
        model, kernel_scale = scaled_kernel_model(model, calibration)
    # onnx2tf is given the head's NCHW maps, which it turns into NHWC outputs with no op at all:
    # flattening in the graph made it emit wrong values (see _flatten's note).
    data = onnx_model_bytes(model, batch=1, layout="maps")
    sample = _check_images(model, calibration)
    results = []
    with tempfile.TemporaryDirectory(prefix="rtmdet-onnx2tf-") as tmp:
        work = Path(tmp)
        produced = _convert(onnx2tf, data, work, calibration, "int8" in precisions, int8_io)
        for precision in precisions:
            key = (precision, int8_io if precision == "int8" else None)
            src = work / f"{_ONNX2TF_FILES[key]}.tflite"
            if src.name not in produced:
                raise ExportError(f"onnx2tf did not write the {precision} file {src.name}; run with -v for its log")
            fixed, diffs = fix_outputs(src.read_bytes(), model, sample, RTOL[precision])
            meta = _meta(model, precision, int8_io, fixed, classes, category_ids, source, calib_files)
            meta.kernel_scale = kernel_scale
            suffix = precision if precision != "int8" or int8_io == "float" else f"int8_{int8_io}io"
            path = Path(out_dir) / f"{stem}_{suffix}.tflite"
            write_atomic(path, fixed)
            write_meta(path, meta)
            log.info("wrote %s (%.1f KB); max abs diff vs torch: %s", path, len(fixed) / 1024,
                     ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
            results.append(TFLiteExport(path, meta, diffs))
    return results


def _check_args(model: "RTMDet", precisions: Sequence[str], calibration: np.ndarray | None, int8_io: str) -> list[str]:
    _check_size(model.cfg.image_size)
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise ExportError(f"unknown TFLite precision {unknown or precisions}; choose from {', '.join(PRECISIONS)}")
    if int8_io not in INT8_IO:
        raise ExportError(f"unknown int8 input/output type {int8_io!r}; choose from {', '.join(INT8_IO)}")
    if "int8" in precisions and calibration is None:
        raise ExportError("int8 export needs calibration images: give the dataset root (--data) so the "
                          "training split's images calibrate the quantization")
    return list(dict.fromkeys(precisions))


def _check_images(model: "RTMDet", calibration: np.ndarray | None) -> np.ndarray:
    """Up to 4 images to verify the converted files on: calibration images, else fixed test canvases."""
    from rtmdet.export.onnx import fixed_inputs

    size = model.cfg.image_size
    if calibration is None:
        return fixed_inputs(size, 2).transpose(0, 2, 3, 1).astype(np.float32)
    if calibration.ndim != 4 or calibration.shape[1:] != (size, size, 3):
        raise ExportError(f"calibration array of shape {calibration.shape}: expected [n, {size}, {size}, 3]")
    return calibration[:4]


def _require_onnx2tf():
    # Importing TensorFlow (onnx2tf does) before torch._dynamo, which torchvision.ops imports and
    # which probes triton, segfaults the process (TF 2.x beside torch 2.14's triton 3.8, measured
    # here: `import tensorflow; import triton`). The other order is fine.
    import torchvision.ops  # noqa: F401
    try:
        import onnx2tf
    except ImportError:
        raise ExportError(f"onnx2tf is not installed (TFLite export needs it and TensorFlow); install with: "
                          f"{TFLITE_INSTALL}") from None
    return onnx2tf


def _convert(onnx2tf, data: bytes, work: Path, calibration: np.ndarray | None, int8: bool, int8_io: str) -> set[str]:
    """Run onnx2tf on a copy of the graph in `work` (float files and its SavedModel), then, for
    int8, quantize that SavedModel on `calibration`; returns the names of the .tflite files written.

    Why not onnx2tf's own int8 (-oiqt -cind): it also feeds the calibration array, all n images,
    to its ONNX Runtime shape-estimation pass, which expects the graph's batch of 1, fails, and is
    skipped; onnx2tf then guesses layouts and guessed wrong for a nano at 128 px (outputs off by
    1.8 in fp32 too). Without calibration data that pass runs on its own input and is right.
    """
    src = work / "model.onnx"
    src.write_bytes(data)
    with _captured_output(work / "onnx2tf.log") as logfile:
        try:
            onnx2tf.convert(input_onnx_file_path=str(src), output_folder_path=str(work / "out"),
                            tflite_backend="tf_converter", copy_onnx_input_output_names_to_tflite=True,
                            not_use_onnxsim=True, verbosity="warn",
                            onnxruntime_output_memmap_dir=str(work / "ort"))
            if int8:
                _quantize_int8(work / "out", calibration, int8_io)
        except (Exception, SystemExit) as exc:
            tail = " | ".join(logfile.read_text(errors="replace").strip().splitlines()[-3:])
            raise ExportError(f"onnx2tf failed ({type(exc).__name__}: {exc}); last output: {tail[-400:]}") from None
    log.debug("onnx2tf output:\n%s", (work / "onnx2tf.log").read_text(errors="replace"))
    files = {p.name for p in (work / "out").glob("*.tflite")}
    for name in files:
        (work / "out" / name).rename(work / name)
    return files


def _quantize_int8(saved_model: Path, calibration: np.ndarray, int8_io: str) -> None:
    """TF's converter on onnx2tf's SavedModel, as onnx2tf's -oiqt does it (per-channel int8 weights,
    int8 activations calibrated on one image at a time), writing the file of onnx2tf's name for
    `int8_io`: float I/O (model_integer_quant) or int8/uint8 I/O (model_full_integer_quant)."""
    import tensorflow as tf

    def representative():
        for image in calibration:
            yield [tf.convert_to_tensor(image[None].astype(np.float32))]

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.SELECT_TF_OPS]
    converter.representative_dataset = representative
    if int8_io != "float":
        converter.inference_input_type = converter.inference_output_type = getattr(tf, int8_io)
    name = _ONNX2TF_FILES[("int8", int8_io)]
    (saved_model / f"{name}.tflite").write_bytes(converter.convert())


@contextlib.contextmanager
def _captured_output(path: Path) -> Iterator[Path]:
    """Send fd 1 and 2 to a file: onnx2tf prints pages and TensorFlow's C++ logs bypass Python."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield path
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# How far each precision may move an output, relative to its largest magnitude, before the
# export fails: float32 is summation order only; fp16 weights keep ~3 significant digits. int8
# error depends on the model, so it is logged (and checked by mAP in the verify stage).
RTOL = {"fp32": 2e-3, "fp16": 2e-2, "int8": None}


def fix_outputs(data: bytes, model: "RTMDet", images_nhwc: np.ndarray,
                rtol: float | None = None) -> tuple[bytes, dict[str, float]]:
    """Identify each output against torch, rename it, order outputs as ONNX does, re-check.

    Returns the new bytes and the max abs difference from torch per output on `images_nhwc`;
    raises when an output differs by more than rtol of its largest magnitude.
    """
    from rtmdet.export.backends import TFLiteRunner

    ref = torch_reference(model, np.rint(images_nhwc).astype(np.uint8).transpose(0, 3, 1, 2))
    runner = TFLiteRunner(data, threads=2)
    tensor_of = {d["name"]: d["index"] for d in runner.outputs.values()}
    mapping = match_outputs(_run_all(runner, images_nhwc), ref)
    fixed = rename_io(data, {tensor_of[theirs]: ours for ours, theirs in mapping.items()}, list(ref))
    again = _run_all(TFLiteRunner(fixed, threads=2), images_nhwc)
    diffs = {name: float(np.abs(again[name] - r).max()) for name, r in ref.items()}
    for name, r in ref.items():
        limit = None if rtol is None else rtol * max(1.0, float(np.abs(r).max()))
        if limit is not None and diffs[name] > limit:
            raise ExportError(f"TFLite output {name} differs from torch by {diffs[name]:.3g} (limit {limit:.3g})")
    return fixed, diffs


def _run_all(runner, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs for a batch, each flattened to [N, H*W, C] like the torch reference (_flatten)."""
    per_image = [runner(images_nhwc[i : i + 1]) for i in range(len(images_nhwc))]
    return {name: _flatten(np.concatenate([p[name] for p in per_image])) for name in per_image[0]}


def _flatten(out: np.ndarray) -> np.ndarray:
    """[N, H, W, C] -> [N, H*W, C] (the same bytes).

    Why the TFLite graph ends at maps: given [N, H*W, C] outputs made in the ONNX graph, onnx2tf
    2.6.9 returned wrong numbers in float32 already: the reshape-then-transpose form was off by
    up to 16 px everywhere (nano at 192), and the transpose-then-reshape form whenever a level's
    map had as many channels as cells per side (cls of 2 classes at 2x2, reg at 4x4: 128 px
    input), the layout guess failing on a symmetric shape.
    """
    return out.reshape(out.shape[0], -1, out.shape[-1])


def match_outputs(outs: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, str]:
    """Our output name -> the TFLite tensor that holds it, whatever the file calls it.

    Outputs are told apart by shape, and outputs of equal shape (cls and reg of one level with 4
    classes; cls and a rotate model's angles with 1 class) by their values: of all ways to pair
    them, the one whose outputs correlate best with torch's (then the one closest to them). One
    output at a time instead, a 1-class RTMDet-R's flat class logits could take its angles' tensor.
    """
    import itertools

    mapping: dict[str, str] = {}
    shapes = list(dict.fromkeys(r.shape for r in ref.values()))
    for shape in shapes:
        ours = [name for name, r in ref.items() if r.shape == shape]
        theirs = [t for t, o in outs.items() if o.shape == shape]
        if len(theirs) < len(ours):
            raise ExportError(f"TFLite model has no output of shape {list(shape)} for {ours[len(theirs)]}")
        pairs = {(a, b): _likeness(outs[b], ref[a]) for a in ours for b in theirs}
        if len(theirs) > 6:  # a greedy choice then; no export has more than 4 of one shape
            for a in ours:
                mapping[a] = max((b for b in theirs if b not in mapping.values()), key=lambda b: pairs[a, b])
            continue
        best = max(itertools.permutations(theirs, len(ours)),
                   key=lambda perm: tuple(map(sum, zip(*(pairs[a, b] for a, b in zip(ours, perm))))))
        mapping.update(zip(ours, best))
    return mapping


def _likeness(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(correlation rounded to 1e-3, minus the mean abs difference relative to torch's): how well a
    TFLite output stands for a torch one; the difference decides between near-equal correlations
    (a constant output correlates with nothing)."""
    scale = float(np.abs(ref).mean()) or 1.0
    return round(_correlation(out, ref), 3), -float(np.abs(out - ref).mean()) / scale


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def rename_io(data: bytes, names: dict[int, str], order: list[str]) -> bytes:
    """Rewrite the flatbuffer: output tensors get our names, the signature our keys and order;
    the input gets the ONNX input's name (TF's converter names it serving_default_images:0)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    graph = model.subgraphs[0]
    (input_index,) = graph.inputs
    graph.tensors[input_index].name = INPUT_NAME.encode()
    for index, name in names.items():
        graph.tensors[index].name = name.encode()
    index_of = {name: index for index, name in names.items()}
    graph.outputs = [index_of[name] for name in order]
    for sig in model.signatureDefs or []:
        if sig.subgraphIndex in (0, None):
            maps = []
            for name in order:
                m = schema.TensorMapT()
                m.name, m.tensorIndex = name.encode(), index_of[name]
                maps.append(m)
            sig.outputs = maps
            for m in sig.inputs or []:
                if m.tensorIndex == input_index:
                    m.name = INPUT_NAME.encode()
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _meta(model: "RTMDet", precision: str, int8_io: str, data: bytes, classes, category_ids, source,
          calib_files: Sequence[Path]) -> ExportMeta:
    from rtmdet.export.backends import TFLiteRunner

    meta = base_meta(model, classes, category_ids, source, "tflite", precision)
    meta.input_layout = "NHWC"
    runner = TFLiteRunner(data, INPUT_NAME)
    meta.input_dtype = runner.input["dtype"].__name__
    if meta.input_dtype != "float32":
        scale, zero_point = runner.input["quantization"]
        meta.input_quant = [float(scale), int(zero_point)]
        if abs(scale - 1.0) > 1e-6:
            log.warning("int8 input scale is %.4f, not 1: the calibration images never reach 0 or 255, so device "
                        "code must quantize pixels as round(x / scale) + zero_point", scale)
    dtypes = {d["dtype"].__name__ for d in runner.outputs.values()}
    meta.output_dtype = dtypes.pop() if len(dtypes) == 1 else "mixed"
    meta.output_quant = {name: [float(d["quantization"][0]), int(d["quantization"][1])]
                         for name, d in sorted(runner.outputs.items()) if d["dtype"] != np.float32}
    if precision == "int8":
        listing = "\n".join(sorted(p.name for p in calib_files)).encode()
        meta.calibration = {"split": "train", "images": len(calib_files),
                            "files_sha256": hashlib.sha256(listing).hexdigest(), "int8_io": int8_io}
    return meta
