"""Classifier image transforms: mmpretrain's CSPNeXt recipe (RandomResizedCrop and a flip for
training; the short edge to size x 256/224, then a centre crop, for evaluation).

Randomness comes only from the Generator passed in (rtmdet.data.pipeline.sample_rng of the
sample's key), so a training image is the same for any number of loader workers, as for boxes.
mmpretrain resizes with Pillow's bicubic; OpenCV's bicubic is used here (close, not bit-equal).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

SCALE = (0.08, 1.0)  # RandomResizedCrop's area fraction range
RATIO = (3 / 4, 4 / 3)  # and its aspect-ratio range (w / h)
EVAL_RESIZE = 256 / 224  # ResizeEdge(236) before CenterCrop(224) in the configs, i.e. size x 256/224 rounded


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator, scale: tuple[float, float] = SCALE,
                        ratio: tuple[float, float] = RATIO, attempts: int = 10) -> np.ndarray:
    """A random region (crop_region) resized to size x size."""
    top, left, ch, cw = crop_region(*image.shape[:2], rng, scale, ratio, attempts)
    return _resize(image[top:top + ch, left:left + cw], size, size)


def crop_region(h: int, w: int, rng: np.random.Generator, scale: tuple[float, float] = SCALE,
                ratio: tuple[float, float] = RATIO, attempts: int = 10) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a region of area fraction in `scale` and aspect ratio (w / h) in
    `ratio`; after `attempts` misses, the largest centred region whose ratio is in range
    (torchvision's and mmpretrain's rule)."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def random_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirror left-right with probability p."""
    return np.ascontiguousarray(image[:, ::-1]) if rng.random() < p else image


def train_transform(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The training view of an image: RandomResizedCrop to size, then a horizontal flip."""
    return random_flip(random_resized_crop(image, size, rng), rng)


def eval_transform(image: np.ndarray, size: int) -> np.ndarray:
    """The evaluation view: the short edge to round(size x 256/224), then the centre size x size."""
    h, w = image.shape[:2]
    short = int(round(size * EVAL_RESIZE))
    if w <= h:
        nw, nh = short, max(int(round(h * short / w)), short)
    else:
        nw, nh = max(int(round(w * short / h)), short), short
    resized = _resize(image, nw, nh)
    top, left = (nh - size) // 2, (nw - size) // 2
    return resized[top:top + size, left:left + size]


def _resize(image: np.ndarray, w: int, h: int) -> np.ndarray:
    if image.shape[1] == w and image.shape[0] == h:
        return np.ascontiguousarray(image)
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC)
