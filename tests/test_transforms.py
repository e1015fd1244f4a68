"""Training transforms: boxes stay glued to the pixels through every step and both pipelines.

The test images are flat backgrounds with filled rectangles in a few saturated colours; a
box's label is its rectangle's colour index. After a transform every box must sit on the edges
of a rectangle of its colour (within 2 px, for bilinear resampling), and every visible
rectangle must still have its box.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from rtmdet.data.loader import TrainDataset, load_record
from rtmdet.data.mosaic import MixUpParams, Sample, SampleCache, mixup, mosaic
from rtmdet.data.pipeline import PipelineConfig, SampleKey, make_batch, make_val_sample
from rtmdet.data.records import ImageRecord
from rtmdet.data.transforms import (
    apply_hsv,
    canvas_from_image,
    crop_canvas,
    hflip,
    hsv_gains,
    pad_to,
    random_crop,
    random_resize,
    render,
    resize_canvas,
)
from rtmdet.errors import ConfigError
from rtmdet.inference.preprocess import letterbox

BACKGROUND = (40, 40, 40)
# Channels in {40, 230}: a blend of any two of these (or with the background or the 114 pad)
# is never within the match threshold of a third, so edge pixels cannot fake a rectangle.
PALETTE = [(b, g, r) for b in (40, 230) for g in (40, 230) for r in (40, 230)][1:]
MATCH = 40


def colour_mask(image: np.ndarray, label: int) -> np.ndarray:
    return np.all(np.abs(image.astype(np.int16) - PALETTE[label]) <= MATCH, axis=-1)


def draw_sample(w: int, h: int, rects: list[tuple[int, int, int, int, int]], image_id: int = 0) -> Sample:
    """Flat image with filled rectangles (x1, y1, x2, y2, label); boxes are their exact extents."""
    image = np.full((h, w, 3), BACKGROUND, np.uint8)
    for x1, y1, x2, y2, lab in rects:
        image[y1:y2, x1:x2] = PALETTE[lab]
    boxes = np.array([r[:4] for r in rects], np.float32).reshape(-1, 4)
    labels = np.array([r[4] for r in rects], np.int64)
    return Sample(image, boxes, labels, image_id)


def random_sample(rng: np.random.Generator, image_id: int = 0) -> Sample:
    """80-128 px image with 2-3 non-overlapping rectangles of distinct colours."""
    w, h = int(rng.integers(80, 129)), int(rng.integers(80, 129))
    rects: list[tuple[int, int, int, int, int]] = []
    colours = rng.permutation(len(PALETTE))
    for _ in range(60):
        if len(rects) == 3:
            break
        rw, rh = int(rng.integers(16, 45)), int(rng.integers(16, 45))
        x1, y1 = int(rng.integers(0, w - rw + 1)), int(rng.integers(0, h - rh + 1))
        if all(x1 >= b[2] + 3 or b[0] >= x1 + rw + 3 or y1 >= b[3] + 3 or b[1] >= y1 + rh + 3 for b in rects):
            rects.append((x1, y1, x1 + rw, y1 + rh, int(colours[len(rects)])))
    return draw_sample(w, h, rects, image_id)


def assert_glued(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, tol: float = 2.0) -> int:
    """Every box sits on a rectangle of its colour; every visible rectangle has a box. Returns #checked."""
    h, w = image.shape[:2]
    assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 1] >= 0)
    assert np.all(boxes[:, 2] <= w) and np.all(boxes[:, 3] <= h)
    assert np.all(boxes[:, 2] - boxes[:, 0] >= 1) and np.all(boxes[:, 3] - boxes[:, 1] >= 1)
    checked = 0
    for (x1, y1, x2, y2), lab in zip(boxes.tolist(), labels.tolist()):
        if x2 - x1 < 2 * tol + 2 or y2 - y1 < 2 * tol + 2:
            continue  # too thin to tell edges apart after resampling
        mask = colour_mask(image, lab)
        inner = mask[math.ceil(y1 + tol) : math.floor(y2 - tol), math.ceil(x1 + tol) : math.floor(x2 - tol)]
        assert inner.mean() > 0.95, f"box {x1, y1, x2, y2} is not filled with colour {lab}"
        wx1, wy1 = max(math.floor(x1 - tol - 2), 0), max(math.floor(y1 - tol - 2), 0)
        wx2, wy2 = min(math.ceil(x2 + tol + 2), w), min(math.ceil(y2 + tol + 2), h)
        # Only the pixels connected to the box's inside: a same-coloured rectangle from another
        # mosaic tile may sit right next to this one.
        _, comp = cv2.connectedComponents(mask[wy1:wy2, wx1:wx2].astype(np.uint8))
        iy, ix = math.ceil(y1 + tol) - wy1, math.ceil(x1 + tol) - wx1
        inside = np.unique(comp[iy : iy + inner.shape[0], ix : ix + inner.shape[1]])
        ys, xs = np.nonzero(np.isin(comp, inside[inside > 0]))
        edges = np.array([xs.min() + wx1, ys.min() + wy1, xs.max() + 1 + wx1, ys.max() + 1 + wy1])
        assert np.abs(edges - [x1, y1, x2, y2]).max() <= tol, f"box {x1, y1, x2, y2} vs pixels {edges}"
        checked += 1
    for lab in range(len(PALETTE)):
        left = colour_mask(image, lab)
        for x1, y1, x2, y2 in boxes[labels == lab].tolist():
            left[max(math.floor(y1 - tol), 0) : math.ceil(y2 + tol), max(math.floor(x1 - tol), 0) : math.ceil(x2 + tol)] = False
        _, _, stats, _ = cv2.connectedComponentsWithStats(left.astype(np.uint8))
        big = [s for s in stats[1:] if s[cv2.CC_STAT_WIDTH] >= 3 and s[cv2.CC_STAT_HEIGHT] >= 3]
        assert not big, f"colour {lab}: a visible rectangle has no box ({big})"
    return checked


# ---------------------------------------------------------------- single transforms


def test_identity_canvas_renders_the_image():
    s = draw_sample(90, 70, [(5, 6, 40, 50, 0), (50, 10, 85, 30, 3)])
    canvas = canvas_from_image(s.image, s.boxes, s.labels)
    assert np.array_equal(render(canvas), s.image)
    assert np.array_equal(canvas.boxes, s.boxes)


@pytest.mark.parametrize("new_size", [(45, 35), (200, 155), (91, 130)])
def test_resize_keeps_boxes_on_pixels(new_size):
    s = draw_sample(90, 70, [(5, 6, 40, 50, 0), (50, 10, 85, 30, 3), (60, 40, 88, 68, 5)])
    canvas = resize_canvas(canvas_from_image(s.image, s.boxes, s.labels), *new_size)
    image = render(canvas)
    assert image.shape == (new_size[1], new_size[0], 3)
    assert assert_glued(image, canvas.boxes, canvas.labels) == 3


def test_resize_matches_cv2_resize():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    canvas = resize_canvas(canvas_from_image(image, np.zeros((0, 4)), np.zeros(0)), 150, 117)
    ref = cv2.resize(image, (150, 117), interpolation=cv2.INTER_LINEAR)
    assert np.abs(render(canvas).astype(int) - ref).max() <= 2  # fixed-point rounding only


def test_render_leaves_no_gaps_at_layer_edges():
    """Whatever the scale and crop, every pixel inside a layer's footprint comes from the image."""
    image = np.full((37, 53, 3), 7, np.uint8)
    rng = np.random.default_rng(2)
    for _ in range(200):
        canvas = canvas_from_image(image, np.zeros((0, 4)), np.zeros(0))
        canvas = random_resize(canvas, int(rng.integers(8, 300)), (0.1, 2.0), rng)
        canvas = random_crop(canvas, 48, rng, allow_negative_crop=True)
        out = render(canvas)
        (x1, y1, x2, y2) = canvas.layers[0].clip
        inside = out[math.ceil(y1 - 0.5) : math.ceil(y2 - 0.5), math.ceil(x1 - 0.5) : math.ceil(x2 - 0.5)]
        assert inside.size and (inside == 7).all() and inside.shape[:2] == out.shape[:2]


def test_random_resize_range():
    s = draw_sample(100, 50, [(5, 5, 30, 30, 0)])
    canvas = canvas_from_image(s.image, s.boxes, s.labels)
    rng = np.random.default_rng(1)
    longs = [max(random_resize(canvas, 128, (0.5, 2.0), rng).width, 1) for _ in range(200)]
    assert 64 <= min(longs) < 80 and 240 < max(longs) <= 256
    out = random_resize(canvas, 128, (1.0, 1.0), rng)
    assert (out.width, out.height) == (128, 64)  # keep ratio, long side = scale


def test_train_resize_range_replaces_the_sizes_range():
    from rtmdet.config import parse_section

    assert PipelineConfig.for_size("m", 64).ratio_range == (0.1, 2.0)
    train = parse_section("train", {"resize_range": [1, 2.5]})
    assert train.resize_range == [1.0, 2.5]
    assert PipelineConfig.for_size("m", 64, train.resize_range).ratio_range == (1.0, 2.5)
    for bad in ([2.0, 1.0], [0, 1], [1.0]):
        with pytest.raises(ConfigError, match="train.resize_range must be"):
            PipelineConfig.for_size("nano", 64, bad)
    with pytest.raises(ConfigError, match=r"train.resize_range must be list\[float\] or null, got \[1, 'a'\]"):
        parse_section("train", {"resize_range": [1, "a"]})


def test_crop_drops_outside_boxes_and_clips_the_rest():
    s = draw_sample(120, 100, [(5, 5, 30, 30, 0), (50, 40, 90, 80, 1), (100, 85, 118, 98, 2)])
    canvas = crop_canvas(canvas_from_image(s.image, s.boxes, s.labels), 40, 30, 64, 64)
    assert canvas.labels.tolist() == [1, 2]
    assert canvas.boxes.tolist() == [[10, 10, 50, 50], [60, 55, 64, 64]]
    image = render(canvas)
    assert np.array_equal(image, s.image[30:94, 40:104])
    assert_glued(image, canvas.boxes, canvas.labels)


def test_crop_drops_slivers():
    s = draw_sample(120, 100, [(5, 5, 40, 30, 0)])
    canvas = crop_canvas(canvas_from_image(s.image, s.boxes, s.labels), 39.5, 0, 64, 64)  # 0.5 px left
    assert len(canvas.boxes) == 0 and len(canvas.labels) == 0


def test_random_crop_refuses_a_crop_without_boxes():
    s = draw_sample(100, 100, [(0, 0, 30, 30, 0)])
    canvas = canvas_from_image(s.image, s.boxes, s.labels)
    results = [random_crop(canvas, 64, np.random.default_rng(i)) for i in range(30)]
    assert any(r is None for r in results) and any(r is not None for r in results)
    for r in results:
        if r is not None:
            assert len(r.boxes) == 1 and assert_glued(render(r), r.boxes, r.labels) >= 0
    empty = random_crop(canvas, 64, np.random.default_rng(1), allow_negative_crop=True)
    assert empty is not None and empty.width == 64


def test_random_crop_of_a_small_canvas_keeps_it_whole():
    s = draw_sample(50, 40, [(5, 5, 30, 30, 0)])
    out = random_crop(canvas_from_image(s.image, s.boxes, s.labels), 64, np.random.default_rng(0))
    assert (out.width, out.height) == (50, 40) and np.array_equal(render(out), s.image)


def test_flip_mirrors_boxes_with_pixels():
    s = draw_sample(90, 70, [(5, 6, 40, 50, 0), (50, 10, 85, 30, 3)])
    image, boxes = hflip(s.image, s.boxes)
    assert boxes.tolist() == [[50, 6, 85, 50], [5, 10, 40, 30]]
    assert assert_glued(image, boxes, s.labels) == 2
    again, back = hflip(image, boxes)
    assert np.array_equal(again, s.image) and np.array_equal(back, s.boxes)


def test_pad_puts_the_image_top_left():
    s = draw_sample(50, 40, [(5, 5, 30, 30, 0)])
    out = pad_to(s.image, 64)
    assert out.shape == (64, 64, 3) and np.array_equal(out[:40, :50], s.image)
    assert (out[40:] == 114).all() and (out[:, 50:] == 114).all()


def test_hsv_matches_yolox_arithmetic():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    for seed in range(8):
        gains = hsv_gains(np.random.default_rng(seed))
        assert abs(int(gains[0])) <= 5 and abs(int(gains[1])) <= 30 and abs(int(gains[2])) <= 30
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV).astype(np.int16)
        hsv[..., 0] = (hsv[..., 0] + gains[0]) % 180
        hsv[..., 1] = np.clip(hsv[..., 1] + gains[1], 0, 255)
        hsv[..., 2] = np.clip(hsv[..., 2] + gains[2], 0, 255)
        expected = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)
        if np.any(gains):
            assert np.array_equal(apply_hsv(image, gains), expected)
    assert apply_hsv(image, np.zeros(3, np.int16)) is image


def test_hsv_gains_are_switched_per_channel():
    gains = np.array([hsv_gains(np.random.default_rng(i)) for i in range(400)])
    off = (gains == 0).mean(axis=0)
    assert np.all((off > 0.35) & (off < 0.65))


def test_mosaic_keeps_boxes_on_pixels():
    rng = np.random.default_rng(5)
    for trial in range(6):
        samples = [random_sample(rng, i) for i in range(4)]
        canvas = mosaic(samples, 64, (0.5, 1.5), rng)
        assert (canvas.width, canvas.height) == (128, 128)
        image = render(canvas)
        total = sum(len(s.boxes) for s in samples)
        assert 0 < len(canvas.boxes) <= total
        assert assert_glued(image, canvas.boxes, canvas.labels) >= 1
        assert (image[0, 0] == 114).all() or (image[-1, -1] == 114).all() or len(canvas.layers) == 4


def test_mosaic_then_resize_then_crop_keeps_boxes_on_pixels():
    rng = np.random.default_rng(6)
    checked = 0
    for trial in range(12):
        canvas = mosaic([random_sample(rng, i) for i in range(4)], 64, (0.5, 1.5), rng)
        canvas = random_resize(canvas, 128, (0.5, 2.0), rng)
        canvas = random_crop(canvas, 64, rng, allow_negative_crop=True)
        checked += assert_glued(render(canvas), canvas.boxes, canvas.labels)
    assert checked >= 12


def test_sample_cache_pops_fifo_or_random_but_never_the_newest():
    rng = np.random.default_rng(0)
    fifo: SampleCache[int] = SampleCache(3, random_pop=False)
    for i in range(6):
        fifo.push(i, rng)
    assert fifo.items == [3, 4, 5]
    rand: SampleCache[int] = SampleCache(3, random_pop=True)
    for i in range(50):
        rand.push(i, rng)
        assert rand.items[-1] == i and len(rand) <= 3
    assert all(rand.older(rng) != 49 for _ in range(100))


@pytest.mark.parametrize("flip_ratio", [1.0, 0.0])  # mmdet flips when U(0, 1) > flip_ratio
def test_mixup_geometry(flip_ratio):
    main = draw_sample(64, 64, [(2, 2, 20, 20, 0)])
    partner = draw_sample(64, 64, [(30, 36, 60, 60, 1), (5, 40, 20, 62, 2)])
    params = MixUpParams(64, flip_ratio=flip_ratio)
    out = mixup(main, partner, params, np.random.default_rng(0))
    assert out.labels.tolist() == [0, 1, 2]
    expected = partner.boxes.copy()
    if flip_ratio == 0.0:
        expected[:, [0, 2]] = 64 - partner.boxes[:, [2, 0]]
    assert np.allclose(out.boxes[1:], expected) and np.allclose(out.boxes[:1], main.boxes)
    # Pixels are the 50/50 blend of the two images: each box still covers its own rectangle.
    flipped = partner.image[:, ::-1] if flip_ratio == 0.0 else partner.image
    blend = ((main.image.astype(int) + flipped) // 2).astype(np.uint8)
    assert np.array_equal(out.image, blend)
    for (x1, y1, x2, y2), lab in zip(out.boxes[1:].astype(int).tolist(), out.labels[1:].tolist()):
        assert (out.image[y1:y2, x1:x2] == (np.array(PALETTE[lab]) + 40) // 2).all()


def test_mixup_with_a_partner_without_boxes_is_a_no_op():
    main = draw_sample(64, 64, [(2, 2, 20, 20, 0)])
    partner = draw_sample(64, 64, [])
    assert mixup(main, partner, MixUpParams(64), np.random.default_rng(0)) is main


def test_mixup_rescales_a_partner_of_another_size():
    main = draw_sample(64, 64, [])
    partner = draw_sample(128, 96, [(10, 10, 50, 40, 1)])
    out = mixup(main, partner, MixUpParams(64, flip_ratio=1.0), np.random.default_rng(0))
    assert np.allclose(out.boxes, [[5, 5, 25, 20]])


# ---------------------------------------------------------------- whole pipelines


class ListSource:
    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Sample:
        return self.samples[index]


def _keys(stage: int, n: int, batch: int, start: int = 0, epoch: int = 0) -> list[SampleKey]:
    hist = tuple((start - k) % n for k in range(5, 0, -1))
    return [SampleKey(0, epoch, stage, p, p % n, hist if p == start else ()) for p in range(start, start + batch)]


@pytest.fixture(scope="module")
def source() -> ListSource:
    rng = np.random.default_rng(11)
    return ListSource([random_sample(rng, i) for i in range(10)])


@pytest.mark.parametrize("stage", [1, 2])
def test_pipeline_keeps_boxes_on_pixels(source, stage):
    # HSV off so colours can be matched (it moves no pixel); mixup is checked on its own above.
    cfg = dataclasses.replace(PipelineConfig.for_size("tiny", 64), hsv_deltas=(0, 0, 0), mixup_prob=0.0)
    checked = 0
    for start in range(0, 40, 8):
        for s in make_batch(_keys(stage, len(source), 8, start), source, cfg):
            assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
            checked += assert_glued(s.image, s.boxes, s.labels)
    assert checked >= 40


@pytest.mark.parametrize("size", ["tiny", "s", "m"])
def test_full_stage1_pipeline_outputs(source, size):
    cfg = PipelineConfig.for_size(size, 64)
    samples = make_batch(_keys(1, len(source), 12), source, cfg)
    assert len(samples) == 12
    for s in samples:
        assert s.image.shape == (64, 64, 3) and s.boxes.dtype == np.float32 and s.labels.dtype == np.int64
        assert len(s.boxes) == len(s.labels) > 0
        assert np.all(s.boxes >= 0) and np.all(s.boxes <= 64)
        assert np.all(s.boxes[:, 2:] - s.boxes[:, :2] >= 1)


def test_stage1_uses_mosaic_and_stage2_does_not(source):
    cfg = dataclasses.replace(PipelineConfig.for_size("tiny", 64), mixup_prob=0.0)
    ids = {s.image_id: s for s in source.samples}
    s1 = make_batch(_keys(1, len(source), 8), source, cfg)
    s2 = make_batch(_keys(2, len(source), 8), source, cfg)
    # A stage-2 sample only holds boxes of its own image; mosaics mix in others.
    assert all(set(s.labels.tolist()) <= set(ids[s.image_id].labels.tolist()) for s in s2)
    assert any(not set(s.labels.tolist()) <= set(ids[s.image_id].labels.tolist()) for s in s1)


def test_val_sample_is_the_letterbox(tmp_path: Path):
    s = draw_sample(100, 60, [(10, 10, 50, 40, 0)], image_id=7)
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), s.image)
    record = ImageRecord(7, path, 100, 60, s.boxes, s.labels)
    val, scale_wh = make_val_sample(load_record(record), 64)
    canvas, info = letterbox(s.image, 64)
    assert np.array_equal(val.image, canvas) and scale_wh == info.scale_wh
    sx, sy = info.scale_wh
    assert np.allclose(val.boxes, [[10 * sx, 10 * sy, 50 * sx, 40 * sy]])
    assert_glued(val.image, val.boxes, val.labels)


def test_recipe_per_size():
    tiny = PipelineConfig.for_size("tiny", 320)
    assert (tiny.mosaic_max_cached, tiny.mosaic_random_pop, tiny.mixup_max_cached) == (20, False, 10)
    assert (tiny.mixup_random_pop, tiny.mixup_prob, tiny.ratio_range) == (False, 0.5, (0.5, 2.0))
    assert PipelineConfig.for_size("nano", 192).mosaic_max_cached == 20
    s, m = PipelineConfig.for_size("s", 640), PipelineConfig.for_size("x", 640)
    assert (s.mosaic_max_cached, s.mosaic_random_pop, s.mixup_max_cached, s.mixup_prob) == (40, True, 20, 1.0)
    assert s.ratio_range == (0.5, 2.0) and m.ratio_range == (0.1, 2.0)
    with pytest.raises(ConfigError, match="huge"):
        PipelineConfig.for_size("huge", 640)


def test_train_dataset_filters_empty_and_tiny_images(tmp_path: Path):
    s = draw_sample(64, 64, [(2, 2, 20, 20, 0)])
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), s.image)
    records = [
        ImageRecord(0, path, 64, 64, s.boxes, s.labels),
        ImageRecord(1, path, 64, 64, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)),
        ImageRecord(2, path, 20, 64, s.boxes, s.labels),
    ]
    ds = TrainDataset(records, PipelineConfig.for_size("tiny", 64))
    assert [r.image_id for r in ds.records] == [0]
    assert len(TrainDataset(records, PipelineConfig.for_size("tiny", 64), filter_empty=False)) == 2
