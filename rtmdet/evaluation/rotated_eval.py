"""Scoring a rotated-box model (RTMDet-R) on a DOTA-layout split: one predictor, one scorer.

`RotatedPredictor` runs the inference pre-process (letterbox), the model and the shared rotated
post-process (rtmdet.inference.rotated) on a batch of images; `score_rotated` gives the DOTA-style
numbers of rtmdet.evaluation.rotated_map for any detections (ours or another model's):

* mAP50: MMRotate's DOTAMetric figure, VOC07 11-point AP at rotated IoU 0.5 (its default);
* mAP75 and mAP (= mAP50:95, the mean over IoU 0.50:0.05:0.95) in the same mode;
* the same three in "area" mode (the area under the interpolated curve) as *_area;
* per class: AP50, AP50:95, ground-truth and detection counts, recall at IoU 0.5.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from rtmdet.data.dota import RotatedRecord
from rtmdet.evaluation.rotated_map import RotatedDetections, RotatedTruth, rotated_map
from rtmdet.imageio import read_image
from rtmdet.inference.preprocess import letterbox
from rtmdet.inference.rotated import RotatedPostprocessConfig, postprocess_rotated

IOU_THRS = tuple(float(t) for t in np.round(np.arange(0.5, 0.96, 0.05), 2))


def truths_of(records: Sequence[RotatedRecord]) -> list[RotatedTruth]:
    """The ground truth of records, in their order."""
    return [RotatedTruth(np.asarray(r.rboxes, np.float64).reshape(-1, 5), np.asarray(r.labels, np.int64),
                         np.asarray(r.difficult, bool)) for r in records]


def score_rotated(detections: Sequence[RotatedDetections], truths: Sequence[RotatedTruth],
                  classes: Sequence[str]) -> dict[str, Any]:
    """mAP (50:95), mAP50, mAP75, their *_area twins and per-class rows (see the module docstring)."""
    out: dict[str, Any] = {}
    per_thr = {}
    for mode, suffix in (("11points", ""), ("area", "_area")):
        per_thr[mode] = {t: rotated_map(detections, truths, len(classes), t, mode) for t in IOU_THRS}
        maps = {t: r["mAP"] for t, r in per_thr[mode].items()}
        out[f"mAP{suffix}"] = float(np.mean(list(maps.values())))
        out[f"mAP50{suffix}"] = maps[0.5]
        out[f"mAP75{suffix}"] = maps[0.75]
    rows = []
    for c, name in enumerate(classes):
        at50 = per_thr["11points"][0.5]["per_class"][c]
        rows.append({"class": name, "ap50": at50["ap"], "num_gts": at50["num_gts"], "num_dets": at50["num_dets"],
                     "recall50": at50["recall"],
                     "ap": float(np.mean([per_thr["11points"][t]["per_class"][c]["ap"] for t in IOU_THRS]))})
    out["per_class"] = rows
    return out


class RotatedPredictor:
    """Images (BGR uint8) -> RotatedDetections in original-image pixels, for a torch RTMDet-R."""

    def __init__(self, model: nn.Module, imgsz: int, device: torch.device | str,
                 cfg: RotatedPostprocessConfig = RotatedPostprocessConfig()):
        self.model, self.imgsz, self.device, self.cfg = model, imgsz, torch.device(device), cfg

    def canvases(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[tuple[float, float]]]:
        """The letterboxed batch [N, 3, S, S] uint8 and each image's scale_wh."""
        boxes = [letterbox(im, self.imgsz) for im in images]
        batch = torch.from_numpy(np.stack([c for c, _ in boxes])).permute(0, 3, 1, 2).contiguous()
        return batch, [info.scale_wh for _, info in boxes]

    @torch.inference_mode()
    def predict_batch(self, batch: torch.Tensor, scale_wh: list[tuple[float, float]]) -> list[RotatedDetections]:
        """A letterboxed uint8 batch -> its detections."""
        was_training = self.model.training
        self.model.eval()
        try:
            x = self.model.normalize(batch.to(self.device, non_blocking=True))
            cls, reg, ang = self.model(x)[:3]
        finally:
            self.model.train(was_training)
        results = postprocess_rotated(cls, reg, ang, tuple(self.model.strides), scale_wh, self.cfg)
        return [RotatedDetections(rb.double().cpu().numpy(), s.float().cpu().numpy(), lb.cpu().numpy())
                for rb, s, lb in results]

    def __call__(self, images: Sequence[np.ndarray]) -> list[RotatedDetections]:
        return self.predict_batch(*self.canvases(images))


def evaluate_rotated(model: nn.Module, records: Sequence[RotatedRecord], classes: Sequence[str], imgsz: int,
                     device: torch.device | str, cfg: RotatedPostprocessConfig = RotatedPostprocessConfig(),
                     batch_size: int = 16) -> dict[str, Any]:
    """score_rotated of the model's detections on records, plus the detections and timings."""
    predictor = RotatedPredictor(model, imgsz, device, cfg)
    start = time.perf_counter()
    detections: list[RotatedDetections] = []
    for i in range(0, len(records), batch_size):
        detections += predictor([read_image(r.file) for r in records[i:i + batch_size]])
    seconds = time.perf_counter() - start
    scored = score_rotated(detections, truths_of(records), classes)
    return {**scored, "detections": detections, "seconds": seconds, "images": len(records)}
