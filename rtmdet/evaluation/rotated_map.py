"""DOTA-style mAP for rotated boxes, as MMRotate's DOTAMetric computes it (eval_rbbox_map).

Per class and image, detections in descending score are matched to the ground truth they
overlap most (rotated IoU, every ground truth of the class, difficult ones included): at IoU >=
the threshold a first match is a true positive, a repeat match a false positive, and a match
to a difficult box counts as neither; below it, a false positive. Precision and recall run over
all images' detections by score, recall over the non-difficult boxes. AP is VOC07's 11-point
mean (MMRotate's default for DOTA) or the area under the interpolated curve; mAP averages the
classes that have ground truth. mAP50:95 averages the mAP at IoU 0.50, 0.55, ..., 0.95.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rtmdet.geometry.rotated import rotated_iou

AP_MODES = ("11points", "area")


@dataclass(frozen=True)
class RotatedDetections:
    """One image's detections: rboxes [N, 5], scores [N], labels [N]."""

    rboxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class RotatedTruth:
    """One image's ground truth: rboxes [K, 5], labels [K], difficult [K] bool."""

    rboxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


def average_precision(recall: np.ndarray, precision: np.ndarray, mode: str = "11points") -> float:
    """AP of one class's recall/precision curve (in score order)."""
    if mode == "11points":
        points = [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.arange(0, 1.1, 0.1)]
        return float(np.mean(points))
    if mode != "area":
        raise ValueError(f"AP mode {mode!r}: use one of {', '.join(AP_MODES)}")
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the precision envelope
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]).sum())


def _match(det: np.ndarray, scores: np.ndarray, gt: np.ndarray, difficult: np.ndarray,
           iou_thr: float) -> tuple[np.ndarray, np.ndarray]:
    """(tp, fp) flags of one image's detections of one class."""
    tp, fp = np.zeros(len(det), np.float32), np.zeros(len(det), np.float32)
    if len(gt) == 0:
        fp[:] = 1
        return tp, fp
    if len(det) == 0:
        return tp, fp
    ious = rotated_iou(torch.from_numpy(det).double(), torch.from_numpy(gt).double()).numpy()
    best, which = ious.max(1), ious.argmax(1)
    covered = np.zeros(len(gt), bool)
    for i in np.argsort(-scores, kind="stable"):
        if best[i] >= iou_thr:
            g = which[i]
            if difficult[g]:
                continue
            if covered[g]:
                fp[i] = 1
            else:
                covered[g], tp[i] = True, 1
        else:
            fp[i] = 1
    return tp, fp


def rotated_map(detections: Sequence[RotatedDetections], truths: Sequence[RotatedTruth], num_classes: int,
                iou_thr: float = 0.5, mode: str = "11points") -> dict:
    """{"mAP": float, "per_class": [{"ap", "num_gts", "num_dets", "recall", "curve": (recall,
    precision) arrays in score order} per class]} at one IoU."""
    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} images of detections but {len(truths)} of ground truth")
    per_class = []
    for c in range(num_classes):
        tps, fps, scores, num_gts = [], [], [], 0
        for det, gt in zip(detections, truths):
            d, g = det.labels == c, gt.labels == c
            tp, fp = _match(det.rboxes[d], det.scores[d], gt.rboxes[g], gt.difficult[g], iou_thr)
            tps.append(tp)
            fps.append(fp)
            scores.append(det.scores[d])
            num_gts += int((~gt.difficult[g]).sum())
        order = np.argsort(-np.concatenate(scores), kind="stable")
        tp, fp = np.cumsum(np.concatenate(tps)[order]), np.cumsum(np.concatenate(fps)[order])
        eps = np.finfo(np.float32).eps
        recall = tp / max(num_gts, eps)
        precision = tp / np.maximum(tp + fp, eps)
        per_class.append({"ap": average_precision(recall, precision, mode), "num_gts": num_gts,
                          "num_dets": int(len(order)), "recall": float(recall[-1]) if len(recall) else 0.0,
                          "curve": (recall, precision)})  # in score order: the PR curve's points
    aps = [r["ap"] for r in per_class if r["num_gts"] > 0]
    return {"mAP": float(np.mean(aps)) if aps else 0.0, "per_class": per_class}


def rotated_map_50_95(detections: Sequence[RotatedDetections], truths: Sequence[RotatedTruth], num_classes: int,
                      mode: str = "11points") -> dict:
    """{"mAP50": ..., "mAP75": ..., "mAP50_95": the mean over IoU 0.50:0.05:0.95}."""
    thrs = np.round(np.arange(0.5, 0.96, 0.05), 2)
    maps = {float(t): rotated_map(detections, truths, num_classes, float(t), mode)["mAP"] for t in thrs}
    return {"mAP50": maps[0.5], "mAP75": maps[0.75], "mAP50_95": float(np.mean(list(maps.values())))}
