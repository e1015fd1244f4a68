"""The `<model>.json` sidecar that travels with every exported file, and atomic writes.

An exported model is useless on a device without its contract: class names, input size and
layout, what the pixels must look like, which output is which level, and how to decode. The
sidecar says all of it in plain JSON, so device code (C, Kotlin, ...) can read it too, and
`detector_from_export` rebuilds the exact same Detector from it. It holds no time stamp, so
an unchanged export is byte-identical (DVC caches it).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rtmdet.export import ExportError
from rtmdet.fileio import write_atomic

KERNEL_PARAMS = 169  # dynamic-conv parameters per cell (rtmdet.models.head_ins.NUM_GEN_PARAMS)

SCHEMA = 1
INPUT_NAME = "images"
AOTI_FIELDS = ("outputs", "device", "postprocess")
POSTPROCESS_KEYS = ("score_thr", "nms_pre", "iou_thr", "max_per_img", "min_bbox_size")

# What every exported model means, written into each sidecar for the people who read it.
CONVENTIONS = {
    "input": "BGR pixels 0..255 (not normalized: normalization is inside the model), the image "
             "letterboxed to image_size: keep-ratio resize (bilinear), image at the top-left, "
             "padding 114 at the bottom/right",
    "layout": "outputs are channels-last per level: ONNX [N, H*W, C], TFLite [1, H, W, C] (the same "
              "bytes); cells row-major",
    "cls": "per level num_classes class logits per cell; score = sigmoid(logit)",
    "reg": "per level 4 distances per cell (left, top, right, bottom) in units of the level's "
           "stride from the cell point (x, y) = (col * stride, row * stride); "
           "box = (x - l*s, y - t*s, x + r*s, y + b*s) in letterboxed pixels",
    "nms": "not in the model: class-aware NMS at IoU 0.65 after a 0.001 score threshold "
           "(mmdetection's test_cfg) is what rtmdet's own evaluation uses",
    "masks": "segment models only (kernel_outputs, mask_output): per level 169 dynamic-conv "
             "parameters per cell, and the mask features (8 channels at stride 8); a kept "
             "detection's mask = three 1x1 convs (10 -> 8 -> 8 -> 1, ReLU between) over [(cell point "
             "- pixel point) / (8 x its stride), features], as rtmdet.models.head_ins.dynamic_mask_logits; "
             "when kernel_scale is given, multiply each level's kernel channel c by kernel_scale[level][c] "
             "first",
    "quantization": "int8/uint8 tensors: real = (q - zero_point) * scale; to feed a float x: "
                    "q = clip(round(x / scale) + zero_point)",
}

# A rotate model's (RTMDet-R's) conventions replace and add to those above.
ROTATE_CONVENTIONS = {
    "reg": "per level 4 distances per cell (left, top, right, bottom) in units of the level's stride, "
           "measured along the box's own axes from the cell point (x, y) = (col * stride, row * stride)",
    "angles": "rotate models only (angle_outputs): per level 1 angle per cell, radians, raw. With a the "
              "angle and l, t, r, b the distances x stride: w = l + r, h = t + b, centre = (x, y) + "
              "(cos a * (r - l) / 2 - sin a * (b - t) / 2, sin a * (r - l) / 2 + cos a * (b - t) / 2); "
              "a positive angle turns the width axis from +x towards +y; normalize it to [-pi/2, pi/2) "
              "(le90), as rtmdet.inference.rotated.decode_rotated (mmrotate's DistanceAnglePointCoder)",
    "nms": "not in the model: class-aware rotated NMS at IoU 0.1 after a 0.05 score threshold "
           "(mmrotate's test_cfg, rtmdet.inference.rotated.postprocess_rotated)",
}

# An AOTInductor package's (format aoti) conventions replace and add to those above: its outputs are
# positional, and its sidecar spells out the pre- and post-process step by step for runtimes that
# re-implement them (cpp/ does).
AOTI_CONVENTIONS = {
    "input": "one float32 tensor [1, 3, image_size, image_size] (static shape, contiguous, on `device`) of "
             "BGR pixels 0..255, not normalized (normalization is inside the model)",
    "letterbox": "scale = image_size / max(w, h); new_w = int(w * scale + 0.5), new_h = int(h * scale + 0.5) "
                 "(double precision, truncated); resize with OpenCV's INTER_LINEAR (cv::resize, 8-bit "
                 "fixed point) unless the size is unchanged; the image at the top-left of an image_size "
                 "square filled with 114 (padding at the bottom/right); rtmdet.inference.preprocess.letterbox",
    "layout": "outputs are positional, in the order of `outputs`: per level [1, H*W, C] float32 with "
              "H = W = image_size / stride, cells row-major",
    "postprocess": "float32 throughout. Per level: score = sigmoid(logit) of every (cell, class) pair, "
                   "row-major; keep score > score_thr, at most the nms_pre best of them; decode as `reg` "
                   "says and clamp x1, x2 to [0, image_size], y1, y2 likewise. Then multiply x by "
                   "float32(1 / (new_w / w)) and y by float32(1 / (new_h / h)) (w, h: the photo's size); "
                   "drop boxes whose width or height is <= min_bbox_size; class-aware greedy NMS by "
                   "descending score (a box goes when its IoU with a kept box of its class is > iou_thr; "
                   "torchvision.ops.batched_nms); keep the first max_per_img; clip x to [0, w], y to "
                   "[0, h]. Defaults in `postprocess`; code in rtmdet.inference.postprocess",
    "nms": "not in the model: see postprocess (mmdetection's test_cfg: IoU 0.65, score threshold 0.001)",
}


@dataclass
class ExportMeta:
    """Everything a runtime needs to use an exported model; stored as `<model>.json`."""

    format: str  # "onnx", "tflite" or "aoti"
    precision: str  # "fp32", "fp16" or "int8"
    classes: list[str]
    category_ids: list[int]
    image_size: int
    strides: list[int]
    normalization: str  # the model's normalization, already inside the graph
    mean: list[float]
    std: list[float]
    input_name: str = INPUT_NAME
    input_layout: str = "NCHW"  # ONNX and AOTI are NCHW; TFLite is NHWC
    input_dtype: str = "float32"  # float32, int8 or uint8
    input_quant: list[float] | None = None  # [scale, zero_point] for int8/uint8 input
    cls_outputs: list[str] = field(default_factory=list)  # one per stride, in stride order
    reg_outputs: list[str] = field(default_factory=list)
    output_dtype: str = "float32"
    output_quant: dict[str, list[float]] = field(default_factory=dict)  # name -> [scale, zero_point]
    dynamic_batch: bool = False
    model: dict[str, Any] = field(default_factory=dict)  # the ModelConfig
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint file name and sha256
    calibration: dict[str, Any] | None = None  # int8: split, image count, sha256 of the file list
    rtmdet_version: str = ""
    kernel_outputs: list[str] = field(default_factory=list)  # segment models: one per stride
    mask_output: str | None = None  # segment models: the mask features
    # segment models, TFLite files made with calibration images: per level, each kernel channel's
    # scale (the file's kernel outputs x this = the model's); null = unscaled (export/kernel_scale.py)
    kernel_scale: list[list[float]] | None = None
    angle_outputs: list[str] = field(default_factory=list)  # rotate models: one per stride
    # AOTInductor packages (format aoti) only; absent from the other formats' sidecars:
    outputs: list[str] = field(default_factory=list)  # the package's outputs are positional: names in order
    device: str | None = None  # the device the package was compiled for: cpu or cuda
    postprocess: dict[str, Any] | None = None  # post-process defaults: rtmdet.inference.PostprocessConfig

    @property
    def task(self) -> str:
        """detect, segment or rotate: what the extra outputs say (the sidecar of a box model has none)."""
        return "segment" if self.kernel_outputs else "rotate" if self.angle_outputs else "detect"

    def to_json(self) -> str:
        d = {"rtmdet_export": SCHEMA, **asdict(self), "conventions": CONVENTIONS}
        # Each task's sidecar holds its own fields only: a box model's stays as it was.
        unused = {"segment": ("angle_outputs",), "rotate": ("kernel_outputs", "mask_output", "kernel_scale"),
                  "detect": ("kernel_outputs", "mask_output", "kernel_scale", "angle_outputs")}[self.task]
        for key in unused:
            del d[key]
        for key in AOTI_FIELDS:  # the other formats' sidecars stay as they were
            if not d[key]:
                del d[key]
        conventions = {**CONVENTIONS, **ROTATE_CONVENTIONS} if self.task == "rotate" else CONVENTIONS
        if self.format == "aoti":
            conventions = {**conventions, **AOTI_CONVENTIONS}
        d["conventions"] = {k: v for k, v in conventions.items() if self.task == "segment" or k != "masks"}
        return json.dumps(d, indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExportMeta":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def meta_path(model_path: str | Path) -> Path:
    """model.onnx -> model.json beside it."""
    return Path(model_path).with_suffix(".json")


def write_meta(model_path: str | Path, meta: ExportMeta) -> Path:
    """Write the sidecar atomically; returns its path."""
    path = meta_path(model_path)
    write_atomic(path, meta.to_json().encode())
    return path


def read_meta(model_path: str | Path) -> ExportMeta:
    """The sidecar of an exported model; one-line ExportError when missing, unreadable or malformed.

    Whether it matches the model file itself is checked where the model is opened
    (rtmdet.export.backends), since only the runtime knows the model's shapes."""
    path = meta_path(model_path)
    d = read_sidecar_json(model_path)
    if d.get("task") == "classify":
        raise ExportError(f"{path}: the sidecar of a classifier export (task classify), not a detector's; "
                          "score it with rtmdet.export.classify")
    try:
        meta = ExportMeta.from_dict(d)
    except TypeError as exc:
        raise ExportError(f"{path}: sidecar is missing fields ({exc})") from None
    _check_fields(path, meta)
    return meta


def read_sidecar_json(model_path: str | Path) -> dict[str, Any]:
    """The sidecar's JSON object of any task; one-line ExportError when missing, unreadable or foreign."""
    path = meta_path(model_path)
    if not path.is_file():
        raise ExportError(f"{path}: sidecar not found; it is written by `rtmdet export` next to the model "
                          "and holds its classes and input size")
    try:
        d = json.loads(path.read_text())
    except OSError as exc:
        raise ExportError(f"{path}: unreadable sidecar ({exc})") from None
    except ValueError as exc:  # json's errors and UnicodeDecodeError
        raise ExportError(f"{path}: sidecar is not valid JSON ({exc})") from None
    if not isinstance(d, dict) or d.get("rtmdet_export") != SCHEMA:
        raise ExportError(f"{path}: not an rtmdet export sidecar of schema {SCHEMA}")
    return d


def _check_fields(path: Path, meta: ExportMeta) -> None:
    """Types and internal consistency of the fields the runtimes use, so a hand-edited or
    foreign sidecar fails here in one line instead of deep inside the post-process."""
    levels = len(meta.strides) if isinstance(meta.strides, list) else -1
    checks = (
        ("format", meta.format in ("onnx", "tflite", "aoti"), "onnx, tflite or aoti"),
        ("classes", _names(meta.classes) and len(meta.classes) > 0, "a non-empty list of class names"),
        ("category_ids", _ints(meta.category_ids, len(meta.classes) if isinstance(meta.classes, list) else -1),
         "one integer per class"),
        ("image_size", _ints([meta.image_size]) and meta.image_size > 0, "a positive integer"),
        ("strides", levels > 0 and _ints(meta.strides) and min(meta.strides) > 0, "a list of positive integers"),
        ("cls_outputs", _names(meta.cls_outputs, levels), f"one output name per stride ({levels} in strides)"),
        ("reg_outputs", _names(meta.reg_outputs, levels), f"one output name per stride ({levels} in strides)"),
        ("input_name", isinstance(meta.input_name, str), "a tensor name"),
        ("kernel_outputs", meta.kernel_outputs == [] or _names(meta.kernel_outputs, levels),
         f"empty, or one output name per stride ({levels} in strides)"),
        ("mask_output", (meta.mask_output is None) == (meta.kernel_outputs == []),
         "a tensor name exactly when kernel_outputs are given"),
        ("kernel_scale", meta.kernel_scale is None or (
            meta.kernel_outputs != [] and _scales(meta.kernel_scale, levels, KERNEL_PARAMS)),
         f"null, or (segment models) {levels} lists of {KERNEL_PARAMS} positive numbers"),
        ("angle_outputs", meta.angle_outputs == [] or (_names(meta.angle_outputs, levels) and not meta.kernel_outputs),
         f"empty, or (rotate models) one output name per stride ({levels} in strides)"),
        *(_aoti_checks(meta) if meta.format == "aoti" else ()),
    )
    for key, ok, expected in checks:
        if not ok:
            got = repr(getattr(meta, key))
            got = got if len(got) <= 60 else got[:57] + "..."
            raise ExportError(f"{path}: sidecar field {key} must be {expected}, got {got}")


def _aoti_checks(meta: ExportMeta) -> tuple[tuple[str, bool, str], ...]:
    """The fields an AOTInductor package's runtime reads beyond the common ones."""
    named = [*meta.cls_outputs, *meta.reg_outputs] if _names(meta.cls_outputs) and _names(meta.reg_outputs) else None
    post = meta.postprocess
    return (
        ("outputs", _names(meta.outputs) and named is not None and sorted(meta.outputs) == sorted(named),
         "the package's output names in order: each of cls_outputs and reg_outputs once"),
        ("device", meta.device in ("cpu", "cuda"), "cpu or cuda"),
        ("postprocess", isinstance(post, dict) and all(
            isinstance(post.get(k), (int, float)) and not isinstance(post.get(k), bool) for k in POSTPROCESS_KEYS),
         f"an object with the numbers {', '.join(POSTPROCESS_KEYS)}"),
    )


def _scales(value: Any, levels: int, per_level: int) -> bool:
    return (isinstance(value, list) and len(value) == levels and all(
        isinstance(v, list) and len(v) == per_level and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in v)
        for v in value))


def _names(value: Any, count: int | None = None) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value) and count in (None, len(value))


def _ints(value: Any, count: int | None = None) -> bool:
    # bool is an int subclass; true/false in a sidecar is a mistake, not a size
    return (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and count in (None, len(value)))
