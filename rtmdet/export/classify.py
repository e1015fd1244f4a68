"""Export CSPNeXt classifiers to ONNX and TFLite (fp32, fp16, int8), and score the files.

The detector's contract, with one output: input `images`, float BGR pixels 0..255 (ONNX
[N, 3, S, S], TFLite [1, S, S, 3]), normalization inside the graph; output `logits`
[N, num_classes] before softmax. The tracing, onnx2tf conversion, int8 quantization, renaming
and atomic writes are the detector's own (rtmdet.export.onnx / .tflite); only the wrapper,
the output check and the sidecar are the classifier's.

Pre-process: the classifier's evaluation view, rtmdet.data.class_transforms.eval_transform
(short edge to round(S x 256/224), bicubic, then the centre S x S crop: mmpretrain's test
pipeline). int8 calibration images and every scored image go through it, torch's included.
"""

from __future__ import annotations

import logging
import random
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from rtmdet.export import ExportError
from rtmdet.export.sidecar import CONVENTIONS as DETECT_CONVENTIONS
from rtmdet.export.sidecar import INPUT_NAME, SCHEMA, meta_path, read_sidecar_json, write_atomic

if TYPE_CHECKING:
    from rtmdet.data.class_folders import ClassificationDataset
    from rtmdet.evaluation.classification import ClassificationResult
    from rtmdet.export.onnx import OnnxExport
    from rtmdet.export.tflite import TFLiteExport
    from rtmdet.models.classifier import CSPNeXtClassifier

log = logging.getLogger(__name__)

TASK = "classify"
OUTPUT_NAME = "logits"
PREPROCESS = "resize_center_crop"
CONVENTIONS = {
    "input": "BGR pixels 0..255 (not normalized: the graph flips to RGB and applies mean/std), the image's "
             "short edge resized (bicubic) to round(image_size x 256/224), then its centre image_size x "
             "image_size crop (rtmdet.data.class_transforms.eval_transform)",
    "output": "logits [N, num_classes] before softmax; the predicted class is the argmax",
    "quantization": DETECT_CONVENTIONS["quantization"],
}
CHECK_IMAGES = 16  # fixed canvases every export is compared with torch on


@dataclass
class ClassifierExportMeta:
    """A classifier export's sidecar (`<model>.json`): classes, input contract, pre-process."""

    format: str  # onnx or tflite
    precision: str  # fp32, fp16 or int8
    classes: list[str]
    image_size: int
    task: str = TASK
    input_name: str = INPUT_NAME
    input_layout: str = "NCHW"  # ONNX NCHW, TFLite NHWC
    input_dtype: str = "float32"
    input_quant: list[float] | None = None  # [scale, zero_point] for int8/uint8 input
    output_name: str = OUTPUT_NAME
    output_dtype: str = "float32"
    output_quant: list[float] | None = None
    preprocess: str = PREPROCESS
    mean_rgb: list[float] = field(default_factory=list)  # inside the graph, after the BGR -> RGB flip
    std_rgb: list[float] = field(default_factory=list)
    dynamic_batch: bool = False
    model: dict[str, Any] = field(default_factory=dict)  # the ClassifierConfig
    source: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    rtmdet_version: str = ""

    def to_json(self) -> str:
        import json

        return json.dumps({"rtmdet_export": SCHEMA, **asdict(self), "conventions": CONVENTIONS}, indent=2) + "\n"


def read_classifier_meta(model_path: str | Path) -> ClassifierExportMeta:
    """A classifier export's sidecar; one line when missing, malformed or a detector's."""
    path = meta_path(model_path)
    d = read_sidecar_json(model_path)
    if d.get("task") != TASK:
        raise ExportError(f"{path}: not a classifier export (task {d.get('task', 'detect')!r}); detector exports "
                          "run through rtmdet.export.detector_from_export")
    known = {f.name for f in fields(ClassifierExportMeta)}
    meta = ClassifierExportMeta(**{k: v for k, v in d.items() if k in known}) \
        if {"format", "precision", "classes", "image_size"} <= d.keys() else None
    valid = meta is not None and meta.format in ("onnx", "tflite") and isinstance(meta.classes, list) \
        and len(meta.classes) >= 2 and isinstance(meta.image_size, int) and meta.image_size > 0
    if not valid:
        raise ExportError(f"{path}: classifier sidecar needs format (onnx/tflite), classes (2 or more) and a "
                          "positive image_size")
    return meta


def _meta(model: "CSPNeXtClassifier", classes: Sequence[str] | None, fmt: str, precision: str,
          source: dict | None) -> ClassifierExportMeta:
    from rtmdet import __version__
    from rtmdet.models.classifier import RGB_MEAN, RGB_STD

    n = model.cfg.num_classes
    classes = [str(c) for c in classes] if classes else [f"class_{i}" for i in range(n)]
    if len(classes) != n:
        raise ExportError(f"{len(classes)} class names given for a classifier with {n} classes")
    return ClassifierExportMeta(fmt, precision, classes, model.cfg.image_size, mean_rgb=list(RGB_MEAN),
                                std_rgb=list(RGB_STD), model=model.cfg.to_dict(), source=dict(source or {}),
                                rtmdet_version=__version__)


def _write(path: Path, data: bytes, meta: ClassifierExportMeta) -> None:
    write_atomic(path, data)
    write_atomic(meta_path(path), meta.to_json().encode())


def _wrapper(model: "CSPNeXtClassifier"):
    import copy

    import torch
    from torch import nn

    from rtmdet.export.onnx import input_normalization

    class ClassifierExportWrapper(nn.Module):
        """Raw BGR pixels 0..255 in, logits out (normalization is the graph's first op).

        The model's BGR -> RGB flip is folded into the stem's first convolution (its input
        channels reversed, mean/std in BGR order): the same numbers with no channel flip in the
        graph. With the flip in the graph, onnx2tf 2.6.9's fp32 TFLite logits were off by 2.3
        (max abs; the check's limit 0.006) on a nano at 64 px; folded, 4e-6 of their range. Why
        onnx2tf mis-converts the flip was not dug into."""

        def __init__(self):
            super().__init__()
            net = copy.deepcopy(model).cpu().float().eval()
            with torch.no_grad():
                first = net.backbone.stem[0].conv
                first.weight.copy_(first.weight.flip(1))
            self.normalize = input_normalization(net.mean.flip(1), net.std.flip(1))  # one op: see there
            self.net = net

        def forward(self, images):
            return self.net(self.normalize(images))

    return ClassifierExportWrapper()


def torch_logits(model: "CSPNeXtClassifier", images_nchw: np.ndarray) -> np.ndarray:
    """The model's logits in torch for [N, 3, S, S] BGR pixels: what every file is checked against."""
    import torch

    net = model.cpu().float().eval()  # the model itself, not the wrapper: the flip folding is checked too
    with torch.no_grad():
        return net(net.normalize(torch.from_numpy(np.asarray(images_nchw, np.float32)))).numpy()


def check_images(size: int) -> np.ndarray:
    """The fixed uint8 canvases [CHECK_IMAGES, 3, S, S] exports are compared with torch on."""
    from rtmdet.export.onnx import fixed_inputs

    return fixed_inputs(size, CHECK_IMAGES)


def export_classifier_onnx(model: "CSPNeXtClassifier", path: str | Path, classes: Sequence[str] | None = None, *,
                           source: dict | None = None, dynamic_batch: bool = False) -> "OnnxExport":
    """Export to `path` (+ `.json` sidecar), checked against torch in ONNX Runtime (rtol 2e-3)."""
    from rtmdet.export.onnx import OnnxExport, _check_size, compare_onnx, trace_onnx

    path = Path(path)
    size = model.cfg.image_size
    _check_size(size)
    data = trace_onnx(_wrapper(model), size, [OUTPUT_NAME], dynamic_batch=dynamic_batch)
    images = check_images(size)[: CHECK_IMAGES if dynamic_batch else 1]
    diffs = compare_onnx(data, images, {OUTPUT_NAME: torch_logits(model, images)})
    meta = _meta(model, classes, "onnx", "fp32", source)
    meta.dynamic_batch = dynamic_batch
    _write(path, data, meta)
    log.info("wrote %s (%.1f KB); max abs diff vs torch %.3g", path, len(data) / 1024, diffs[OUTPUT_NAME])
    return OnnxExport(path, meta, diffs)  # type: ignore[arg-type]  # the classifier's sidecar record


def export_classifier_tflite(model: "CSPNeXtClassifier", out_dir: str | Path, precisions: Sequence[str] = ("fp32",),
                             calibration: np.ndarray | None = None, *, calib_files: Sequence[Path] = (),
                             int8_io: str = "float", stem: str = "model", classes: Sequence[str] | None = None,
                             source: dict | None = None) -> list["TFLiteExport"]:
    """`<out_dir>/<stem>_<precision>.tflite` (+ sidecars) through the detector's onnx2tf path.

    calibration: [n, S, S, 3] float32 BGR 0..255 images pre-processed by eval_transform
    (classifier_calibration), required for int8. fp32/fp16 must match torch within RTOL of the
    logits' largest magnitude; int8 is logged (max diff, top-1 agreement with torch)."""
    from rtmdet.export.onnx import trace_onnx
    from rtmdet.export.tflite import (_ONNX2TF_FILES, RTOL, TFLiteExport, _check_args, _check_images, _convert,
                                      _require_onnx2tf)

    precisions = _check_args(model, precisions, calibration, int8_io)
    _check_images(model, calibration)  # the calibration array's shape
    onnx2tf = _require_onnx2tf()
    data = trace_onnx(_wrapper(model), model.cfg.image_size, [OUTPUT_NAME])
    # Checked on calibration images when there are some (the inputs int8 was fitted to), as the
    # detector's export does; else on the fixed canvases.
    sample = calibration[:CHECK_IMAGES] if calibration is not None else \
        check_images(model.cfg.image_size).transpose(0, 2, 3, 1).astype(np.float32)
    results = []
    with tempfile.TemporaryDirectory(prefix="rtmdet-onnx2tf-") as tmp:
        work = Path(tmp)
        produced = _convert(onnx2tf, data, work, calibration, "int8" in precisions, int8_io)
        for precision in precisions:
            src = work / f"{_ONNX2TF_FILES[(precision, int8_io if precision == 'int8' else None)]}.tflite"
            if src.name not in produced:
                raise ExportError(f"onnx2tf did not write the {precision} file {src.name}")
            fixed, diffs = _fix_output(src.read_bytes(), model, sample, RTOL[precision])
            meta = _tflite_meta(model, classes, precision, fixed, source, calib_files, int8_io)
            suffix = precision if precision != "int8" or int8_io == "float" else f"int8_{int8_io}io"
            path = Path(out_dir) / f"{stem}_{suffix}.tflite"
            _write(path, fixed, meta)
            log.info("wrote %s (%.1f KB); vs torch: max abs diff %.3g, top-1 agreement %.3f", path,
                     len(fixed) / 1024, diffs[OUTPUT_NAME], diffs["top1_agreement"])
            results.append(TFLiteExport(path, meta, diffs))  # type: ignore[arg-type]
    return results


def _fix_output(data: bytes, model: "CSPNeXtClassifier", images_nhwc: np.ndarray,
                rtol: float | None) -> tuple[bytes, dict[str, float]]:
    """Name the file's one output `logits` (and its input `images`), then compare it with torch."""
    from rtmdet.export.backends import TFLiteRunner
    from rtmdet.export.tflite import rename_io

    runner = TFLiteRunner(data, threads=2)
    if len(runner.outputs) != 1:
        raise ExportError(f"TFLite classifier has {len(runner.outputs)} outputs, expected one (logits)")
    (detail,) = runner.outputs.values()
    fixed = rename_io(data, {detail["index"]: OUTPUT_NAME}, [OUTPUT_NAME])
    got = tflite_logits(TFLiteRunner(fixed, threads=2), images_nhwc)
    ref = torch_logits(model, np.rint(images_nhwc).transpose(0, 3, 1, 2))
    diff = float(np.abs(got - ref).max())
    limit = None if rtol is None else rtol * max(1.0, float(np.abs(ref).max()))
    if limit is not None and diff > limit:
        raise ExportError(f"TFLite output {OUTPUT_NAME} differs from torch by {diff:.3g} (limit {limit:.3g})")
    return fixed, {OUTPUT_NAME: diff, "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}


def tflite_logits(runner, images_nhwc: np.ndarray) -> np.ndarray:
    """A TFLiteRunner over a batch, one image at a time -> logits [N, C] (dequantized)."""
    return np.concatenate([runner(images_nhwc[i : i + 1])[OUTPUT_NAME] for i in range(len(images_nhwc))])


def _tflite_meta(model, classes, precision: str, data: bytes, source, calib_files: Sequence[Path],
                 int8_io: str) -> ClassifierExportMeta:
    import hashlib

    from rtmdet.export.backends import TFLiteRunner

    meta = _meta(model, classes, "tflite", precision, source)
    runner = TFLiteRunner(data, INPUT_NAME)
    meta.input_layout = "NHWC"
    meta.input_dtype = runner.input["dtype"].__name__
    if meta.input_dtype != "float32":
        meta.input_quant = [float(runner.input["quantization"][0]), int(runner.input["quantization"][1])]
    out = runner.outputs[OUTPUT_NAME]
    meta.output_dtype = out["dtype"].__name__
    if meta.output_dtype != "float32":
        meta.output_quant = [float(out["quantization"][0]), int(out["quantization"][1])]
    if precision == "int8":
        listing = "\n".join(sorted(Path(p).name for p in calib_files)).encode()
        meta.calibration = {"split": "train", "images": len(calib_files), "preprocess": PREPROCESS,
                            "files_sha256": hashlib.sha256(listing).hexdigest(), "int8_io": int8_io}
    return meta


# --- pre-process, calibration, scoring -------------------------------------------------------

def load_images(files: Sequence[str | Path], size: int) -> np.ndarray:
    """Read images and apply eval_transform: [n, S, S, 3] uint8 BGR (the one classifier pre-process)."""
    from rtmdet.data.class_transforms import eval_transform
    from rtmdet.imageio import read_image

    return np.stack([eval_transform(read_image(f), size) for f in files]) if files else np.zeros((0, size, size, 3),
                                                                                                  np.uint8)


def _dataset(data) -> "ClassificationDataset":
    from rtmdet.data.class_folders import load_class_folders

    return load_class_folders(data, check_images=False) if isinstance(data, (str, Path)) else data


def classifier_calibration(data, count: int, size: int, seed: int = 0) -> tuple[np.ndarray, list[Path]]:
    """`count` train images of a class-folder dataset (a fixed random sample), eval_transform'ed:
    [n, S, S, 3] float32 BGR 0..255 and the files used."""
    dataset = _dataset(data)
    files = sorted(im.file for im in dataset.splits["train"].images)
    if count < len(files):
        files = sorted(random.Random(seed).sample(files, count))
    return load_images(files, size).astype(np.float32), files


def classifier_runner(model_or_path, threads: int = 2) -> tuple[Callable[[np.ndarray], np.ndarray], int, list[str]]:
    """(run, image_size, classes) for a torch classifier, its checkpoint (.pt), an .onnx or a .tflite
    file; run maps uint8 BGR [N, S, S, 3] to logits [N, C]."""
    if not isinstance(model_or_path, (str, Path)):
        model = model_or_path
        return (lambda x: torch_logits(model, x.transpose(0, 3, 1, 2)), model.cfg.image_size,
                [f"class_{i}" for i in range(model.cfg.num_classes)])
    path = Path(model_or_path)
    if not path.is_file():
        raise ExportError(f"{path}: model file not found")
    if path.suffix in (".pt", ".pth"):
        from rtmdet.models.checkpoint import class_names_of, load_classifier

        model, ckpt = load_classifier(path)
        return (lambda x: torch_logits(model, x.transpose(0, 3, 1, 2)), model.cfg.image_size,
                class_names_of(ckpt, model.cfg.num_classes))
    meta = read_classifier_meta(path)
    if path.suffix == ".onnx":
        return _onnx_run(path, meta, threads), meta.image_size, meta.classes
    if path.suffix == ".tflite":
        from rtmdet.export.backends import TFLiteRunner

        runner = TFLiteRunner(path, meta.input_name, threads)
        if meta.output_name not in runner.outputs:
            raise ExportError(f"{meta_path(path)}: does not match {path.name}: no output {meta.output_name!r}")
        return (lambda x: tflite_logits(runner, x.astype(np.float32))), meta.image_size, meta.classes
    raise ExportError(f"{path}: unknown model format {path.suffix!r}; expected .pt, .onnx or .tflite")


def _onnx_run(path: Path, meta: ClassifierExportMeta, threads: int):
    """The detector backend's ONNX session (threads, one-line errors), checked against the sidecar."""
    from rtmdet.export.backends import RUNTIME_INSTALL, _onnx_session

    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(f"onnxruntime is not installed; install it with: {RUNTIME_INSTALL}") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = _onnx_session(ort, path, opts, ["CPUExecutionProvider"])
    if [i.name for i in session.get_inputs()] != [meta.input_name] or \
            meta.output_name not in [o.name for o in session.get_outputs()]:
        raise ExportError(f"{meta_path(path)}: does not match {path.name}: no input {meta.input_name!r} "
                          f"or output {meta.output_name!r}")
    batch = session.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else None

    def run(x: np.ndarray) -> np.ndarray:
        x = x.transpose(0, 3, 1, 2).astype(np.float32)
        n = step or len(x)
        return np.concatenate([session.run([meta.output_name], {meta.input_name: x[i : i + n]})[0]
                               for i in range(0, len(x), n)])

    return run


def score_classifier(model_or_path, data, split: str = "val", batch_size: int = 16,
                     threads: int = 2) -> "ClassificationResult":
    """A torch classifier or an exported file over a class-folder split, pre-processed by
    eval_transform -> top-1/top-5/per-class (rtmdet.evaluation.classification)."""
    from rtmdet.evaluation.classification import classification_result

    dataset = _dataset(data)
    if split not in dataset.splits:
        raise ExportError(f"{dataset.root}: no {split} split (splits: {', '.join(dataset.splits)})")
    run, size, classes = classifier_runner(model_or_path, threads)
    if isinstance(model_or_path, (str, Path)) and classes != dataset.classes:
        raise ExportError(f"{model_or_path}: its classes ({', '.join(classes[:5])}) are not the dataset's "
                          f"({', '.join(dataset.classes[:5])}, from {dataset.root}); scores would be misread")
    images = dataset.splits[split].images
    logits = [run(load_images([im.file for im in images[i : i + batch_size]], size))
              for i in range(0, len(images), batch_size)]
    return classification_result(np.concatenate(logits), np.array([im.label for im in images]), dataset.classes)


def score_classifier_export(path: str | Path, data, split: str = "val", threads: int = 2) -> "ClassificationResult":
    """An exported classifier's metrics on a split (see score_classifier)."""
    return score_classifier(Path(path), data, split, threads=threads)


def export_classifier_checkpoint(weights: Path, ckpt: dict, fmt: str, precisions: Sequence[str], *, data=None,
                                 calib_images: int = 100, int8_io: str = "float", out: Path | None = None,
                                 dynamic_batch: bool = False, image_size: int | None = None,
                                 calib_seed: int = 0, sha256: str = "") -> list[Path]:
    """`rtmdet export` for a classifier checkpoint (already read); returns the model files written."""
    from dataclasses import replace

    from rtmdet.models.checkpoint import class_names_of, classifier_from_checkpoint

    model = classifier_from_checkpoint(ckpt, weights)
    if image_size is not None:
        model.cfg = replace(model.cfg, image_size=image_size)
    classes = class_names_of(ckpt, model.cfg.num_classes)
    source = {"checkpoint": weights.name, "sha256": sha256}
    out = Path(out) if out is not None else weights.parent
    if fmt == "onnx":
        return [export_classifier_onnx(model, out / f"{weights.stem}.onnx", classes, source=source,
                                       dynamic_batch=dynamic_batch).path]
    calibration, files = None, []
    if "int8" in precisions:
        calibration, files = classifier_calibration(data, calib_images, model.cfg.image_size, calib_seed)
        log.info("calibrating int8 on %d train images (eval_transform pre-process)", len(files))
    results = export_classifier_tflite(model, out, precisions, calibration, calib_files=files, int8_io=int8_io,
                                       stem=weights.stem, classes=classes, source=source)
    return [r.path for r in results]
