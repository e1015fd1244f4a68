"""A COCO instance-segmentation dataset read as rotated boxes (model.task rotate on COCO data).

Each instance's rotated box is the minimum-area rectangle of its segmentation: of all its polygons'
points, or of an RLE mask's pixels (their corners), fitted by cv2.minAreaRect and normalized to le90
through its four corners (rtmdet.geometry.rotated.quad_to_rbox), the DOTA loader's convention. This
is how oriented boxes are commonly made from polygon labels (DOTA's own boxes are the labelled
quads' rectangles). Instances without a usable segmentation are dropped and counted by the COCO
loader (load_dataset(masks=True)); the splits keep their COCO names (train, valid, test).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from rtmdet.data.dota import RotatedDataset, RotatedRecord, RotatedSplit
from rtmdet.data.records import ImageRecord
from rtmdet.geometry.rotated import quad_to_rbox

log = logging.getLogger(__name__)


def segmentation_points(segmentation, height: int, width: int) -> np.ndarray:
    """The [P, 2] points an instance's rectangle must enclose: its polygons' vertices, or for RLE
    the corners of its mask pixels."""
    if isinstance(segmentation, list):
        pts = [np.asarray(poly, np.float64).reshape(-1, 2) for poly in segmentation if len(poly) >= 6]
        return np.concatenate(pts) if pts else np.zeros((0, 2))
    from rtmdet.data.masks import segmentation_to_mask

    ys, xs = np.nonzero(segmentation_to_mask(segmentation, height, width))
    if not len(xs):
        return np.zeros((0, 2))
    corners = [(xs, ys), (xs + 1, ys), (xs, ys + 1), (xs + 1, ys + 1)]
    return np.concatenate([np.column_stack(c) for c in corners]).astype(np.float64)


def min_area_rbox(points: np.ndarray) -> np.ndarray | None:
    """The le90 rotated box [5] of the minimum-area rectangle around points; None for fewer than
    3 points or no area."""
    if len(points) < 3:
        return None
    rect = cv2.minAreaRect(points.astype(np.float32))
    if min(rect[1]) <= 0:
        return None
    rbox, _ = quad_to_rbox(cv2.boxPoints(rect)[None])
    return rbox[0]


def rotated_record(rec: ImageRecord, warnings: Counter) -> RotatedRecord:
    boxes, labels = [], []
    for seg, label in zip(rec.segmentations or [], rec.labels):
        rbox = min_area_rbox(segmentation_points(seg, rec.height, rec.width))
        if rbox is None:
            warnings["degenerate"] += 1
            continue
        boxes.append(rbox)
        labels.append(int(label))
    if not boxes:
        warnings["background_image"] += 1
    return RotatedRecord(rec.image_id, rec.file, rec.width, rec.height, np.asarray(boxes, np.float32).reshape(-1, 5),
                         np.asarray(labels, np.int64), np.zeros(len(labels), bool))


def load_coco_rotated(root: str | Path | None = None, splits: dict | None = None) -> RotatedDataset:
    """The COCO dataset (root or explicit splits, as load_dataset) with rotated boxes from its masks."""
    from rtmdet.data.coco import load_dataset
    from rtmdet.data.dota import REASONS

    coco = load_dataset(root, splits=splits, masks=True)
    out = {}
    for name, split in coco.splits.items():
        warnings: Counter = Counter()
        records = [rotated_record(r, warnings) for r in split.records]
        for reason, count in warnings.items():
            log.warning("%s split: %d %s", name, count, REASONS[reason].replace("quads", "segmentations"))
        out[name] = RotatedSplit(name, Path(split.records[0].file).parent if split.records else Path(), records,
                                 warnings)
    return RotatedDataset(list(coco.classes), out)
