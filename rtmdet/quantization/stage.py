"""The `qat` stage: float checkpoint -> QAT fine-tune -> qat.pt, int8 TFLite, metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rtmdet.config import ExportParams, QATParams, TrainParams, as_dict
from rtmdet.data.records import DetectionDataset
from rtmdet.errors import DataError
from rtmdet.fileio import write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class QATOutputs:
    """Where the stage writes: the checkpoint, the int8 file (+ .json sidecar), the metrics."""

    checkpoint: Path = Path("models/qat/qat.pt")
    tflite: Path = Path("models/qat/model_int8_qat.tflite")
    metrics: Path = Path("reports/metrics/qat.json")


def evaluate_model(model: torch.nn.Module, dataset: DetectionDataset, device: torch.device,
                   batch_size: int = 16) -> dict[str, Any]:
    """COCO metrics on valid of a torch model (float RTMDet or QATDetector), rtmdet's evaluator; an
    RTMDet-R's rotated mAP on its validation split (verify's scorer and post-process)."""
    from rtmdet.evaluation.coco_eval import evaluate_detector
    from rtmdet.inference.backends import TorchBackend
    from rtmdet.inference.predictor import Detector

    if model.cfg.task == "rotate":
        return _evaluate_rotated(model, dataset, device, batch_size)
    if "valid" not in dataset.splits:
        raise DataError("the dataset has no valid split to score QAT on")
    if model.cfg.task == "segment":
        from rtmdet.inference.postprocess_ins import InsPostprocessConfig

        detector = Detector(TorchBackend(model, device), dataset.classes, model.cfg.image_size, InsPostprocessConfig(),
                            batch_size=batch_size, task="segment")
    else:
        detector = Detector(TorchBackend(model, device), dataset.classes, model.cfg.image_size, batch_size=batch_size)
    return evaluate_detector(detector, dataset.splits["valid"], dataset, batch_size, progress=False).to_metrics()


def _evaluate_rotated(model: torch.nn.Module, dataset, device: torch.device, batch_size: int) -> dict[str, Any]:
    from rtmdet.evaluation.rotated_eval import evaluate_rotated

    valid = dataset.validation()
    if valid is None:
        raise DataError("the dataset has no validation split (val/ or valid/) to score QAT on")
    scored = evaluate_rotated(model, valid.records, dataset.classes, model.cfg.image_size, device,
                              batch_size=batch_size)
    return {"mAP": scored["mAP"], "mAP50": scored["mAP50"], "mAP75": scored["mAP75"], "num_images": scored["images"]}


def category_ids_of(dataset, classes: list[str]) -> list[int]:
    """The dataset's category ids (COCO's), else 0..n-1 (DOTA-layout datasets have names only)."""
    ids = getattr(dataset, "category_ids", None)
    return list(ids) if ids else list(range(len(classes)))


def run_qat(weights: Path, dataset: DetectionDataset, qat: QATParams, train: TrainParams, export: ExportParams,
            out: QATOutputs | None = None, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Fine-tune `weights` with fake-quant, save qat.pt, export the int8 TFLite, write metrics."""
    from rtmdet.models.checkpoint import checkpoint_task, class_names_of, load_model
    from rtmdet.quantization.export import calibration_images, export_qat_tflite, save_qat, sha256_of
    from rtmdet.quantization.inspect import output_agreement
    from rtmdet.quantization.model import prepare_qat
    from rtmdet.quantization.qat import check_qat_params, finetune

    check_qat_params(qat)
    out = out or QATOutputs()
    if checkpoint_task(weights) == "classify":  # a CSPNeXt classifier on a class-folder dataset
        from rtmdet.quantization.classify import run_qat_classifier

        return run_qat_classifier(weights, dataset, qat, train, export, out, device, progress)
    start = time.perf_counter()
    dev = torch.device(device)
    model, ckpt = load_model(weights, dev, tasks=("detect", "segment", "rotate"))  # its task: its data and loss
    classes = class_names_of(ckpt, model.cfg.num_classes)
    if classes != list(dataset.classes):
        raise DataError(f"{weights}: classes {classes} differ from the dataset's {list(dataset.classes)}")
    calib, files = calibration_images(dataset, export.calib_images, export.seed, model.cfg.image_size)
    float_metrics = evaluate_model(model, dataset, dev)
    log.info("float: mAP %.4f mAP50 %.4f", float_metrics["mAP"] or 0, float_metrics["mAP50"] or 0)

    qmodel = prepare_qat(model)
    tuned = finetune(qmodel, dataset, qat, train, calib, dev, progress,
                     teacher=model if qat.distill_weight > 0 else None)  # the float model teaches its int8 copy
    fq_metrics = evaluate_model(qmodel, dataset, dev)
    log.info("fake-quant: mAP %.4f mAP50 %.4f; the final calibration moved a frozen range by at most %.1f%% (%s)",
             fq_metrics["mAP"] or 0, fq_metrics["mAP50"] or 0, 100 * tuned.range_shift, tuned.range_shift_at or "-")

    qat_meta = {"params": as_dict(qat), "history": tuned.history,
                "range_shift": {"fraction": tuned.range_shift, "quantizer": tuned.range_shift_at},
                "source": {"checkpoint": Path(weights).name, "sha256": sha256_of(weights)},
                "calibration": {"split": "train", "images": len(files), "seed": export.seed},
                "metrics": {"float": _short(float_metrics), "fake_quant": _short(fq_metrics)}}
    category_ids = category_ids_of(dataset, classes)
    save_qat(qmodel, out.checkpoint, classes, category_ids, qat_meta)
    source = {"checkpoint": out.checkpoint.name, "sha256": sha256_of(out.checkpoint), "qat": True,
              "float_checkpoint": Path(weights).name}
    qmodel.cpu().eval()
    export_qat_tflite(qmodel, out.tflite, calib, files, int8_io=export.int8_io, classes=classes,
                      category_ids=category_ids, source=source)
    agreement = output_agreement(qmodel, out.tflite, calib[:4])
    steps = sum(r["mean_abs"] / r["scale"] for r in agreement.values()) / len(agreement)
    log.info("int8 TFLite vs fake-quant torch on 4 calibration images: %.2f output steps on average, "
             "at most %.0f", steps, max(r["max_steps"] for r in agreement.values()))
    metrics = {"float": _short(float_metrics), "fake_quant": _short(fq_metrics), "epochs": qat.epochs,
               "seconds": round(time.perf_counter() - start, 1),
               "tflite_vs_fake_quant_mean_steps": round(steps, 3)}
    write_json_atomic(out.metrics, metrics)
    return metrics


def _short(metrics: dict[str, Any]) -> dict[str, float | None]:
    keys = ("mAP", "mAP50", "mAP75", "mask_mAP", "mask_mAP50")  # mask_*: a segment model's; mAP75: rotate's
    return {k: metrics[k] for k in keys if k in metrics}
