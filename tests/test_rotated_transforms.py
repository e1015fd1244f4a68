"""Rotated-box transforms: boxes stay glued to the pixels through flips, rotations and resize.

The test image is a grey canvas with filled rotated rectangles of distinct saturated colours,
drawn from their boxes; a box's label is its colour's index. After a transform, the pixels of
each box shrunk by 2 px must be its colour, and its colour must not show outside the box grown
by 2 px (bilinear resampling blurs about a pixel), so a box that is turned the wrong way, moved,
or too big or too small fails.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from rtmdet.data.rotated_transforms import (
    flip_rotated,
    norm_le90,
    random_rotate,
    rbox_corners,
    resize_rotated,
    rotate_rotated,
)
from rtmdet.geometry.rotated import rbox_to_corners
from rtmdet.inference.preprocess import PAD_VALUE

shapely = pytest.importorskip("shapely")
from shapely.geometry import Polygon  # noqa: E402

GREY = (114, 114, 114)
# Channels in {40, 230}: a blend of one with the grey (or of two) is never within MATCH of a third.
PALETTE = [(b, g, r) for b in (40, 230) for g in (40, 230) for r in (40, 230)][1:]
MATCH = 40
W, H = 128, 96  # not square, so a mix-up of width and height shows
# Elongated boxes at assorted angles (one at 0, one near -pi/2), all within 36 px of the centre.
BOXES = np.array([
    [38, 30, 34, 12, 0.35],
    [93, 33, 28, 14, -1.0],
    [50, 72, 40, 10, -0.2],
    [91, 71, 24, 15, 1.2],
    [66, 48, 22, 9, 0.0],
    [20, 60, 26, 8, -1.5],
], np.float32)
LABELS = np.arange(len(BOXES), dtype=np.int64)


def draw(boxes: np.ndarray, labels: np.ndarray, w: int = W, h: int = H) -> np.ndarray:
    """Grey canvas with each box filled in its label's colour (fillPoly in 1/16 px, pixel centres)."""
    image = np.full((h, w, 3), GREY, np.uint8)
    for corners, lab in zip(rbox_corners(boxes), labels):
        points = np.round((corners - 0.5) * 16).astype(np.int32)  # fillPoly puts pixel centres at integers
        cv2.fillPoly(image, [points], PALETTE[lab], lineType=cv2.LINE_8, shift=4)
    return image


def box_masks(boxes: np.ndarray, w: int, h: int, grow: float) -> np.ndarray:
    """[N, h, w] bool: pixel centres inside each box grown by `grow` px on every side (negative shrinks)."""
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    out = []
    for cx, cy, bw, bh, a in np.asarray(boxes, np.float64):
        du = (xs - cx) * math.cos(a) + (ys - cy) * math.sin(a)
        dv = -(xs - cx) * math.sin(a) + (ys - cy) * math.cos(a)
        out.append((np.abs(du) <= bw / 2 + grow) & (np.abs(dv) <= bh / 2 + grow))
    return np.stack(out) if out else np.zeros((0, h, w), bool)


def assert_glued(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, tol: float = 0.02) -> None:
    """Each box's inside (shrunk 2 px) is its colour; its colour stays within the box grown 2 px."""
    h, w = image.shape[:2]
    assert len(boxes) == len(labels) > 0
    inner, outer = box_masks(boxes, w, h, -2.0), box_masks(boxes, w, h, 2.0)
    for k, lab in enumerate(labels):
        colour = np.all(np.abs(image.astype(np.int16) - PALETTE[lab]) <= MATCH, axis=-1)
        n = int(inner[k].sum())
        assert n >= 10, f"box {k} has only {n} pixels inside the image"
        wrong = n - int(colour[inner[k]].sum())
        assert wrong <= tol * n, f"box {k} (label {lab}): {wrong} of {n} pixels inside are not its colour"
        stray = int((colour & ~outer[k]).sum())
        assert stray <= tol * n, f"box {k} (label {lab}): {stray} pixels of its colour lie outside it"


def same_polygons(a: np.ndarray, b: np.ndarray, tol: float = 1e-3) -> bool:
    """Boxes a[i] and b[i] cover the same area: symmetric difference below tol of the area."""
    for p, q in zip(rbox_corners(a), rbox_corners(b)):
        pa, pb = Polygon(p), Polygon(q)
        if pa.symmetric_difference(pb).area > tol * max(pa.area, 1.0):
            return False
    return True


def test_drawing_matches_the_boxes():
    # The fixture itself: boxes in the image, apart, and glued to what is drawn.
    corners = rbox_corners(BOXES)
    assert corners.min() > 1 and corners[..., 0].max() < W - 1 and corners[..., 1].max() < H - 1
    polys = [Polygon(c) for c in corners]
    assert min(p.distance(q) for i, p in enumerate(polys) for q in polys[i + 1:]) >= 3
    assert_glued(draw(BOXES, LABELS), BOXES, LABELS)


def test_rbox_corners_agree_with_torch():
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(0, 100, (50, 2)), rng.uniform(1, 40, (50, 2)),
                            rng.uniform(-4, 4, (50, 1))], 1)
    ours = rbox_corners(boxes)
    ref = rbox_to_corners(torch.from_numpy(boxes)).numpy()
    assert ours.shape == (50, 4, 2)
    assert np.abs(ours - ref).max() < 1e-9


@pytest.mark.parametrize("width_longer", [False, True])
def test_norm_le90_range_and_same_rectangles(width_longer):
    rng = np.random.default_rng(1)
    n = 200
    boxes = np.concatenate([rng.uniform(0, 100, (n, 2)), rng.uniform(1, 40, (n, 2)),
                            rng.uniform(-3 * math.pi, 3 * math.pi, (n, 1))], 1).astype(np.float32)
    # The edges of the range, and float32 values a hair below -pi/2 that wrap up to pi/2.
    boxes[:6, 4] = [-math.pi / 2, math.pi / 2, 0.0, math.pi, -np.float32(math.pi / 2), -3 * math.pi / 2]
    boxes[6, 4] = np.nextafter(-np.float32(math.pi / 2), np.float32(-2))
    out = norm_le90(boxes, width_longer=width_longer)
    assert out.dtype == np.float32 and out.shape == boxes.shape
    half = np.float32(math.pi / 2)
    assert np.all(out[:, 4] >= -half) and np.all(out[:, 4] < half)
    assert np.all(out[:, :2] == boxes[:, :2])
    assert same_polygons(out, boxes)
    assert np.array_equal(norm_le90(out, width_longer=width_longer), out)  # idempotent
    if width_longer:
        assert np.all(out[:, 2] >= out[:, 3])
        assert (boxes[:, 3] > boxes[:, 2]).sum() > 50  # the swap was exercised
    else:
        assert np.array_equal(out[:, 2:4], boxes[:, 2:4])  # this convention needs no w/h swap


@pytest.mark.parametrize("direction", ["horizontal", "vertical", "diagonal"])
def test_flip_keeps_boxes_on_shapes(direction):
    image = draw(BOXES, LABELS)
    flipped, boxes = flip_rotated(image, BOXES, direction)
    assert flipped.shape == image.shape and boxes.dtype == np.float32
    assert np.all(boxes[:, 4] >= -np.float32(math.pi / 2)) and np.all(boxes[:, 4] < np.float32(math.pi / 2))
    assert_glued(flipped, boxes, LABELS)
    # Corner sets land on the mirrored corner sets.
    mirrored = rbox_corners(BOXES)
    if direction != "vertical":
        mirrored[..., 0] = W - mirrored[..., 0]
    if direction != "horizontal":
        mirrored[..., 1] = H - mirrored[..., 1]
    for ours, ref in zip(rbox_corners(boxes), mirrored):
        assert np.abs(ours[:, None] - ref[None]).max(-1).min(1).max() < 1e-3
    # Twice is the identity.
    back, boxes2 = flip_rotated(flipped, boxes, direction)
    assert np.array_equal(back, image)
    assert np.abs(boxes2 - norm_le90(BOXES)).max() < 1e-4


def test_flip_rejects_unknown_direction():
    with pytest.raises(ValueError, match="sideways"):
        flip_rotated(draw(BOXES, LABELS), BOXES, "sideways")


@pytest.mark.parametrize("angle", [30, 90, -45, 180])
def test_rotate_keeps_boxes_on_shapes(angle):
    image = draw(BOXES, LABELS)
    out, boxes, labels = rotate_rotated(image, BOXES, LABELS, angle)
    assert out.shape == image.shape and boxes.dtype == np.float32 and labels.dtype == np.int64
    assert len(boxes) == len(BOXES)  # all centres stay inside (within 36 px of the image centre)
    assert_glued(out, boxes, labels)
    # The canvas corners come from outside the source image: the pad value.
    if angle in (30, -45):
        assert np.all(out[0, 0] == PAD_VALUE) and np.all(out[-1, -1] == PAD_VALUE)


def test_half_turn_is_the_diagonal_flip():
    # Exact to the pixel: the turn is about the centre of the pixel grid, not of pixel (0, 0).
    image = draw(BOXES, LABELS)
    image[::7, ::5] = PALETTE[3]  # texture, so a one-pixel shift shows
    out, boxes, labels = rotate_rotated(image, BOXES, LABELS, 180)
    flipped, flipped_boxes = flip_rotated(image, BOXES, "diagonal")
    assert np.array_equal(out, flipped)
    assert np.abs(boxes - flipped_boxes).max() < 1e-4 and np.array_equal(labels, LABELS)


def test_rotate_sign_is_clockwise_on_screen():
    # A box right of the centre, width along x: a quarter turn clockwise on screen (y down) puts
    # it below the centre with its width along y (angle pi/2, which is -pi/2 in le90).
    box = np.array([[W / 2 + 20, H / 2, 16, 6, 0.0]], np.float32)
    image = draw(box, [0])
    out, boxes, labels = rotate_rotated(image, box, np.array([0]), 90)
    assert np.allclose(boxes[0, :4], [W / 2, H / 2 + 20, 16, 6], atol=1e-4)
    assert math.isclose(boxes[0, 4], -math.pi / 2, abs_tol=1e-6)
    assert_glued(out, boxes, labels)
    # The pixels went the same way: the colour is now below the centre, not above.
    colour = np.all(out == PALETTE[0], axis=-1)
    assert colour[int(H / 2 + 20), int(W / 2)] and not colour[int(H / 2 - 20), int(W / 2)]


def test_rotate_drops_boxes_whose_centre_leaves_the_image():
    # 54 px left of the centre: after a quarter turn 54 px above it, outside a 96 px tall image.
    boxes = np.array([[W / 2 - 54, H / 2, 12, 6, 0.3], [W / 2 + 5, H / 2 + 5, 20, 8, -0.4],
                      [W / 2 + 54, H / 2 - 10, 12, 6, 1.0]], np.float32)
    labels = np.array([3, 5, 6], np.int64)
    image = draw(boxes, labels)
    out, kept, kept_labels = rotate_rotated(image, boxes, labels, 90)
    assert kept_labels.tolist() == [5]
    assert_glued(out, kept, kept_labels)
    _, all_boxes, all_labels = rotate_rotated(image, boxes, labels, 90, keep_within=False)
    assert all_labels.tolist() == [3, 5, 6]
    assert all_boxes[0, 1] < 0 and all_boxes[2, 1] > H


def test_rotate_without_boxes():
    out, boxes, labels = rotate_rotated(draw(BOXES[:0], LABELS[:0]), np.zeros((0, 5), np.float32),
                                        np.zeros(0, np.int64), 30)
    assert out.shape == (H, W, 3) and boxes.shape == (0, 5) and labels.shape == (0,)


@pytest.mark.parametrize("scale", [0.75, 1.6])
def test_resize_keeps_boxes_on_shapes(scale):
    image = draw(BOXES, LABELS)
    out, boxes = resize_rotated(image, BOXES, scale)
    assert out.shape == (round(H * scale), round(W * scale), 3)
    assert np.array_equal(boxes[:, 4], BOXES[:, 4])
    assert_glued(out, boxes, LABELS)


def _turn_of(before: np.ndarray, after: np.ndarray) -> float:
    """The turn (degrees, clockwise on screen) that moved a point from `before` to `after` about the centre."""
    c = np.array([W / 2, H / 2])
    a0 = math.atan2(*(before - c)[::-1])
    a1 = math.atan2(*(after - c)[::-1])
    return (math.degrees(a1 - a0) + 180) % 360 - 180


def test_random_rotate_prob_zero_is_identity():
    image = draw(BOXES, LABELS)
    rng = np.random.default_rng(0)
    for _ in range(5):
        out, boxes, labels = random_rotate(image, BOXES, LABELS, rng, prob=0.0)
        assert out is image and boxes is BOXES and labels is LABELS


def test_random_rotate_angles():
    # A single small box off the centre: where its centre lands tells the angle that was drawn.
    box = np.array([[W / 2 + 8, H / 2, 4, 2, 0.0]], np.float32)
    image = np.full((H, W, 3), GREY, np.uint8)
    rng = np.random.default_rng(0)

    def turns(label: int, **kwargs) -> list[float]:
        out = []
        for _ in range(40):
            _, boxes, _ = random_rotate(image, box, np.array([label]), rng, **kwargs)
            out.append(_turn_of(box[0, :2], boxes[0, :2]))
        return out

    free = turns(1, prob=1.0, angle_range=30, rect_classes=[2, 4])
    assert all(abs(t) <= 30 + 1e-3 for t in free)
    assert sum(abs(t - round(t / 90) * 90) > 1 for t in free) > 30  # not multiples of 90
    assert min(free) < -15 and max(free) > 15  # both signs, spread over the range
    rect = turns(4, prob=1.0, angle_range=30, rect_classes=[2, 4])
    assert {round(t) % 360 for t in rect} == {90, 180, 270}  # 90, 180 and -90, nothing else
    assert all(abs(t - round(t)) < 1e-3 for t in rect)
    half = turns(1, prob=0.5)
    assert 8 <= sum(abs(t) > 1e-6 for t in half) <= 32  # about half of the 40 draws rotate
