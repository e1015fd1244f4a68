"""Training and validation samples for rotated boxes (RTMDet-R on DOTA-layout data).

The train pipeline follows MMRotate 1.x's configs/rotated_rtmdet/_base_/dota_rr.py:
    Resize(S, keep_ratio) -> RandomFlip(0.75; horizontal, vertical, diagonal)
    -> RandomRotate(0.5, angle_range 180, rect_obj_labels) -> Pad(S x S, 114)
plus an optional resize ratio (rotated_rtmdet_l-100e-aug-dota.py's RandomResize draws it from
(0.1, 2.0); dota_rr.py has none, hence the default (1, 1)) and a filter of boxes that end up
smaller than min_size px. Validation is the one inference pre-process, letterbox.

Determinism: sample(epoch, index) draws only from a Generator seeded with (seed, epoch, index).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from rtmdet.data.dota import RotatedRecord
from rtmdet.data.pipeline import SampleKey
from rtmdet.data.rotated_transforms import FLIP_DIRECTIONS, flip_rotated, norm_le90, random_rotate
from rtmdet.errors import ConfigError, DataError
from rtmdet.imageio import read_image
from rtmdet.inference.preprocess import PAD_VALUE, letterbox

log = logging.getLogger(__name__)

Sample = tuple[np.ndarray, np.ndarray, np.ndarray]  # image SxSx3 uint8, rboxes [N, 5] f32, labels [N] i64


@dataclass(frozen=True)
class RotatedPipelineConfig:
    """Settings of the rotated train pipeline at training size imgsz (defaults: dota_rr.py's)."""

    imgsz: int
    flip_prob: float = 0.75
    flip_directions: tuple[str, ...] = FLIP_DIRECTIONS
    rotate_prob: float = 0.5
    angle_range: float = 180.0
    rect_classes: tuple[int, ...] = ()
    ratio_range: tuple[float, float] = (1.0, 1.0)
    min_size: float = 2.0
    pad_value: int = PAD_VALUE
    rect_angles: tuple[float, ...] = field(default=(90.0, 180.0, -90.0))

    def __post_init__(self) -> None:
        if self.imgsz <= 0:
            raise ConfigError(f"rotated pipeline: imgsz must be positive, got {self.imgsz}")
        low, high = self.ratio_range
        if not 0 < low <= high:
            raise ConfigError(f"rotated pipeline: ratio_range must be (low, high) with 0 < low <= high, "
                              f"got {self.ratio_range}")
        bad = [d for d in self.flip_directions if d not in FLIP_DIRECTIONS]
        if bad or not self.flip_directions:
            raise ConfigError(f"rotated pipeline: flip_directions must be among {FLIP_DIRECTIONS}, "
                              f"got {self.flip_directions}")


def scale_rboxes(rboxes: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Boxes under the map (x, y) -> (sx x, sy y): centres scaled, each side by the length of its
    scaled axis, the angle that of the scaled width axis (exact when sx == sy; keep-ratio resizes
    differ by a rounding only). float32 [N, 5], angles le90."""
    boxes = np.asarray(rboxes, np.float64).reshape(-1, 5).copy()
    cos, sin = np.cos(boxes[:, 4]), np.sin(boxes[:, 4])
    boxes[:, 0] *= sx
    boxes[:, 1] *= sy
    boxes[:, 2] *= np.hypot(sx * cos, sy * sin)
    boxes[:, 3] *= np.hypot(sx * sin, sy * cos)
    boxes[:, 4] = np.arctan2(sy * sin, sx * cos)
    return norm_le90(boxes)


def _resize(image: np.ndarray, rboxes: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep-ratio resize as letterbox does it (sizes rounded, cv2 bilinear to that size)."""
    h, w = image.shape[:2]
    new_w, new_h = max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))
    if (new_w, new_h) != (w, h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return image, scale_rboxes(rboxes, new_w / w, new_h / h)


def _place(image: np.ndarray, rboxes: np.ndarray, labels: np.ndarray, cfg: RotatedPipelineConfig,
           rng: np.random.Generator) -> Sample:
    """Pad to S x S top-left with pad_value; a larger image is cropped at a random offset and the
    boxes whose centre leaves the canvas are dropped."""
    s = cfg.imgsz
    h, w = image.shape[:2]
    # Draw both offsets always, so the draws that follow never depend on the image size.
    ox = int(rng.integers(0, max(w - s, 0) + 1))
    oy = int(rng.integers(0, max(h - s, 0) + 1))
    canvas = np.full((s, s, 3), cfg.pad_value, np.uint8)
    part = image[oy:oy + s, ox:ox + s]
    canvas[:part.shape[0], :part.shape[1]] = part
    boxes = rboxes.copy()
    boxes[:, 0] -= ox
    boxes[:, 1] -= oy
    inside = (boxes[:, 0] >= 0) & (boxes[:, 0] < part.shape[1]) & (boxes[:, 1] >= 0) & (boxes[:, 1] < part.shape[0])
    return canvas, boxes[inside], labels[inside]


def rotated_train_sample(image: np.ndarray, rboxes: np.ndarray, labels: np.ndarray, cfg: RotatedPipelineConfig,
                         rng: np.random.Generator, dropped: Counter | None = None) -> Sample:
    """Resize (long side imgsz x a ratio drawn from ratio_range), flip, rotate, pad/crop to S x S,
    then drop boxes under min_size px; counts dropped boxes per reason into `dropped`."""
    boxes = np.asarray(rboxes, np.float32).reshape(-1, 5)
    labels = np.asarray(labels, np.int64).reshape(-1)
    n_in = len(labels)
    h, w = image.shape[:2]
    ratio = float(rng.uniform(*cfg.ratio_range))
    image, boxes = _resize(image, boxes, cfg.imgsz * ratio / max(h, w))
    if rng.random() < cfg.flip_prob:
        direction = cfg.flip_directions[int(rng.integers(len(cfg.flip_directions)))]
        image, boxes = flip_rotated(image, boxes, direction)
    image, boxes, labels = random_rotate(image, boxes, labels, rng, cfg.rotate_prob, cfg.angle_range,
                                         cfg.rect_classes, cfg.rect_angles)
    image, boxes, labels = _place(image, np.asarray(boxes, np.float32).reshape(-1, 5), labels, cfg, rng)
    big = np.minimum(boxes[:, 2], boxes[:, 3]) >= cfg.min_size
    if dropped is not None:
        dropped["outside"] += n_in - len(labels)
        dropped["too_small"] += int((~big).sum())
    return np.ascontiguousarray(image), norm_le90(boxes[big]), labels[big]


def rotated_val_sample(image: np.ndarray, rboxes: np.ndarray, labels: np.ndarray,
                       imgsz: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    """The letterbox canvas, the boxes in canvas pixels, the labels and scale_wh (box / scale_wh
    maps a canvas box back to the original image)."""
    canvas, info = letterbox(image, imgsz)
    sx, sy = info.scale_wh
    boxes = scale_rboxes(rboxes, sx, sy)
    return canvas, boxes, np.asarray(labels, np.int64).reshape(-1), (sx, sy)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The only source of randomness of one training sample."""
    seq = np.random.SeedSequence([seed, epoch, index], spawn_key=(20,))
    return np.random.Generator(np.random.PCG64(seq))


class RotatedTrainDataset:
    """Rotated training samples of DOTA records: sample(epoch, index) is deterministic.

    The trainer's loader indexes it with the batch sampler's SampleKeys (keyed, as TrainDataset):
    a key's sample draws from (key.seed, key.epoch, key.position). With filter_empty (mmrotate's
    filter_empty_gt) images without boxes are left out, counted in the log. `dropped` counts boxes
    dropped per reason ("outside", "too_small") in this process.
    """

    keyed = True  # build_dataloader gives it a TrainBatchSampler

    def __init__(self, records: Sequence[RotatedRecord], cfg: RotatedPipelineConfig, seed: int = 0,
                 filter_empty: bool = False):
        records = list(records)
        if filter_empty:
            kept = [r for r in records if len(r.labels)]
            if len(kept) < len(records):
                log.info("training uses %d of %d images (%d without boxes left out)", len(kept), len(records),
                         len(records) - len(kept))
            records = kept
        if not records:
            raise DataError("training split: no image with boxes to train on")
        self.records, self.cfg, self.seed = records, cfg, seed
        self.dropped: Counter = Counter()

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The record's image (BGR uint8) with its rboxes and labels."""
        record = self.records[index]
        image = read_image(record.file)
        if image.shape[:2] != (record.height, record.width):
            raise DataError(f"{record.file}: image is {image.shape[1]}x{image.shape[0]}, its record says "
                            f"{record.width}x{record.height}")
        return image, record.rboxes, record.labels

    def sample(self, epoch: int, index: int) -> Sample:
        """The training sample of record index at epoch."""
        image, rboxes, labels = self.load(index)
        rng = sample_rng(self.seed, epoch, index)
        return rotated_train_sample(image, rboxes, labels, self.cfg, rng, self.dropped)

    def __getitem__(self, key: SampleKey | tuple[int, int]) -> Sample:
        if isinstance(key, SampleKey):
            image, rboxes, labels = self.load(key.index)
            rng = sample_rng(key.seed, key.epoch, key.position)
            return rotated_train_sample(image, rboxes, labels, self.cfg, rng, self.dropped)
        epoch, index = key
        return self.sample(epoch, index)

    def __getitems__(self, keys: Sequence[SampleKey]) -> list[Sample]:
        return [self[k] for k in keys]


def collate_rotated(samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Stack images [B, 3, S, S] uint8; pad rboxes [B, M, 5] with 0, labels [B, M] with -1, and a
    valid mask [B, M] (M: the most boxes of one sample, at least 1)."""
    b = len(samples)
    m = max([1] + [len(s[2]) for s in samples])
    rboxes = torch.zeros((b, m, 5), dtype=torch.float32)
    labels = torch.full((b, m), -1, dtype=torch.int64)
    for i, (_, boxes, labs) in enumerate(samples):
        k = len(labs)
        rboxes[i, :k] = torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 5))
        labels[i, :k] = torch.from_numpy(np.asarray(labs, np.int64))
    images = torch.from_numpy(np.stack([s[0] for s in samples])).permute(0, 3, 1, 2).contiguous()
    return {"images": images, "rboxes": rboxes, "labels": labels, "valid": labels >= 0}

