"""Training transforms for rotated boxes: flips, rotation (MMRotate's RandomRotate) and resize.

Boxes are float32 [N, 5] (cx, cy, w, h, angle) in the convention of rtmdet.geometry.rotated:
pixels and radians, width axis u = (cos a, sin a), height axis v = (-sin a, cos a), so a positive
angle turns +x towards +y, clockwise on screen (y points down); angles in [-pi/2, pi/2) ("le90").
Images are HxWx3 uint8, labels int64 [N]. Coordinates are continuous: pixel (i, j) covers
[j, j + 1) x [i, i + 1), so its centre is (j + 0.5, i + 0.5), as the axis-aligned transforms have it.

Every angle argument here follows the box angle's sign: a positive rotation is clockwise on
screen (as mmcv's imrotate and MMRotate's Rotate), the opposite of cv2.getRotationMatrix2D's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from rtmdet.inference.preprocess import PAD_VALUE

FLIP_DIRECTIONS = ("horizontal", "vertical", "diagonal")
_HALF_PI32 = np.float32(math.pi / 2)


def _as_rboxes(rboxes: np.ndarray) -> np.ndarray:
    return np.asarray(rboxes, np.float64).reshape(-1, 5)


def norm_le90(rboxes: np.ndarray, width_longer: bool = False) -> np.ndarray:
    """Boxes with angles in [-pi/2, pi/2) (float32 [N, 5]); each is the same rectangle as before.

    Turning a rectangle by pi leaves it as it was, so wrapping the angle modulo pi needs no w/h
    swap: this is rotated.py's norm_angle_le90 and what quad_to_rbox produces (w is not made the
    long side). With width_longer, boxes with h > w also swap w and h and turn by pi/2 first
    (MMRotate 1.x's regularize_boxes('le90')), so w >= h. In float32 the range is
    -float32(pi/2) <= angle < float32(pi/2), as torch's float32 norm_angle_le90 keeps it: angles
    already inside are kept bit for bit (so this is idempotent), the others wrap in float64 and
    one that rounds up to float32(pi/2) becomes -float32(pi/2).
    """
    boxes = _as_rboxes(rboxes).copy()
    if width_longer:
        swap = boxes[:, 3] > boxes[:, 2]
        boxes[swap, 2], boxes[swap, 3] = boxes[swap, 3], boxes[swap, 2]  # fancy indexing copies
        boxes[swap, 4] += math.pi / 2
    a = boxes[:, 4]
    wrap = (a < -float(_HALF_PI32)) | (a >= float(_HALF_PI32))
    a[wrap] = (a[wrap] + math.pi / 2) % math.pi - math.pi / 2
    out = boxes.astype(np.float32)
    out[out[:, 4] >= _HALF_PI32, 4] = -_HALF_PI32
    return out


def rbox_corners(rboxes: np.ndarray) -> np.ndarray:
    """[N, 5] rotated boxes -> [N, 4, 2] float64 corners, in rbox_to_corners' order and winding:
    c - u w/2 - v h/2, c + u w/2 - v h/2, c + u w/2 + v h/2, c - u w/2 + v h/2."""
    cx, cy, w, h, a = _as_rboxes(rboxes).T
    cos, sin = np.cos(a)[:, None], np.sin(a)[:, None]
    hu = (w / 2)[:, None] * np.array([-1.0, 1.0, 1.0, -1.0])
    hv = (h / 2)[:, None] * np.array([-1.0, -1.0, 1.0, 1.0])
    x = cx[:, None] + hu * cos - hv * sin
    y = cy[:, None] + hu * sin + hv * cos
    return np.stack([x, y], axis=-1)


def flip_rotated(image: np.ndarray, rboxes: np.ndarray, direction: str) -> tuple[np.ndarray, np.ndarray]:
    """Mirror the image and its boxes: "horizontal" (x -> W - x, angle -> -angle), "vertical"
    (y -> H - y, angle -> -angle) or "diagonal" (both axes, a half turn: angle unchanged)."""
    if direction not in FLIP_DIRECTIONS:
        raise ValueError(f"flip direction {direction!r} is not one of {', '.join(FLIP_DIRECTIONS)}")
    h, w = image.shape[:2]
    boxes = _as_rboxes(rboxes).copy()
    if direction in ("horizontal", "diagonal"):
        boxes[:, 0] = w - boxes[:, 0]
    if direction in ("vertical", "diagonal"):
        boxes[:, 1] = h - boxes[:, 1]
    if direction != "diagonal":  # one mirror reverses the turn of the width axis
        boxes[:, 4] = -boxes[:, 4]
    code = {"horizontal": 1, "vertical": 0, "diagonal": -1}[direction]
    return cv2.flip(image, code), norm_le90(boxes)


def rotation_matrix(width: int, height: int, angle_deg: float) -> np.ndarray:
    """2x3 affine matrix, in continuous coordinates, of a turn by angle_deg (positive: clockwise on
    screen, the box angle's sign) about the image centre (width / 2, height / 2)."""
    # cv2's positive angle is counter-clockwise on screen: hence the minus.
    return cv2.getRotationMatrix2D((width / 2, height / 2), -angle_deg, 1.0)


def rotate_rotated(
    image: np.ndarray, rboxes: np.ndarray, labels: np.ndarray, angle_deg: float, keep_within: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn the image by angle_deg about its centre on a same-size canvas (bilinear, the outside
    filled with PAD_VALUE) and its boxes with it: centres by the same matrix, angle +
    radians(angle_deg) (positive: clockwise on screen). With keep_within, boxes whose centre
    leaves [0, W) x [0, H) are dropped with their labels. Returns (image, rboxes, labels)."""
    h, w = image.shape[:2]
    matrix = rotation_matrix(w, h, angle_deg)
    # warpAffine works in pixel indices (centre of pixel j at x = j), ours in continuous
    # coordinates (at j + 0.5): same linear part, the translation moved by (I - A) (-0.5, -0.5).
    pixel_matrix = matrix.copy()
    pixel_matrix[:, 2] -= 0.5 * (1.0 - matrix[:, :2].sum(1))
    out = cv2.warpAffine(image, pixel_matrix, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=(PAD_VALUE,) * 3)
    boxes = _as_rboxes(rboxes).copy()
    labels = np.asarray(labels, np.int64).reshape(-1)
    boxes[:, :2] = boxes[:, :2] @ matrix[:, :2].T + matrix[:, 2]
    boxes[:, 4] += math.radians(angle_deg)
    if keep_within:
        inside = (boxes[:, 0] >= 0) & (boxes[:, 0] < w) & (boxes[:, 1] >= 0) & (boxes[:, 1] < h)
        boxes, labels = boxes[inside], labels[inside]
    return out, norm_le90(boxes), labels


def random_rotate(
    image: np.ndarray, rboxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator, prob: float = 0.5,
    angle_range: float = 180, rect_classes: Sequence[int] | None = None,
    rect_angles: Sequence[float] = (90, 180, -90),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MMRotate's RandomRotate: with probability prob, rotate_rotated by U(-angle_range, angle_range)
    degrees; when a label is in rect_classes (objects drawn as upright boxes, e.g. storage tanks,
    roundabouts), by one of rect_angles instead. Otherwise the inputs come back as they are."""
    if rng.random() >= prob:
        return image, rboxes, labels
    angle = float(rng.uniform(-angle_range, angle_range))
    if rect_classes is not None and np.isin(np.asarray(labels), list(rect_classes)).any():
        angle = float(rect_angles[int(rng.integers(len(rect_angles)))])
    return rotate_rotated(image, rboxes, labels, angle)


def resize_rotated(image: np.ndarray, rboxes: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Resize the image by scale on both axes (cv2 bilinear; its size rounds to whole pixels, the
    pixel mapping stays exactly x * scale) and its boxes: cx, cy, w, h times scale, angle kept."""
    if scale <= 0:
        raise ValueError(f"resize scale must be positive, got {scale}")
    out = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    boxes = _as_rboxes(rboxes).copy()
    boxes[:, :4] *= scale
    return out, boxes.astype(np.float32)
