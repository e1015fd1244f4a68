"""Quantization-aware training of a CSPNeXt classifier, through the detectors' QAT machinery.

The fake-quant classifier is the BGR-input model the export converts (the BGR -> RGB flip
folded into the stem conv, mean/std in BGR order: rtmdet.export.classify), BN folded, traced,
with the detector's quantizers (convs, concats, residual adds: rtmdet.quantization.model) and two
of its own: the global average pool's output (TFLite MEAN) and the logits (FULLY_CONNECTED, its
weights int8 per output channel as TF's converter writes them). Fine-tuning is
rtmdet.quantization.qat.finetune (the classify task's stage-2 samples; the float model's softmax as
the targets, qat.distill, or the labels with the task's loss); the int8 file is
the ordinary classifier export of the tuned float weights, calibrated on the same images, which
reproduces the trained ranges (the same argument as for detectors, rtmdet.quantization.export).
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from rtmdet.config import ExportParams, QATParams, TrainParams, as_dict
from rtmdet.errors import DataError
from rtmdet.fileio import write_json_atomic
from rtmdet.models.checkpoint import CLASSIFY, save_atomic
from rtmdet.models.classifier import CSPNeXtClassifier
from rtmdet.models.fuse import fuse_conv_bn
from rtmdet.quantization.export import QAT_FORMAT
from rtmdet.quantization.fakequant import fake_quant_weight
from rtmdet.quantization.model import QATModel, quantized_graph, with_aliases

log = logging.getLogger(__name__)


class QLinear(nn.Linear):
    """A fully connected layer with int8 per-output-channel weights (its output quantizer is a
    separate node of the graph)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "QLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q.weight, q.bias = linear.weight, linear.bias
        q.quantize_weights = True
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quant_weight(self.weight, self.quantize_weights), self.bias)


class QATClassifier(QATModel):
    """A CSPNeXt classifier with TFLite's int8 simulated: BGR pixels in (normalize), logits out."""


def _bgr_input(model: CSPNeXtClassifier) -> CSPNeXtClassifier:
    """A copy whose stem conv takes BGR (its input channels reversed); flipping twice undoes it."""
    net = copy.deepcopy(model).cpu().float()
    with torch.no_grad():
        first = net.backbone.stem[0].conv
        first.weight.copy_(first.weight.flip(1))
    return net


def _pool_or_fc(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target == "mean":
        return True
    return node.op == "call_module" and isinstance(node.graph.owning_module.get_submodule(node.target), nn.Linear)


def prepare_qat_classifier(model: CSPNeXtClassifier) -> QATClassifier:
    """Fold BN (a BGR-input copy of `model`), trace it and insert TFLite's quantizers."""
    folded = fuse_conv_bn(_bgr_input(model))
    net, ties = quantized_graph(folded, extra=_pool_or_fc)
    for node in net.graph.nodes:
        if node.op == "call_module" and type(net.get_submodule(node.target)) is nn.Linear:
            parent, _, leaf = node.target.rpartition(".")
            holder = net.get_submodule(parent) if parent else net
            setattr(holder, leaf, QLinear.from_linear(net.get_submodule(node.target)))
    qmodel = QATClassifier(net, model.cfg, model.mean.flip(1), model.std.flip(1), ties)
    return qmodel.to(next(model.parameters()).device).train(model.training)


def to_float_classifier(model: QATClassifier) -> CSPNeXtClassifier:
    """The BN-folded float classifier (RGB input, as the checkpoint's) with the QAT weights."""
    folded = fuse_conv_bn(CSPNeXtClassifier(model.cfg))
    folded.load_state_dict(with_aliases(model.float_state_dict(), folded), strict=True)
    return _bgr_input(folded).eval()  # the stem back to RGB input


def qat_classifier_checkpoint(model: QATClassifier, classes: list[str], qat_meta: dict[str, Any]) -> dict[str, Any]:
    """qat.pt of a classifier: BN-folded float weights (BGR-input stem), quantizer ranges, meta."""
    meta = {"task": CLASSIFY, "classifier": model.cfg.to_dict(), "dataset_meta": {"classes": list(classes)},
            "qat": {"format": QAT_FORMAT, "bn_folded": True, "bgr_input": True, "ties": dict(model.ties), **qat_meta}}
    return {"state_dict": model.float_state_dict(), "quantizers": model.ranges(), "meta": meta}


def export_qat_classifier(model: QATClassifier, path: Path, calibration: np.ndarray, calib_files: list[Path], *,
                          int8_io: str, classes: list[str], source: dict[str, Any]) -> Path:
    """The int8 .tflite (+ sidecar) of the QAT weights at `path`, calibrated on `calibration`."""
    from rtmdet.export.classify import export_classifier_tflite
    from rtmdet.export.sidecar import meta_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".qat-export-", dir=path.parent) as tmp:
        (result,) = export_classifier_tflite(to_float_classifier(model), tmp, ["int8"], calibration,
                                             calib_files=calib_files, int8_io=int8_io, stem="model",
                                             classes=classes, source=source)
        os.replace(result.path, path)
        os.replace(meta_path(result.path), meta_path(path))
    log.info("wrote %s (int8 of the QAT weights)", path)
    return path


def run_qat_classifier(weights: Path, dataset, qat: QATParams, train: TrainParams, export: ExportParams,
                       out, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """The qat stage for a classifier checkpoint: fine-tune, qat.pt, the int8 TFLite, metrics
    (top-1 on val of the float model, the fake-quant model and the int8 file)."""
    from rtmdet.export.classify import classifier_calibration, score_classifier
    from rtmdet.models.checkpoint import class_names_of, load_classifier
    from rtmdet.quantization.export import sha256_of
    from rtmdet.quantization.qat import finetune

    start = time.perf_counter()
    dev = torch.device(device)
    model, ckpt = load_classifier(weights, dev)
    classes = class_names_of(ckpt, model.cfg.num_classes)
    if classes != list(dataset.classes):
        raise DataError(f"{weights}: classes {classes} differ from the dataset's {list(dataset.classes)}")
    if "val" not in dataset.splits:
        raise DataError(f"{dataset.root}: no val split to score QAT on")
    calib, files = classifier_calibration(dataset, export.calib_images, model.cfg.image_size, export.seed)
    float_top1 = score_classifier(model, dataset, "val").top1
    qmodel = prepare_qat_classifier(model)
    tuned = finetune(qmodel, dataset, qat, train, calib, dev, progress, teacher=model if qat.distill else None)
    qmodel.cpu().eval()
    fq_top1 = score_classifier(qmodel, dataset, "val").top1
    log.info("top-1 on val: float %.4f, fake-quant %.4f", float_top1, fq_top1)
    qat_meta = {"params": as_dict(qat), "history": tuned.history,
                "range_shift": {"fraction": tuned.range_shift, "quantizer": tuned.range_shift_at},
                "source": {"checkpoint": Path(weights).name, "sha256": sha256_of(weights)},
                "calibration": {"split": "train", "images": len(files), "seed": export.seed},
                "metrics": {"float": {"top1": float_top1}, "fake_quant": {"top1": fq_top1}}}
    save_atomic(qat_classifier_checkpoint(qmodel, classes, qat_meta), out.checkpoint)
    source = {"checkpoint": out.checkpoint.name, "sha256": sha256_of(out.checkpoint), "qat": True,
              "float_checkpoint": Path(weights).name}
    export_qat_classifier(qmodel, out.tflite, calib, files, int8_io=export.int8_io, classes=classes, source=source)
    int8_top1 = score_classifier(out.tflite, dataset, "val").top1
    metrics = {"float": {"top1": float_top1}, "fake_quant": {"top1": fq_top1}, "int8": {"top1": int8_top1},
               "epochs": qat.epochs, "seconds": round(time.perf_counter() - start, 1)}
    write_json_atomic(out.metrics, metrics)
    return metrics
