"""Detections matched to ground truth at one score threshold: confusion matrix and per-image errors.

Matching (per image, IoU >= iou_thr, greedy in descending score order, each box used once):
  1. same class first: each detection takes the unmatched ground truth *of its own class* with
     the highest IoU; this is COCOeval's notion of a true positive, so the diagonal agrees with AP;
  2. then any class: a detection still unmatched takes the unmatched ground truth of *another*
     class with the highest IoU; that is a class swap (an off-diagonal cell).
What is left is a false alarm (detection) or a miss (ground truth). A second detection of an
object already taken is a false alarm, as in COCO. Unmatched detections that lie on a crowd
region (intersection over the detection's own area >= iou_thr) are ignored, as COCOeval does.

The matrix has ground-truth rows and predicted columns, each with a final "background" entry:
row `background` counts false alarms per predicted class, column `background` misses per
ground-truth class; the background/background cell is always 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

from rtmdet.data.records import ImageRecord
from rtmdet.inference.detections import Detections

BACKGROUND = "background"


@dataclass
class ImageMatch:
    """How the detections of one image matched its ground truth (indices, -1 for none)."""

    gt_to_pred: np.ndarray  # [G] index of the matched detection or -1
    pred_to_gt: np.ndarray  # [P] index of the matched ground truth or -1
    ignored: np.ndarray  # [P] bool: unmatched detection on a crowd region, not counted


def match_image(
    gt_boxes: np.ndarray, gt_labels: np.ndarray, pred_boxes: np.ndarray, pred_scores: np.ndarray,
    pred_labels: np.ndarray, iou_thr: float = 0.5, crowd_boxes: np.ndarray | None = None,
) -> ImageMatch:  # fmt: skip
    """Match one image's detections (already cut at the score threshold) to its ground truth."""
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    pred_boxes = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels, np.int64).reshape(-1)
    pred_labels = np.asarray(pred_labels, np.int64).reshape(-1)
    gt_to_pred = np.full(len(gt_boxes), -1, np.int64)
    pred_to_gt = np.full(len(pred_boxes), -1, np.int64)
    ignored = np.zeros(len(pred_boxes), bool)
    if len(pred_boxes) == 0:
        return ImageMatch(gt_to_pred, pred_to_gt, ignored)
    # Stable sort: equal scores keep the detector's order, so results are reproducible.
    order = np.argsort(-np.asarray(pred_scores, np.float64).reshape(-1), kind="stable")
    if len(gt_boxes):
        iou = box_iou(torch.from_numpy(pred_boxes), torch.from_numpy(gt_boxes)).numpy()
        same = pred_labels[:, None] == gt_labels[None, :]
        for allowed in (same, ~same):
            for p in order:
                if pred_to_gt[p] >= 0:
                    continue
                cand = np.where(allowed[p] & (gt_to_pred < 0), iou[p], -1.0)
                g = int(np.argmax(cand))
                if cand[g] >= iou_thr:
                    pred_to_gt[p], gt_to_pred[g] = g, p
    if crowd_boxes is not None and len(crowd_boxes):
        ignored = (pred_to_gt < 0) & (_ioa(pred_boxes, np.asarray(crowd_boxes, np.float64)) >= iou_thr)
    return ImageMatch(gt_to_pred, pred_to_gt, ignored)


def _ioa(boxes: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Largest intersection of each box with any region, over the box's own area."""
    regions = regions.reshape(-1, 4)
    lt = np.maximum(boxes[:, None, :2], regions[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], regions[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area = np.clip(boxes[:, 2:] - boxes[:, :2], 0, None).prod(axis=1)
    return (inter / np.maximum(area, 1e-9)[:, None]).max(axis=1)


@dataclass
class ImageErrors:
    """Mistakes on one image at the display threshold; `errors` ranks images worst first."""

    image_id: int
    num_gt: int
    num_pred: int  # detections above the threshold, crowd-ignored ones excluded
    hits: int
    swaps: int  # matched to an object of another class
    misses: int
    false_alarms: int

    @property
    def errors(self) -> int:
        """Every mistake counts once: misses + false alarms + class swaps."""
        return self.misses + self.false_alarms + self.swaps

    @property
    def f1(self) -> float:
        """Per-image F1 of class-correct hits; 1.0 for an image with nothing to find and nothing found."""
        total = self.num_gt + self.num_pred
        return 1.0 if total == 0 else 2.0 * self.hits / total


@dataclass
class ConfusionMatrix:
    """Counts [C+1, C+1]: rows ground truth + background, columns predictions + background."""

    classes: list[str]
    matrix: np.ndarray
    score_thr: float
    iou_thr: float

    @property
    def labels(self) -> list[str]:
        """Row / column names: the classes, then background."""
        return [*self.classes, BACKGROUND]

    def normalized(self) -> np.ndarray:
        """Each row divided by its sum (where ground truth of a class went); empty rows stay 0."""
        rows = self.matrix.sum(axis=1, keepdims=True).astype(np.float64)
        return np.divide(self.matrix, rows, out=np.zeros(self.matrix.shape), where=rows > 0)

    def per_class(self) -> list[dict[str, float | int | None]]:
        """tp, fp (false alarms + swaps into the class), fn (misses + swaps away), precision, recall."""
        m, rows = self.matrix, []
        for c, name in enumerate(self.classes):
            tp = int(m[c, c])
            fp = int(m[:, c].sum()) - tp
            fn = int(m[c, :].sum()) - tp
            rows.append({"name": name, "tp": tp, "fp": fp, "fn": fn,
                         "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn)})  # fmt: skip
        return rows

    def totals(self) -> dict[str, float | int | None]:
        """Over all classes: tp, fp, fn, precision, recall, f1 (None where undefined)."""
        c = len(self.classes)
        tp = int(np.trace(self.matrix[:c, :c]))
        fn = int(self.matrix[:c, :].sum()) - tp
        fp = int(self.matrix[:, :c].sum()) - tp
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
        return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1}


def _ratio(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def _matches(
    records: Sequence[ImageRecord], detections: dict[int, Detections], score_thr: float,
    iou_thr: float,
) -> Iterator[tuple[ImageRecord, np.ndarray, ImageMatch]]:  # fmt: skip
    """(record, predicted labels kept, match) per image; images without detections match nothing."""
    for rec in records:
        dets = detections.get(int(rec.image_id))
        if dets is None or len(dets) == 0:
            boxes, scores, labels = np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
        else:
            keep = np.asarray(dets.scores) >= score_thr
            boxes, scores = np.asarray(dets.boxes)[keep], np.asarray(dets.scores)[keep]
            labels = np.asarray(dets.labels)[keep]
        m = match_image(rec.boxes, rec.labels, boxes, scores, labels, iou_thr, rec.crowd_boxes)
        yield rec, np.asarray(labels, np.int64), m


def confusion_matrix(
    records: Sequence[ImageRecord], detections: dict[int, Detections], classes: Sequence[str],
    score_thr: float = 0.3, iou_thr: float = 0.5,
) -> ConfusionMatrix:  # fmt: skip
    """The confusion matrix of a split's detections (keyed by image id) at `score_thr`."""
    c = len(classes)
    m = np.zeros((c + 1, c + 1), np.int64)
    for rec, pred_labels, match in _matches(records, detections, score_thr, iou_thr):
        for g, p in enumerate(match.gt_to_pred):
            m[int(rec.labels[g]), c if p < 0 else int(pred_labels[p])] += 1
        for p in np.flatnonzero((match.pred_to_gt < 0) & ~match.ignored):
            m[c, int(pred_labels[p])] += 1
    return ConfusionMatrix(list(classes), m, float(score_thr), float(iou_thr))


def image_errors(
    records: Sequence[ImageRecord], detections: dict[int, Detections], score_thr: float = 0.3,
    iou_thr: float = 0.5,
) -> list[ImageErrors]:  # fmt: skip
    """Hits, swaps, misses and false alarms per image at `score_thr`, in record order."""
    out = []
    for rec, pred_labels, match in _matches(records, detections, score_thr, iou_thr):
        matched = match.gt_to_pred >= 0
        swapped = sum(int(rec.labels[g] != pred_labels[p])
                      for g, p in enumerate(match.gt_to_pred) if p >= 0)  # fmt: skip
        false_alarms = int(((match.pred_to_gt < 0) & ~match.ignored).sum())
        out.append(ImageErrors(
            image_id=int(rec.image_id), num_gt=len(rec.labels),
            num_pred=int((~match.ignored).sum()), hits=int(matched.sum()) - swapped,
            swaps=swapped, misses=int((~matched).sum()), false_alarms=false_alarms,
        ))  # fmt: skip
    return out


def rank_worst(errors: Sequence[ImageErrors]) -> list[ImageErrors]:
    """Worst first: most mistakes, then lowest per-image F1, then image id (deterministic)."""
    return sorted(errors, key=lambda e: (-e.errors, e.f1, e.image_id))
