"""Instance masks through the training pipeline (the segment task): glued to drawn shapes the way
tests/test_transforms.py glues boxes to drawn rectangles. Each shape is an ellipse or a triangle of
its own colour; after mosaic, resize, crop, flip, pad (and mixup), every mask must cover the pixels
of its colour around its box, and the detection path must stay what it was."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from rtmdet.data.mosaic import MixUpParams, Sample, mixup
from rtmdet.data.pipeline import PipelineConfig, make_batch
from rtmdet.data.transforms import canvas_from_image, crop_canvas, render, render_masks, resize_canvas
from test_transforms import BACKGROUND, PALETTE, ListSource, _keys, colour_mask


def shape_sample(rng: np.random.Generator, image_id: int = 0) -> Sample:
    """80-128 px image with 2-3 apart ellipses or triangles of distinct colours, their exact masks
    and tight boxes."""
    w, h = int(rng.integers(80, 129)), int(rng.integers(80, 129))
    image = np.full((h, w, 3), BACKGROUND, np.uint8)
    colours = rng.permutation(len(PALETTE))
    masks, boxes, labels, taken = [], [], [], np.zeros((h, w), bool)
    for _ in range(60):
        if len(masks) == 3:
            break
        rw, rh = int(rng.integers(18, 45)), int(rng.integers(18, 45))
        x1, y1 = int(rng.integers(0, w - rw + 1)), int(rng.integers(0, h - rh + 1))
        if taken[max(y1 - 3, 0) : y1 + rh + 3, max(x1 - 3, 0) : x1 + rw + 3].any():
            continue
        m = np.zeros((h, w), np.uint8)
        if rng.random() < 0.5:
            cv2.ellipse(m, (x1 + rw // 2, y1 + rh // 2), (rw // 2, rh // 2), 0, 0, 360, 1, -1)
        else:
            cv2.fillPoly(m, [np.array([[x1, y1 + rh - 1], [x1 + rw - 1, y1 + rh - 1], [x1 + rw // 2, y1]], np.int32)], 1)
        m = m.astype(bool)
        lab = int(colours[len(masks)])
        image[m] = PALETTE[lab]
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        masks.append(m)
        labels.append(lab)
        taken |= m
    return Sample(image, np.array(boxes, np.float32), np.array(labels, np.int64), image_id, np.stack(masks))


def assert_masks_glued(s: Sample, tol: float = 0.05, px: int = 1) -> int:
    """Each mask lies in its box and on the pixels of its colour there, to within `px` pixels:
    under `tol` of the mask outside the colour region grown by px, under `tol` of the colour region
    shrunk by px outside the mask. Returns how many masks were compared."""
    assert s.masks is not None and s.masks.dtype == bool
    assert s.masks.shape == (len(s.boxes), *s.image.shape[:2])
    kernel = np.ones((2 * px + 1, 2 * px + 1), np.uint8)
    checked = 0
    for (x1, y1, x2, y2), lab, m in zip(s.boxes.tolist(), s.labels.tolist(), s.masks):
        ys, xs = np.nonzero(m)
        if len(xs) == 0:
            continue  # a sliver box whose shape's pixels all fell outside (a thin triangle tip)
        assert xs.min() >= x1 - 1.5 and xs.max() + 1 <= x2 + 1.5 and ys.min() >= y1 - 1.5 and ys.max() + 1 <= y2 + 1.5
        if x2 - x1 < 6 or y2 - y1 < 6:
            continue  # too small to compare colours after resampling
        win = (slice(max(int(y1) - 2, 0), int(np.ceil(y2)) + 2), slice(max(int(x1) - 2, 0), int(np.ceil(x2)) + 2))
        colour = colour_mask(s.image, lab)[win].astype(np.uint8)
        grown, shrunk = cv2.dilate(colour, kernel).astype(bool), cv2.erode(colour, kernel).astype(bool)
        mw = m[win]
        assert (mw & ~grown).sum() <= tol * mw.sum() + 1, f"mask {lab} spills off its shape"
        assert (shrunk & ~mw).sum() <= tol * shrunk.sum() + 1, f"mask {lab} misses its shape"
        checked += 1
    return checked


@pytest.fixture(scope="module")
def source() -> ListSource:
    rng = np.random.default_rng(5)
    return ListSource([shape_sample(rng, i) for i in range(10)])


def test_resize_and_crop_keep_masks_on_their_shapes(source) -> None:
    raw = source.load(0)
    canvas = canvas_from_image(raw.image, raw.boxes, raw.labels, raw.image_id, masks=raw.masks)
    for w, h, crop in [(160, 150, (20, 10, 100, 90)), (61, 47, (5, 3, 40, 40)), (128, 128, (0, 0, 128, 128))]:
        out = crop_canvas(resize_canvas(canvas, w, h), *crop)
        s = Sample(render(out), out.boxes, out.labels, 0, render_masks(out))
        assert assert_masks_glued(s) >= 2


@pytest.mark.parametrize("stage", [1, 2])
def test_pipeline_keeps_masks_on_their_shapes(source, stage) -> None:
    # HSV off so colours can be matched; mixup on its own below.
    cfg = dataclasses.replace(PipelineConfig.for_size("tiny", 64), hsv_deltas=(0, 0, 0), mixup_prob=0.0)
    checked = 0
    for start in range(0, 40, 8):
        for s in make_batch(_keys(stage, len(source), 8, start), source, cfg):
            checked += assert_masks_glued(s)
    assert checked >= 40


def test_masks_change_nothing_else(source) -> None:
    # The same keys with and without masks: the same images, boxes and labels (no extra random draws).
    bare = ListSource([dataclasses.replace(s, masks=None) for s in source.samples])
    cfg = PipelineConfig.for_size("tiny", 64)
    for stage in (1, 2):
        keys = _keys(stage, len(source), 8, 8)
        for a, b in zip(make_batch(keys, source, cfg), make_batch(keys, bare, cfg), strict=True):
            assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)
            assert np.array_equal(a.labels, b.labels) and b.masks is None and len(a.masks) == len(a.boxes)


@pytest.mark.parametrize("ratio_range, flip_ratio", [((1.0, 1.0), 0.0), ((1.0, 1.0), 1.0), ((0.5, 1.5), 0.5)])
def test_mixup_carries_the_partners_masks(source, ratio_range, flip_ratio) -> None:
    # A black sample: the blend shows the partner's pixels at half value, where its masks must be.
    # Jittered, the partner's pixels go through two bilinear resizes and the halving: their colour
    # edges blur by up to 2 px (the masks sit symmetric around them), so 2 px of slack there.
    partner = make_batch(_keys(2, len(source), 1, 3), source, PipelineConfig.for_size("tiny", 64))[0]
    black = Sample(np.zeros((64, 64, 3), np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64), 1,
                   np.zeros((0, 64, 64), bool))
    params = MixUpParams(64, ratio_range, flip_ratio)
    checked = 0
    for seed in range(6):
        out = mixup(black, partner, params, np.random.default_rng(seed))
        assert out.masks.shape == (len(out.boxes), 64, 64)
        half = Sample(np.minimum(out.image.astype(np.int16) * 2 + 1, 255).astype(np.uint8), out.boxes, out.labels, 0,
                      out.masks)
        checked += assert_masks_glued(half, px=1 if ratio_range == (1.0, 1.0) else 2)
    assert checked >= 6
