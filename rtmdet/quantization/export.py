"""qat.pt (save/load), the calibration images, and the int8 TFLite of a QAT model.

onnx2tf drops Q/DQ nodes, so the int8 file cannot carry ranges learned in torch. It does not
need to: the QAT ranges are, by construction, what TF's converter computes (min/max of each
tensor over the same calibration images, same placement; see rtmdet.quantization.model), so
exporting the fine-tuned BN-folded float model through the ordinary int8 path reproduces the
trained quantization. `output_agreement` (rtmdet.quantization.inspect) measures that it does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rtmdet.data.records import DetectionDataset
from rtmdet.errors import CheckpointError, first_line
from rtmdet.models.checkpoint import extract_state_dict, read_checkpoint, save_atomic
from rtmdet.models.detector import ModelConfig, RTMDet
from rtmdet.models.fuse import fuse_conv_bn
from rtmdet.quantization.model import QATDetector, prepare_qat, to_float_model, with_aliases

log = logging.getLogger(__name__)

QAT_FORMAT = 2  # 2: channel attention's fc output quantized before the clip (q_fc), its gate at 1/255


def calibration_images(dataset: DetectionDataset, count: int, seed: int,
                       image_size: int) -> tuple[np.ndarray, list[Path]]:
    """The int8 calibration set, exactly as the PTQ export picks it (stages/export.py): a seeded
    sample of the train split, letterboxed as at inference; [n, S, S, 3] float BGR + files."""
    from rtmdet.export.tflite import calibration_files, load_calibration

    return load_calibration(calibration_files(dataset, count, seed), image_size)


def qat_checkpoint(model: QATDetector, classes: Sequence[str], category_ids: Sequence[int],
                   qat_meta: dict[str, Any]) -> dict[str, Any]:
    """qat.pt: BN-folded float weights under RTMDet's keys, quantizer ranges, and meta."""
    meta = {"rtmdet": model.cfg.to_dict(),
            "dataset_meta": {"classes": list(classes), "category_ids": [int(c) for c in category_ids]},
            "qat": {"format": QAT_FORMAT, "bn_folded": True, "ties": dict(model.ties), **qat_meta}}
    return {"state_dict": model.float_state_dict(), "quantizers": model.ranges(), "meta": meta}


def save_qat(model: QATDetector, path: str | Path, classes: Sequence[str], category_ids: Sequence[int],
             qat_meta: dict[str, Any]) -> None:
    """Write qat.pt atomically."""
    save_atomic(qat_checkpoint(model, classes, category_ids, qat_meta), path)


def load_qat(path: str | Path, device: str | torch.device = "cpu") -> tuple[QATDetector, dict[str, Any]]:
    """Rebuild the fake-quant detector of a qat.pt (eval mode); returns (model, checkpoint)."""
    ckpt = read_checkpoint(path)
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    if not isinstance(meta.get("qat"), dict) or not isinstance(ckpt.get("quantizers"), dict):
        raise CheckpointError(f"{path}: not a QAT checkpoint (no quantizer ranges); QAT writes models/qat/qat.pt")
    if meta["qat"].get("format") != QAT_FORMAT:
        raise CheckpointError(f"{path}: QAT checkpoint format {meta['qat'].get('format')}, this rtmdet reads "
                              f"{QAT_FORMAT} (its int8 simulation changed); run the qat stage again")
    folded = fuse_conv_bn(RTMDet(_qat_config(path, meta)))
    try:
        folded.load_state_dict(with_aliases(extract_state_dict(ckpt, path), folded), strict=True)
        model = prepare_qat(folded)
        model.load_ranges(ckpt["quantizers"])
    except (RuntimeError, ValueError, TypeError) as exc:  # TypeError: a range that is not a (lo, hi) pair
        raise CheckpointError(f"{path}: QAT weights do not fit the model it names ({first_line(exc)})") from None
    return model.to(device).eval(), ckpt


def _qat_config(path: str | Path, meta: dict[str, Any]) -> ModelConfig:
    """The model a qat.pt names; its weights are BN-folded, so it cannot be inferred from them."""
    if not isinstance(meta.get("rtmdet"), dict):
        raise CheckpointError(f"{path}: QAT checkpoint without its model config (meta.rtmdet); "
                              "QAT writes models/qat/qat.pt")
    try:
        return ModelConfig.from_dict(meta["rtmdet"])
    except TypeError as exc:  # a field missing from the stored config
        raise CheckpointError(f"{path}: unusable model config in meta.rtmdet ({first_line(exc)})") from None


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_qat_tflite(model: QATDetector, path: str | Path, calibration: np.ndarray, calib_files: Sequence[Path],
                      *, int8_io: str = "float", classes: Sequence[str], category_ids: Sequence[int],
                      source: dict[str, Any]):
    """The int8 .tflite (+ .json sidecar) of the QAT weights at `path`, calibrated on the same
    images as the QAT ranges; returns rtmdet.export.tflite's TFLiteExport for it."""
    from dataclasses import replace

    from rtmdet.export.sidecar import meta_path, write_meta
    from rtmdet.export.tflite import export_tflite

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".qat-export-", dir=path.parent) as tmp:
        (result,) = export_tflite(to_float_model(model), tmp, ["int8"], calibration=calibration,
                                  calib_files=calib_files, int8_io=int8_io, stem="model", classes=list(classes),
                                  category_ids=list(category_ids), source=source)
        os.replace(result.path, path)
        write_meta(path, result.meta)
        meta_path(result.path).unlink(missing_ok=True)
    log.info("wrote %s (int8 of the QAT weights)", path)
    return replace(result, path=path)
