"""RTMDet's cached Mosaic and cached MixUp (mmdet CachedMosaic / CachedMixUp semantics).

Both keep a small cache of recent samples and draw their partners from it instead of loading
extra images: that is what makes them cheap. Differences from mmdetection, all deliberate:
- The mosaic is a lazy `Canvas` (see transforms.py); nothing is drawn until the final crop.
- The caches live for one batch (see pipeline.py), which keeps a batch a pure function of the
  seed, the epoch and its position, whatever the number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

import cv2
import numpy as np

from rtmdet.data.transforms import Canvas, Layer, clip_boxes, clip_targets
from rtmdet.inference.preprocess import PAD_VALUE

T = TypeVar("T")


@dataclass(frozen=True)
class Sample:
    """A decoded image with its targets (xyxy float32 boxes, int64 labels, and for the segment
    task one bool mask [H, W] per box). Treated as immutable."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    image_id: int
    masks: np.ndarray | None = None  # [K, H, W] bool


@dataclass
class SampleCache(Generic[T]):
    """mmdet's result cache: append, and past max_size pop the oldest or a random older entry."""

    max_size: int
    random_pop: bool
    items: list[T] = field(default_factory=list)

    def push(self, item: T, rng: np.random.Generator) -> None:
        """Append item; evict one entry other than the newest when the cache is over size."""
        self.items.append(item)
        if len(self.items) > self.max_size:
            # numpy's randint(0, len - 1) in mmdet excludes the entry just appended.
            index = int(rng.integers(0, len(self.items) - 1)) if self.random_pop else 0
            self.items.pop(index)

    def older(self, rng: np.random.Generator) -> T:
        """A random entry other than the newest (mmdet never pairs an image with itself)."""
        return self.items[int(rng.integers(0, len(self.items) - 1))]

    def __len__(self) -> int:
        return len(self.items)


def _mosaic_quadrant(
    loc: int, cx: int, cy: int, w: int, h: int, limit_w: int, limit_h: int
) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """Paste rectangle on the 2S canvas and the sub-image's offset, for quadrant loc (TL, TR, BL, BR).

    The sub-image (w x h) touches the mosaic centre with its inner corner; what falls outside
    the canvas is cut, as in mmdet's Mosaic._mosaic_combine.
    """
    left = loc in (0, 2)
    top = loc in (0, 1)
    x1, x2 = (max(cx - w, 0), cx) if left else (cx, min(cx + w, limit_w))
    y1, y2 = (max(cy - h, 0), cy) if top else (cy, min(cy + h, limit_h))
    off_x = cx - w if left else cx
    off_y = cy - h if top else cy
    return (x1, y1, x2, y2), (off_x, off_y)


def mosaic(
    samples: list[Sample],
    img_scale: int,
    center_ratio_range: tuple[float, float],
    rng: np.random.Generator,
    fill: int = PAD_VALUE,
) -> Canvas:
    """Four samples around a random centre of a 2S x 2S canvas (top-left is samples[0])."""
    size = 2 * img_scale
    lo, hi = center_ratio_range
    cx = int(rng.uniform(lo, hi) * img_scale)
    cy = int(rng.uniform(lo, hi) * img_scale)
    layers, all_boxes, all_labels, all_instances = [], [], [], []
    with_masks = samples[0].masks is not None
    for loc, s in enumerate(samples[:4]):
        h0, w0 = s.image.shape[:2]
        ratio = min(img_scale / h0, img_scale / w0)
        w, h = max(int(w0 * ratio), 1), max(int(h0 * ratio), 1)
        sx, sy = w / w0, h / h0  # the scale the pixels really get, so boxes stay on them
        clip, (ox, oy) = _mosaic_quadrant(loc, cx, cy, w, h, size, size)
        if clip[2] <= clip[0] or clip[3] <= clip[1]:
            continue
        layers.append(Layer(s.image, (sx, sy), (float(ox), float(oy)), tuple(float(v) for v in clip), s.masks))
        if len(s.boxes):
            all_boxes.append(s.boxes * np.array([sx, sy, sx, sy], np.float32) + np.array([ox, oy, ox, oy], np.float32))
            all_labels.append(s.labels)
            if with_masks:
                k = len(s.boxes)
                all_instances.append(np.stack([np.full(k, len(layers) - 1, np.int64), np.arange(k)], axis=1))
    boxes = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4), np.float32)
    labels = np.concatenate(all_labels) if all_labels else np.zeros((0,), np.int64)
    instances = None
    if with_masks:
        instances = np.concatenate(all_instances) if all_instances else np.zeros((0, 2), np.int64)
    boxes, labels, instances = clip_targets(boxes, labels, instances, size, size)
    return Canvas(size, size, tuple(layers), boxes, labels, samples[0].image_id, fill, instances)


@dataclass(frozen=True)
class MixUpParams:
    """CachedMixUp settings (mmdet defaults; RTMDet sets ratio_range=(1, 1))."""

    img_scale: int
    ratio_range: tuple[float, float] = (1.0, 1.0)
    flip_ratio: float = 0.5
    max_iters: int = 15
    pad_value: int = PAD_VALUE


def pick_mixup_partner(cache: SampleCache[Sample], rng: np.random.Generator, max_iters: int) -> Sample:
    """An older cache entry, retrying up to max_iters times for one that has boxes."""
    partner = cache.older(rng)
    for _ in range(max_iters - 1):
        if len(partner.boxes):
            break
        partner = cache.older(rng)
    return partner


def mixup(sample: Sample, partner: Sample, params: MixUpParams, rng: np.random.Generator) -> Sample:
    """Blend partner (fit into img_scale, jittered, maybe flipped, cropped) 50/50 onto sample."""
    if len(partner.boxes) == 0:
        return sample
    jit = rng.uniform(*params.ratio_range)
    flip = rng.uniform(0, 1) > params.flip_ratio
    s = params.img_scale
    ph, pw = partner.image.shape[:2]
    ratio = min(s / ph, s / pw)
    masks = partner.masks
    if ratio == 1.0 and jit == 1.0 and (ph, pw) == (s, s):
        out = partner.image  # the RTMDet case: the partner is already an S x S training sample
    else:
        masks = None if masks is None else _fit_masks(masks, s, ratio, jit)
        out = np.full((s, s, 3), params.pad_value, np.uint8)
        rw, rh = max(int(pw * ratio), 1), max(int(ph * ratio), 1)
        out[:rh, :rw] = cv2.resize(partner.image, (rw, rh), interpolation=cv2.INTER_LINEAR)
        out = cv2.resize(out, (max(int(s * jit), 1), max(int(s * jit), 1)), interpolation=cv2.INTER_LINEAR)
    ratio *= jit
    oh, ow = out.shape[:2]
    rows = np.arange(len(partner.boxes))
    boxes, rows = clip_boxes(partner.boxes * np.float32(ratio), rows, ow, oh)
    labels = partner.labels[rows]
    masks = None if masks is None else masks[rows]
    if flip:
        out = cv2.flip(out, 1)
        boxes = np.stack([ow - boxes[:, 2], boxes[:, 1], ow - boxes[:, 0], boxes[:, 3]], axis=1)
        masks = None if masks is None else masks[:, :, ::-1]
    th, tw = sample.image.shape[:2]
    if (oh, ow) == (th, tw):
        patch, x_off, y_off = out, 0, 0
    else:  # a jittered partner: pad with zeros to cover the sample, then a random window
        padded = np.zeros((max(oh, th), max(ow, tw), 3), np.uint8)
        padded[:oh, :ow] = out
        y_off = int(rng.integers(0, padded.shape[0] - th)) if padded.shape[0] > th else 0
        x_off = int(rng.integers(0, padded.shape[1] - tw)) if padded.shape[1] > tw else 0
        patch = padded[y_off : y_off + th, x_off : x_off + tw]
    boxes = boxes - np.array([x_off, y_off, x_off, y_off], np.float32)
    rows = np.arange(len(boxes))
    boxes, rows = clip_boxes(boxes, rows, tw, th)
    labels = labels[rows]
    if masks is not None:
        window = np.zeros((len(masks), max(oh, th), max(ow, tw)), bool)
        window[:, :oh, :ow] = masks
        masks = window[rows, y_off : y_off + th, x_off : x_off + tw]
    # mmdet's blend uint8(0.5 * a + 0.5 * b) == floor((a + b) / 2) == (a & b) + ((a ^ b) >> 1),
    # which stays in uint8 (15x faster than going through float).
    a = sample.image
    blended = (a & patch) + ((a ^ patch) >> 1)
    return Sample(
        blended,
        np.concatenate([sample.boxes, boxes]).astype(np.float32),
        np.concatenate([sample.labels, labels]).astype(np.int64),
        sample.image_id,
        None if sample.masks is None else np.concatenate([sample.masks, masks]),
    )


def _fit_masks(masks: np.ndarray, s: int, ratio: float, jit: float) -> np.ndarray:
    """A partner's masks through mixup's own two resizes of its image: fit into s x s from the
    top-left by `ratio`, then the whole s x s square scaled by `jit`."""
    h, w = masks.shape[1:]
    rw, rh, side = max(int(w * ratio), 1), max(int(h * ratio), 1), max(int(s * jit), 1)
    out = np.zeros((len(masks), side, side), bool)
    for k, m in enumerate(masks):
        square = np.zeros((s, s), np.uint8)
        square[:rh, :rw] = cv2.resize(m.view(np.uint8) * np.uint8(255), (rw, rh), interpolation=cv2.INTER_LINEAR)
        out[k] = cv2.resize(square, (side, side), interpolation=cv2.INTER_LINEAR) >= 128
    return out
