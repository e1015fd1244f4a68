"""The per-image result every backend returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Detections:
    """Detections for one image, in original-image pixels, sorted by descending score."""

    boxes: np.ndarray  # [K, 4] float32 xyxy
    scores: np.ndarray  # [K] float32 in (0, 1]
    labels: np.ndarray  # [K] int64 class indices
    class_names: list[str]  # the model's classes; names[i] = class_names[labels[i]]
    image_hw: tuple[int, int] = (0, 0)  # original image height, width
    # The segment task: each detection's mask over the original image, as a COCO RLE ({"size":
    # [H, W], "counts": str}; pycocotools.mask.decode gives it back). None for box models.
    masks: list[dict] | None = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def names(self) -> list[str]:
        return [self.class_names[int(i)] for i in self.labels]
