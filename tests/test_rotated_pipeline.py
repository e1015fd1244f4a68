"""Rotated train/val samples: boxes stay on their drawn rectangles, samples are deterministic.

The images are grey with filled rotated rectangles of distinct saturated colours (a box's label
is its colour's index), all within the image's inscribed circle so no rotation cuts them. After
the pipeline, each box shrunk by 2 px must be its colour and its colour must not show outside
the box grown by 2 px: a box moved, turned or sized wrongly, or with the wrong label, fails.
"""

from __future__ import annotations

import math
from collections import Counter

import cv2
import numpy as np
import pytest
import torch

from rtmdet.data.dota import RotatedRecord
from rtmdet.data.rotated_pipeline import (
    RotatedPipelineConfig,
    RotatedTrainDataset,
    collate_rotated,
    rotated_train_sample,
    rotated_val_sample,
)
from rtmdet.data.rotated_transforms import norm_le90, rbox_corners
from rtmdet.inference.preprocess import letterbox

GREY = (114, 114, 114)
PALETTE = [(b, g, r) for b in (40, 230) for g in (40, 230) for r in (40, 230)][1:]
MATCH = 40
W, H = 151, 89
BOXES = np.array([
    [62, 28, 22, 10, 0.35],
    [95, 40, 22, 14, -1.0],
    [70, 64, 26, 12, -0.2],
    [44, 48, 14, 12, 0.0],  # axis-aligned: the "rect" class of the rect_classes test
], np.float32)
LABELS = np.arange(len(BOXES), dtype=np.int64)
HALF_PI = np.float32(math.pi / 2)


def draw(boxes: np.ndarray, labels: np.ndarray, w: int, h: int) -> np.ndarray:
    image = np.full((h, w, 3), GREY, np.uint8)
    for corners, lab in zip(rbox_corners(boxes), labels):
        points = np.round((corners - 0.5) * 16).astype(np.int32)  # fillPoly: pixel centres at integers
        cv2.fillPoly(image, [points], PALETTE[lab], lineType=cv2.LINE_8, shift=4)
    return image


def transposed(boxes: np.ndarray) -> np.ndarray:
    """The boxes of the transposed image (x <-> y): the width axis (cos a, sin a) becomes angle pi/2 - a."""
    out = boxes[:, [1, 0, 2, 3, 4]].astype(np.float64)
    out[:, 4] = math.pi / 2 - out[:, 4]
    return norm_le90(out)


IMAGES = [(draw(BOXES, LABELS, W, H), BOXES), (draw(transposed(BOXES), LABELS, H, W), transposed(BOXES))]


def box_mask(box: np.ndarray, w: int, h: int, grow: float) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx, cy, bw, bh, a = np.asarray(box, np.float64)
    du = (xs - cx) * math.cos(a) + (ys - cy) * math.sin(a)
    dv = -(xs - cx) * math.sin(a) + (ys - cy) * math.cos(a)
    return (np.abs(du) <= bw / 2 + grow) & (np.abs(dv) <= bh / 2 + grow)


def assert_glued(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, tol: float = 0.03) -> None:
    h, w = image.shape[:2]
    assert len(boxes) == len(labels)
    for box, lab in zip(boxes, labels):
        colour = np.all(np.abs(image.astype(np.int16) - PALETTE[lab]) <= MATCH, axis=-1)
        inner, outer = box_mask(box, w, h, -2.0), box_mask(box, w, h, 2.0)
        n = int(inner.sum())
        corners = rbox_corners(box[None])[0]
        cut = corners.min() < 0 or corners[:, 0].max() > w or corners[:, 1].max() > h
        if cut and n < 10:  # a box the crop mostly cut off: too few pixels to judge
            continue
        assert n >= 10, f"label {lab}: only {n} pixels inside"
        wrong = n - int(colour[inner].sum())
        assert wrong <= tol * n, f"label {lab}: {wrong} of {n} pixels inside are not its colour"
        stray = int((colour & ~outer).sum())
        assert stray <= tol * n, f"label {lab}: {stray} pixels of its colour lie outside the box"


def assert_le90(boxes: np.ndarray) -> None:
    assert boxes.dtype == np.float32
    assert np.all(boxes[:, 4] >= -HALF_PI) and np.all(boxes[:, 4] < HALF_PI)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[RotatedRecord]:
    folder = tmp_path_factory.mktemp("rot")
    out = []
    for i, (image, boxes) in enumerate(IMAGES):
        path = folder / f"img{i}.png"
        cv2.imwrite(str(path), image)
        h, w = image.shape[:2]
        out.append(RotatedRecord(i, path, w, h, boxes.copy(), LABELS.copy(), np.zeros(len(LABELS), bool)))
    return out


def test_fixture_boxes_are_drawn_apart():
    for image, boxes in IMAGES:
        assert_glued(image, boxes, LABELS, tol=0.0)
        h, w = image.shape[:2]
        grown = np.stack([box_mask(b, w, h, 2.0) for b in boxes])
        assert grown.sum(0).max() == 1  # 4 px apart at least
        r = np.hypot(boxes[:, 0] - w / 2, boxes[:, 1] - h / 2) + np.hypot(boxes[:, 2], boxes[:, 3]) / 2
        assert r.max() < min(w, h) / 2 - 1  # inside the inscribed circle: rotations never cut them


@pytest.mark.parametrize("ratio_range", [(1.0, 1.0), (0.75, 1.5)])
def test_train_boxes_stay_on_their_shapes(records, ratio_range):
    cfg = RotatedPipelineConfig(imgsz=160, ratio_range=ratio_range)
    seen_flips, turned = set(), 0
    for seed in range(3):
        ds = RotatedTrainDataset(records, cfg, seed)
        for epoch in range(6):
            for index in range(len(ds)):
                image, boxes, labels = ds.sample(epoch, index)
                assert image.shape == (160, 160, 3) and image.dtype == np.uint8
                assert labels.dtype == np.int64 and boxes.shape == (len(labels), 5)
                assert_le90(boxes)
                assert len(set(labels.tolist())) == len(labels)
                if ratio_range == (1.0, 1.0):  # no crop, shapes inside the circle: all boxes survive
                    assert sorted(labels.tolist()) == LABELS.tolist()
                assert_glued(image, boxes, labels)
                # Angle change of box 0 (mod pi) tells the flips and turns apart.
                k = np.flatnonzero(labels == 0)
                if len(k):
                    delta = (boxes[k[0], 4] - records[index].rboxes[0, 4]) % math.pi
                    seen_flips.add(round(float(delta), 3))
                    turned += not np.isclose(delta, 0, atol=1e-3) and not np.isclose(delta, math.pi, atol=1e-3)
    assert turned > 10 and len(seen_flips) > 10  # the augmentations did run


def test_same_key_same_sample_in_any_order(records):
    cfg = RotatedPipelineConfig(imgsz=128, ratio_range=(0.75, 1.5))
    a = RotatedTrainDataset(records, cfg, seed=7)
    first = [a.sample(2, 1), a.sample(0, 0), a.sample(5, 1)]
    b = RotatedTrainDataset(records, cfg, seed=7)
    again = [b.sample(5, 1), b[(0, 0)], b.sample(2, 1)][::-1]
    for x, y in zip(first, again):
        for u, v in zip(x, y):
            assert np.array_equal(u, v)
    for index in range(2):
        for epoch in range(3):
            s0, s1 = a.sample(epoch, index), a.sample(epoch + 1, index)
            assert s0[0].shape != s1[0].shape or not np.array_equal(s0[0], s1[0])
    other_seed = RotatedTrainDataset(records, cfg, seed=8).sample(2, 1)
    assert not np.array_equal(other_seed[0], first[0][0])


@pytest.mark.parametrize("imgsz", [128, 160, 97])
def test_no_augmentation_is_the_letterbox(imgsz):
    cfg = RotatedPipelineConfig(imgsz=imgsz, flip_prob=0.0, rotate_prob=0.0)
    for image, boxes in IMAGES:
        out, out_boxes, out_labels = rotated_train_sample(image, boxes, LABELS, cfg, np.random.default_rng(0))
        canvas, info = letterbox(image, imgsz)
        assert np.array_equal(out, canvas)
        val_canvas, val_boxes, val_labels, scale = rotated_val_sample(image, boxes, LABELS, imgsz)
        assert np.array_equal(out_labels, LABELS) and np.allclose(out_boxes, val_boxes, atol=1e-4)


def test_rect_classes_turn_by_right_angles_only(records):
    image, boxes = IMAGES[0]
    on = RotatedPipelineConfig(imgsz=160, flip_prob=0.0, rotate_prob=1.0, rect_classes=(3,))
    off = RotatedPipelineConfig(imgsz=160, flip_prob=0.0, rotate_prob=1.0)
    still = RotatedPipelineConfig(imgsz=160, flip_prob=0.0, rotate_prob=0.0)
    _, resized, _ = rotated_train_sample(image, boxes, LABELS, still, np.random.default_rng(0))
    free = []
    for seed in range(12):
        out_image, out, labels = rotated_train_sample(image, boxes, LABELS, on, np.random.default_rng(seed))
        assert_glued(out_image, out, labels)
        k = int(np.flatnonzero(labels == 3)[0])
        assert np.isclose(out[k, 4], 0, atol=1e-4) or np.isclose(out[k, 4], -HALF_PI, atol=1e-4)
        # Every box turned by a right angle (from its angle after the resize, which is anisotropic by a rounding).
        delta = (out[:, 4] - resized[labels, 4]) % (math.pi / 2)
        assert np.all(np.minimum(delta, math.pi / 2 - delta) < 1e-4)
        _, out_off, labels_off = rotated_train_sample(image, boxes, LABELS, off, np.random.default_rng(seed))
        free.append(out_off[labels_off == 3, 4][0])
    free = np.array(free)
    assert np.sum(np.minimum(np.abs(free), np.abs(free + HALF_PI)) > 0.05) >= 8  # without it: any angle


def test_val_sample_is_the_letterbox_with_scaled_boxes():
    for imgsz in (128, 200):
        for image, boxes in IMAGES:
            canvas, out, labels, (sx, sy) = rotated_val_sample(image, boxes, LABELS, imgsz)
            ref, info = letterbox(image, imgsz)
            assert np.array_equal(canvas, ref) and (sx, sy) == info.scale_wh
            assert np.array_equal(labels, LABELS)
            s = imgsz / max(image.shape[:2])
            assert abs(sx - s) < 0.01 and abs(sy - s) < 0.01
            assert np.allclose(out[:, 0], boxes[:, 0] * sx, atol=1e-3)
            assert np.allclose(out[:, 1], boxes[:, 1] * sy, atol=1e-3)
            assert np.allclose(out[:, 2:4], boxes[:, 2:4] * s, rtol=0.01)
            turn = (out[:, 4] - boxes[:, 4]) % math.pi  # the same rectangle at angle a and a - pi
            assert np.all(np.minimum(turn, math.pi - turn) < 0.01)
            assert_glued(canvas, out, labels)


def test_collate_pads_boxes_and_labels():
    rng = np.random.default_rng(0)
    samples = []
    for n in (2, 0, 4):
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        samples.append((image, rng.uniform(1, 30, (n, 5)).astype(np.float32), np.arange(n, dtype=np.int64) + 1))
    batch = collate_rotated(samples)
    assert batch["images"].shape == (3, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["rboxes"].shape == (3, 4, 5) and batch["labels"].shape == (3, 4) and batch["valid"].shape == (3, 4)
    for i, (image, boxes, labels) in enumerate(samples):
        n = len(labels)
        assert torch.equal(batch["images"][i], torch.from_numpy(image).permute(2, 0, 1))
        assert torch.equal(batch["rboxes"][i, :n], torch.from_numpy(boxes))
        assert torch.equal(batch["labels"][i, :n], torch.from_numpy(labels))
        assert torch.all(batch["labels"][i, n:] == -1) and torch.all(batch["rboxes"][i, n:] == 0)
        assert batch["valid"][i].tolist() == [True] * n + [False] * (4 - n)
    empty = collate_rotated([samples[1], samples[1]])
    assert empty["rboxes"].shape == (2, 1, 5) and not empty["valid"].any()
    assert torch.all(empty["labels"] == -1)


def test_boxes_below_min_size_are_dropped_with_their_labels():
    boxes = np.array([[30, 30, 3, 3, 0.3], [80, 40, 8, 6, -0.4], [110, 60, 3.6, 30, 0.2]], np.float32)
    labels = np.array([5, 1, 4], np.int64)
    image = np.full((H, W, 3), GREY, np.uint8)
    cfg = RotatedPipelineConfig(imgsz=75, flip_prob=0.0, rotate_prob=0.0, min_size=2.0)  # scale ~0.5
    dropped: Counter = Counter()
    _, out, out_labels = rotated_train_sample(image, boxes, labels, cfg, np.random.default_rng(0), dropped)
    assert out_labels.tolist() == [1]
    assert np.allclose(out[0, 2:4], boxes[1, 2:4] * 75 / W, rtol=0.02)
    assert dropped["too_small"] == 2 and dropped["outside"] == 0
    _, out, out_labels = rotated_train_sample(image, boxes, labels, cfg.__class__(imgsz=150, min_size=2.0,
                                              flip_prob=0.0, rotate_prob=0.0), np.random.default_rng(0))
    assert out_labels.tolist() == [5, 1, 4]  # at about scale 1 all are big enough
