"""`rtmdet export`: a checkpoint to ONNX, TFLite (fp32, fp16, int8) or an AOTInductor package, offline,
with sidecars."""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path
from typing import Sequence

from rtmdet.export import ExportError

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tflite", "aoti")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="export a checkpoint to ONNX, TFLite (fp32, fp16, int8) or AOTInductor, fully offline",
        description="Writes <out>/<weights stem>.onnx, <stem>_<precision>.tflite or <stem>.pt2 (an AOTInductor "
                    "package for libtorch, e.g. cpp/rtmdet_run), each with a .json sidecar (classes, image "
                    "size, input and output contract). int8 calibrates on images of the --data training split, "
                    "pre-processed exactly as at inference.")
    p.add_argument("--weights", required=True, type=Path, help="checkpoint (.pt/.pth, rtmdet or mmdetection)")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx, tflite or aoti (box models)")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=("fp32", "fp16", "int8"),
                   help="one or more (tflite); onnx and aoti are fp32 (default fp32)")
    p.add_argument("--data", type=Path, default=None, help="dataset root whose train split calibrates int8 (COCO; "
                   "DOTA layout for a rotate model)")
    p.add_argument("--calib-images", type=int, default=100, help="calibration images for int8 (default 100)")
    p.add_argument("--int8-io", choices=("float", "int8", "uint8"), default="float",
                   help="int8 file input/output type: float (default), or int8/uint8 for raw-pixel device input")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the checkpoint's folder)")
    p.add_argument("--dynamic-batch", action="store_true", help="onnx: a dynamic batch dimension")
    p.add_argument("--imgsz", type=int, default=None, help="export size (default: the checkpoint's training size)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="aoti: the device the package is compiled for (default cpu)")
    p.set_defaults(func=run)


def export_checkpoint(weights: str | Path, fmt: str, precisions: Sequence[str] = ("fp32",), *,
                      data: str | Path | None = None, calib_images: int = 100, int8_io: str = "float",
                      out: str | Path | None = None, dynamic_batch: bool = False,
                      image_size: int | None = None, calib_seed: int = 0, device: str = "cpu") -> list[Path]:
    """Export a checkpoint file; returns the model files written (each has a .json sidecar).

    data: the dataset root (or a loaded DetectionDataset) whose train split calibrates int8; for an
    RTMDet-R (task rotate) a DOTA-layout root or a loaded RotatedDataset. A classifier checkpoint
    goes to rtmdet.export.classify (data: a class-folder dataset root). device: where an aoti
    package runs (cpu or cuda); box models (task detect) only for aoti."""
    from dataclasses import replace

    from rtmdet.models.checkpoint import class_names_of, is_classifier_checkpoint, model_from_checkpoint, \
        read_checkpoint

    weights = Path(weights)
    _check_request(fmt, precisions, data, calib_images, dynamic_batch)
    ckpt = read_checkpoint(weights)
    if fmt == "aoti" and is_classifier_checkpoint(ckpt):
        raise ExportError(f"{weights}: a classifier checkpoint; the aoti format exports box models (task detect) "
                          "only so far; use --format onnx or tflite")
    if is_classifier_checkpoint(ckpt):
        from rtmdet.export.classify import export_classifier_checkpoint

        return export_classifier_checkpoint(weights, ckpt, fmt, precisions, data=data, calib_images=calib_images,
                                            int8_io=int8_io, out=out, dynamic_batch=dynamic_batch,
                                            image_size=image_size, calib_seed=calib_seed, sha256=_sha256(weights))
    # Segment and rotate models too: their kernels and mask features, or angles, are more outputs.
    model = model_from_checkpoint(ckpt, weights, tasks=("detect", "segment", "rotate"))
    if image_size is not None:
        model.cfg = replace(model.cfg, image_size=image_size)
    if model.cfg.image_size % 32 or model.cfg.image_size < 32:
        raise ExportError(f"{weights}: image size {model.cfg.image_size} is not a positive multiple of 32 "
                          "(the largest stride); pass --imgsz with one that is")
    classes = class_names_of(ckpt, model.cfg.num_classes)
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    ids = (meta.get("dataset_meta") or {}).get("category_ids")
    category_ids = list(ids) if isinstance(ids, list) and len(ids) == len(classes) else None
    source = {"checkpoint": weights.name, "sha256": _sha256(weights)}
    out = Path(out) if out is not None else weights.parent
    common = dict(classes=classes, category_ids=category_ids, source=source)
    if fmt == "aoti":
        from rtmdet.export.aoti import export_aoti

        if model.cfg.task != "detect":
            raise ExportError(f"{weights}: an RTMDet {model.cfg.task} model; the aoti format exports box models "
                              "(task detect) only so far; use --format onnx or tflite")
        return [export_aoti(model, out / f"{weights.stem}.pt2", device=device, **common).path]
    if fmt == "onnx":
        from rtmdet.export.onnx import export_onnx

        return [export_onnx(model, out / f"{weights.stem}.onnx", dynamic_batch=dynamic_batch, **common).path]
    from rtmdet.export.tflite import calibration_files, export_tflite, load_calibration

    calibration, files = None, []
    if "int8" in precisions:
        read = DATASET_READERS.get(model.cfg.task) if isinstance(data, (str, Path)) else None
        source_data = read(data) if read else data  # the task's own layout; COCO otherwise
        calibration, files = load_calibration(calibration_files(source_data, calib_images, calib_seed),
                                              model.cfg.image_size)
        where = data if isinstance(data, (str, Path)) else Path(files[0]).parent
        log.info("calibrating int8 on %d images of %s (train split)", len(files), where)
    results = export_tflite(model, out, precisions, calibration=calibration, calib_files=files,
                            int8_io=int8_io, stem=weights.stem, **common)
    return [r.path for r in results]


def _read_dota(root: str | Path):
    from rtmdet.data.dota import load_dota

    return load_dota(root)


# model.task -> how its --data folder is read, where it is not a COCO dataset (int8 calibration).
DATASET_READERS = {"rotate": _read_dota}


def _check_request(fmt: str, precisions: Sequence[str], data, calib_images: int, dynamic_batch: bool) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose onnx, tflite or aoti")
    if fmt in ("onnx", "aoti") and set(precisions) != {"fp32"}:
        raise ExportError(f"{fmt} export is fp32 only; use --format tflite for fp16 or int8")
    if fmt == "aoti" and dynamic_batch:
        raise ExportError("--dynamic-batch applies to ONNX only; an AOTInductor package takes one image at a time")
    if fmt == "tflite" and dynamic_batch:
        raise ExportError("--dynamic-batch applies to ONNX only; TFLite files take one image at a time")
    if "int8" in precisions:
        if data is None:
            raise ExportError("int8 export needs --data ROOT: its training split's images calibrate the quantization")
        if calib_images < 1:
            raise ExportError(f"--calib-images must be at least 1, got {calib_images}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(args: argparse.Namespace) -> int:
    paths = export_checkpoint(args.weights, args.format, args.precision, data=args.data,
                              calib_images=args.calib_images, int8_io=args.int8_io, out=args.out,
                              dynamic_batch=args.dynamic_batch, image_size=args.imgsz, device=args.device)
    for path in paths:
        print(f"{path} ({path.stat().st_size / 1024:.0f} KB) + {path.with_suffix('.json').name}")
    return 0
