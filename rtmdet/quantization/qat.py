"""Quantization-aware fine-tuning: the float model, BN folded, trained under TFLite's int8.

Schedule (epochs 0-based, F = qat.freeze_observers_epoch):
  * before epochs 0..F: every activation range is recalibrated as TF's converter will do it
    (global min/max over the export's calibration images, float model); from epoch F on the
    ranges stay fixed, so the last epochs adapt the weights to one fixed int8 grid;
  * every step: the task's stage-2 samples (no mosaic/mixup; a classifier's: no RandAugment or
    Mixup/CutMix) and its loss (RTMDetLoss, ...), or, given a `teacher` (classifiers,
    qat.distill), the cross-entropy with the float teacher's softmax on the same batch
    (knowledge distillation: the int8 model learns the float model's answers, not the labels,
    so fine-tuning cannot drift from the model it quantizes); a detector given a `teacher`
    (qat.distill_weight > 0) adds the pull toward the float model's raw outputs
    (rtmdet.quantization.self_distill) to its task loss. AdamW over the folded weights (no BN
    left to freeze), lr on a cosine from qat.lr down to train.min_lr_ratio x qat.lr; with
    qat.ema > 0 (auto: 0.01 for segment models) a moving average of the weights is kept and
    replaces them after the last step;
  * after the last epoch: one more calibration with the final weights: the converter
    calibrates the weights it is given, so these are the ranges the int8 file will have.
    How far they moved from the frozen ones is reported (`range_shift`).
Ranges never move in a training step or in evaluation: only `calibrate` sets them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rtmdet.config import ModelParams, QATParams, TrainParams
from rtmdet.data.loader import build_dataloader, set_epoch
from rtmdet.data.records import DetectionDataset
from rtmdet.errors import ConfigError, RTMDetError
from rtmdet.failpoints import kill_point
from rtmdet.quantization.model import QATModel, calibrate
from rtmdet.quantization.self_distill import output_distillation
from rtmdet.training.build import seed_everything
from rtmdet.training.losses import RTMDetLoss, make_priors
from rtmdet.training.losses_cls import ClassifierLoss
from rtmdet.training.tasks import train_task
from rtmdet.training.optim import LrSchedule, build_optimizer, set_lr

log = logging.getLogger(__name__)


class QATError(RTMDetError):
    """Quantization-aware training cannot go on (a NaN or infinite loss)."""


@dataclass
class FinetuneResult:
    """What the fine-tuning did: per-epoch means, wall time, and how far the final ranges moved."""

    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    range_shift: float = 0.0  # max over quantizers of |final - frozen| / frozen range width
    range_shift_at: str = ""  # the quantizer that moved most


def check_qat_params(qat: QATParams) -> None:
    """Reject values the loop cannot run with, naming the key."""
    for key in ("epochs", "batch_size"):
        if getattr(qat, key) < 1:
            raise ConfigError(f"qat.{key} must be at least 1, got {getattr(qat, key)}")
    if qat.lr <= 0:
        raise ConfigError(f"qat.lr must be positive, got {qat.lr}")
    if qat.distill_weight < 0:
        raise ConfigError(f"qat.distill_weight must be 0 or more, got {qat.distill_weight}")
    if qat.ema != "auto" and (isinstance(qat.ema, str) or not 0 <= qat.ema < 1):
        raise ConfigError(f"qat.ema must be auto or in [0, 1), got {qat.ema!r}")
    if qat.freeze_observers_epoch < 0:
        raise ConfigError(f"qat.freeze_observers_epoch must be 0 or more, got {qat.freeze_observers_epoch}")
    if qat.workers < 0:
        raise ConfigError(f"qat.workers must be 0 or more, got {qat.workers}")


# qat.ema "auto": per task (see rtmdet.config.QATParams)
AUTO_EMA = {"segment": 0.01}


def resolve_ema(ema: float | str, task: str) -> float:
    """qat.ema as a number for a model of `task`."""
    return AUTO_EMA.get(task, 0.0) if ema == "auto" else float(ema)


def finetune(model: QATModel, dataset: DetectionDataset, qat: QATParams, train: TrainParams,
             calibration: np.ndarray, device: torch.device, progress: bool = True,
             teacher: torch.nn.Module | None = None) -> FinetuneResult:
    """Fine-tune `model` in place under fake-quant (see the module docstring); `teacher`: the float
    model, whose softmax replaces a classifier's labels and whose raw outputs a detector is pulled
    toward (qat.distill_weight)."""
    check_qat_params(qat)
    classify = model.cfg.task == "classify"
    distill_weight = qat.distill_weight if teacher is not None and not classify else 0.0
    seed_everything(qat.seed)
    model.to(device)
    if train.channels_last:
        model.to(memory_format=torch.channels_last)
    imgsz = model.cfg.image_size
    task = train_task(model.cfg.task)  # the model's task: its samples and its loss (segment: Dice masks too)
    samples, collate_fn = task.parts.train_data(dataset, ModelParams(size=model.cfg.size, imgsz=imgsz,
                                                                     task=model.cfg.task), train)
    loader = build_dataloader(samples, qat.batch_size, num_workers=qat.workers, seed=qat.seed, collate_fn=collate_fn)
    iters = loader.batch_sampler.batches_per_epoch()
    lr = qat.lr * qat.batch_size / train.base_batch_size
    schedule = LrSchedule(lr, 0, 0, qat.epochs * iters, lr * train.min_lr_ratio)
    optimizer = build_optimizer(model, lr, train.weight_decay, device)
    if teacher is not None:
        teacher.to(device).eval()
    if teacher is not None and classify:
        criterion = ClassifierLoss(smoothing=0.0)  # the teacher's probabilities are the soft targets
    else:
        criterion = task.loss(model, train)
    names = ["loss", "loss_cls", "loss_bbox"] + ["loss_mask"] * task.masks + ["loss_distill"] * bool(distill_weight)
    params = [p for p in model.parameters() if p.requires_grad]
    ema = resolve_ema(qat.ema, model.cfg.task)
    average = [p.detach().clone() for p in params] if ema > 0 else None
    priors = None
    if task.parts.uses_priors:
        priors = make_priors([(imgsz // s, imgsz // s) for s in model.strides], model.strides, device=device)
    result, start, frozen = FinetuneResult(), time.perf_counter(), None
    log.info("QAT: %d epochs x %d iterations, lr %.3g, ranges fixed from epoch %d%s%s", qat.epochs, iters, lr,
             qat.freeze_observers_epoch + 1, f", distilled (weight {distill_weight:g})" if distill_weight else "",
             f", weights averaged (ema {ema:g})" if average else "")
    for epoch in range(qat.epochs):
        if epoch <= qat.freeze_observers_epoch:
            calibrate(model, calibration)
            if epoch == qat.freeze_observers_epoch:
                frozen = model.ranges()
        set_epoch(loader, epoch, stage=2)
        model.train()
        sums = torch.zeros(len(names), device=device)
        bar = tqdm(loader, total=iters, desc=f"qat {epoch + 1}/{qat.epochs}", unit="it", leave=False,
                   disable=not progress, dynamic_ncols=True)
        epoch_start = time.perf_counter()
        for k, batch in enumerate(bar):
            set_lr(optimizer, schedule(epoch * iters + k))
            losses = _step(model, batch, criterion, task.targets, priors, optimizer, device, train.channels_last,
                           teacher, classify, distill_weight, names)
            if average is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(average, [p.detach() for p in params], ema)
            kill_point("qat:step")
            sums += losses
        means = (sums / iters).tolist()
        if not all(math.isfinite(v) for v in means):
            raise QATError(f"QAT epoch {epoch + 1}: the loss became NaN/inf ({means[0]}); try a lower qat.lr")
        # No wall times in the history: it goes into qat.pt, which should be byte-reproducible.
        result.history.append({"epoch": epoch + 1, **dict(zip(names, means)), "lr": optimizer.param_groups[0]["lr"]})
        extra = "".join(f", {n[5:]} {v:.4f}" for n, v in zip(names[3:], means[3:]))
        log.info("QAT epoch %d/%d  loss %.4f (cls %.4f, bbox %.4f%s)  %.1fs", epoch + 1, qat.epochs, *means[:3],
                 extra, time.perf_counter() - epoch_start)
    if average is not None:  # the averaged weights are the ones calibrated and exported
        with torch.no_grad():
            torch._foreach_copy_(params, average)
    if train.channels_last:  # back to the default layout: evaluation and qat.pt then match bit for bit
        model.to(memory_format=torch.contiguous_format)
    calibrate(model, calibration)  # the converter's ranges for the final weights
    if frozen:
        result.range_shift, result.range_shift_at = _range_shift(frozen, model.ranges())
    result.seconds = time.perf_counter() - start
    return result


def _step(model: QATModel, batch: dict[str, Any], criterion: RTMDetLoss, targets: tuple[str, ...],
          priors: torch.Tensor, optimizer: torch.optim.Optimizer, device: torch.device,
          channels_last: bool, teacher: torch.nn.Module | None, classify: bool, distill_weight: float,
          names: list[str]) -> torch.Tensor:
    images = batch["images"].to(device, non_blocking=True)
    x = model.normalize(images)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    on_device = {k: batch[k].to(device) for k in targets}
    taught = None
    if teacher is not None:
        with torch.no_grad():
            taught = teacher(teacher.normalize(images))
        if classify:
            on_device["targets"] = taught.float().softmax(dim=1)
    out = model(x)
    losses = criterion.normalize(criterion.step_sums(out, on_device, priors=priors))
    if distill_weight:
        losses["loss_distill"] = distill_weight * output_distillation(out, taught)
        losses["loss"] = losses["loss"] + losses["loss_distill"]
    losses["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack([losses[k] for k in names]).detach()


def _range_shift(before: dict[str, list[float]], after: dict[str, list[float]]) -> tuple[float, str]:
    """The largest move of a range end, as a fraction of the frozen range's width, and where."""
    worst, where = 0.0, ""
    for name, (lo, hi) in before.items():
        width = max(hi - lo, 1e-12)
        lo2, hi2 = after[name]
        shift = max(abs(lo2 - lo), abs(hi2 - hi)) / width
        if shift > worst:
            worst, where = shift, name
    return worst, where
