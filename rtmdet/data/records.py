"""Plain records for a validated detection dataset, shared by reading, training and evaluation."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class ImageRecord:
    """One image and its validated targets.

    boxes are xyxy float32 pixels in the image as decoded (EXIF applied), already clipped;
    labels are contiguous int64 class indices 0..C-1. Crowd boxes never become targets.
    """

    image_id: int  # the id in the user's annotation file
    file: Path  # absolute path to the image
    width: int
    height: int
    boxes: np.ndarray  # [K, 4] float32 xyxy
    labels: np.ndarray  # [K] int64
    # [K] float32: the annotation's own "area" when given and positive, else box w*h; COCO's
    # small/medium/large ranges use it, so evaluation must see the user's value.
    areas: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    crowd_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    crowd_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    # With masks (the segment task): per box, its `segmentation` as polygons in these pixels or
    # RLE, checked by rtmdet.data.masks.check_segmentation; None when masks were not read.
    segmentations: list | None = None


@dataclass
class DetectionSplit:
    """A validated split: its records and what was skipped, counted per reason."""

    name: str
    ann_file: Path
    img_dir: Path
    records: list[ImageRecord]
    warnings: Counter = field(default_factory=Counter)  # reason -> count


@dataclass
class DetectionDataset:
    """All splits of a dataset with one class list.

    classes[label] is the class name and category_ids[label] the original COCO category id,
    so results files can be written with the user's own ids.
    """

    classes: list[str]
    category_ids: list[int]
    splits: dict[str, DetectionSplit]
    notes: list[str] = field(default_factory=list)
