"""Drawing boxes, class names and instance masks on images (predict, show-data, evaluation grids)."""

from __future__ import annotations

import colorsys
from typing import Sequence

import cv2
import numpy as np


def class_color(label: int) -> tuple[int, int, int]:
    """A stable, distinct BGR colour per class (golden-ratio hue steps)."""
    h = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def draw_masks(image_bgr: np.ndarray, masks: Sequence[np.ndarray], labels: np.ndarray,
               alpha: float = 0.45) -> np.ndarray:
    """The image with each instance mask blended in its class colour (masks of another size are
    resized to the image, nearest neighbour)."""
    if not len(masks):
        return image_bgr
    out = image_bgr.astype(np.float32)
    h, w = image_bgr.shape[:2]
    for mask, label in zip(masks, labels):
        m = np.asarray(mask, np.uint8)
        if m.shape != (h, w):
            m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
        m = m.astype(bool)
        out[m] = out[m] * (1 - alpha) + np.asarray(class_color(int(label)), np.float32) * alpha
    return out.round().astype(np.uint8)


def text_color(bgr: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light backgrounds, white on dark ones (relative luminance)."""
    b, g, r = bgr
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def draw_boxes(
    image_bgr: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    scores: np.ndarray | None = None,
    thickness: int | None = None,
) -> np.ndarray:
    """A copy of the image with each box outlined and captioned 'name' or 'name 0.87'."""
    out = image_bgr.copy()
    side = max(out.shape[:2])
    thickness = thickness or max(1, round(side / 400))
    font_scale = max(0.35, side / 1200)
    for i, (box, label) in enumerate(zip(np.asarray(boxes), np.asarray(labels))):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        color = class_color(int(label))
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness, cv2.LINE_AA)
        name = class_names[int(label)] if 0 <= int(label) < len(class_names) else str(int(label))
        text = name if scores is None else f"{name} {float(scores[i]):.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else y1 + th + base + 2
        tx = max(0, min(x1, out.shape[1] - tw - 2))  # keep the caption inside the image
        cv2.rectangle(out, (tx, ty - th - base), (tx + tw + 2, ty + base - 1), color, -1)
        cv2.putText(out, text, (tx + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, text_color(color), 1, cv2.LINE_AA)
    return out


def draw_rboxes(image: np.ndarray, rboxes: np.ndarray, labels: np.ndarray, wrong: np.ndarray,
                scale: float) -> np.ndarray:
    """Rotated boxes (cx, cy, w, h, angle; rtmdet.geometry.rotated's convention) times scale, in class
    colours, a dot on the first corner; those flagged wrong also in a white outline."""
    out = image.copy()
    if len(rboxes):
        cx, cy, w, h, a = np.asarray(rboxes, np.float64).reshape(-1, 5).T
        u = np.stack([np.cos(a), np.sin(a)], -1)[:, None] * (w[:, None, None] / 2)  # the width axis
        v = np.stack([-np.sin(a), np.cos(a)], -1)[:, None] * (h[:, None, None] / 2)
        su, sv = np.array([-1, 1, 1, -1])[None, :, None], np.array([-1, -1, 1, 1])[None, :, None]
        corners = (np.stack([cx, cy], -1)[:, None] + su * u + sv * v) * scale  # rbox_to_corners' order
        for quad, label, bad in zip(corners, labels, wrong):
            pts = np.round(quad).astype(np.int32)
            if bad:
                cv2.polylines(out, [pts], True, (255, 255, 255), 4, cv2.LINE_AA)
            cv2.polylines(out, [pts], True, class_color(int(label)), 2, cv2.LINE_AA)
            cv2.circle(out, tuple(int(v) for v in pts[0]), 3, class_color(int(label)), -1, cv2.LINE_AA)
    return out
