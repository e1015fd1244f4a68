"""Single-image training transforms of RTMDet's recipe: resize, crop, HSV, flip, pad.

Geometry is lazy. A `Canvas` is a list of source images placed by scale + shift, plus its boxes;
`random_resize` and `random_crop` only change numbers, and `render` draws the final pixels with
one bilinear resize per source image, of just the part that is visible. mmdetection materializes a 2S x 2S mosaic, resizes it to up to
4S x 4S and then crops S x S; rendering only the crop gives the same geometry (boxes are mapped by
the very same scale + shift as the pixels) at a fraction of the cost.

Boxes are float32 [K, 4] xyxy in canvas pixels, labels int64 [K]. Every step that clips boxes
drops the ones that end up thinner than `min_size` pixels, together with their labels.

Instance masks (the segment task) ride along the same way: a layer keeps its source image's
masks [k, h, w] untouched, the canvas keeps, per box, which layer and which of its masks the box
belongs to (`instances`), and `render_masks` draws the survivors with the layers' own scale and
shift. Without masks (`instances` None) none of this costs anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

from rtmdet.inference.preprocess import PAD_VALUE, rescale_size

DEFAULT_MIN_BOX_SIZE = 1.0


@dataclass(frozen=True)
class Layer:
    """A source image placed on a canvas: canvas = source * scale + offset, visible inside clip."""

    image: np.ndarray  # HxWx3 uint8, never modified
    scale: tuple[float, float]  # (sx, sy)
    offset: tuple[float, float]  # (tx, ty)
    clip: tuple[float, float, float, float]  # x1, y1, x2, y2 in canvas pixels
    masks: np.ndarray | None = None  # [k, H, W] bool instance masks of `image`, never modified


@dataclass(frozen=True)
class Canvas:
    """An image that is not rendered yet: layers on a width x height canvas filled with `fill`."""

    width: int
    height: int
    layers: tuple[Layer, ...]
    boxes: np.ndarray
    labels: np.ndarray
    image_id: int
    fill: int = PAD_VALUE
    instances: np.ndarray | None = None  # [K, 2] int64 per box: (layer index, mask index in that layer)


def clip_boxes(
    boxes: np.ndarray, labels: np.ndarray, width: float, height: float, min_size: float = DEFAULT_MIN_BOX_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Clip xyxy boxes to [0, width] x [0, height] and drop those thinner than min_size."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4).astype(np.float32), labels.reshape(0).astype(np.int64)
    out = boxes.astype(np.float32, copy=True)
    np.clip(out[:, 0::2], 0, width, out=out[:, 0::2])
    np.clip(out[:, 1::2], 0, height, out=out[:, 1::2])
    keep = ((out[:, 2] - out[:, 0]) >= min_size) & ((out[:, 3] - out[:, 1]) >= min_size)
    return out[keep], labels[keep].astype(np.int64, copy=False)


def clip_targets(
    boxes: np.ndarray, labels: np.ndarray, instances: np.ndarray | None, width: float, height: float,
    min_size: float = DEFAULT_MIN_BOX_SIZE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """clip_boxes, with the per-box instance rows (None: no masks) kept in step."""
    if instances is None:
        return (*clip_boxes(boxes, labels, width, height, min_size), None)
    rows = np.arange(len(boxes))
    boxes, kept = clip_boxes(boxes, rows, width, height, min_size)
    return boxes, labels[kept].astype(np.int64, copy=False), instances[kept]


def canvas_from_image(
    image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, image_id: int = -1, fill: int = PAD_VALUE,
    masks: np.ndarray | None = None,
) -> Canvas:
    """Wrap one decoded image and its targets (and its instance masks, one per box) as an identity canvas."""
    h, w = image.shape[:2]
    layer = Layer(image, (1.0, 1.0), (0.0, 0.0), (0.0, 0.0, float(w), float(h)), masks)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    instances = None if masks is None else np.stack([np.zeros(len(boxes), np.int64), np.arange(len(boxes))], axis=1)
    boxes, labels, instances = clip_targets(boxes, np.asarray(labels, np.int64), instances, w, h)
    return Canvas(w, h, (layer,), boxes, labels, image_id, fill, instances)


def resize_canvas(canvas: Canvas, new_w: int, new_h: int, min_size: float = DEFAULT_MIN_BOX_SIZE) -> Canvas:
    """Scale the canvas to new_w x new_h (like cv2.resize would), boxes with it."""
    sx, sy = new_w / canvas.width, new_h / canvas.height
    layers = tuple(
        Layer(
            ly.image,
            (ly.scale[0] * sx, ly.scale[1] * sy),
            (ly.offset[0] * sx, ly.offset[1] * sy),
            (ly.clip[0] * sx, ly.clip[1] * sy, ly.clip[2] * sx, ly.clip[3] * sy),
            ly.masks,
        )
        for ly in canvas.layers
    )
    boxes = canvas.boxes * np.array([sx, sy, sx, sy], np.float32)
    boxes, labels, instances = clip_targets(boxes, canvas.labels, canvas.instances, new_w, new_h, min_size)
    return replace(canvas, width=new_w, height=new_h, layers=layers, boxes=boxes, labels=labels, instances=instances)


def crop_canvas(
    canvas: Canvas, x0: int, y0: int, width: int, height: int, min_size: float = DEFAULT_MIN_BOX_SIZE
) -> Canvas:
    """Cut the window [x0, x0+width) x [y0, y0+height) out of the canvas; boxes follow."""
    layers, new_index = [], np.full(len(canvas.layers), -1, np.int64)
    for i, ly in enumerate(canvas.layers):
        x1, y1 = max(ly.clip[0] - x0, 0.0), max(ly.clip[1] - y0, 0.0)
        x2, y2 = min(ly.clip[2] - x0, float(width)), min(ly.clip[3] - y0, float(height))
        if x2 > x1 and y2 > y1:
            new_index[i] = len(layers)
            layers.append(Layer(ly.image, ly.scale, (ly.offset[0] - x0, ly.offset[1] - y0), (x1, y1, x2, y2), ly.masks))
    boxes = canvas.boxes - np.array([x0, y0, x0, y0], np.float32)
    boxes, labels, instances = clip_targets(boxes, canvas.labels, canvas.instances, width, height, min_size)
    if instances is not None:  # a box lies inside its layer's clip, so its layer is still there
        instances = np.stack([new_index[instances[:, 0]], instances[:, 1]], axis=1)
        if (instances[:, 0] < 0).any():
            raise AssertionError("a box outlived its layer in a crop")
    return replace(canvas, width=width, height=height, layers=tuple(layers), boxes=boxes, labels=labels,
                   instances=instances)


def random_resize(
    canvas: Canvas, scale: int, ratio_range: tuple[float, float], rng: np.random.Generator
) -> Canvas:
    """mmcv RandomResize(keep_ratio=True): fit the canvas into (scale * ratio)^2, ratio ~ U(range)."""
    lo, hi = ratio_range
    target = int(scale * (rng.random() * (hi - lo) + lo))
    new_w, new_h, _ = rescale_size(canvas.width, canvas.height, max(target, 1))
    return resize_canvas(canvas, max(new_w, 1), max(new_h, 1))


def random_crop(
    canvas: Canvas, size: int, rng: np.random.Generator, allow_negative_crop: bool = False
) -> Canvas | None:
    """mmdet RandomCrop(crop_type='absolute'): a random size x size window (smaller if the canvas is).

    Returns None when no box survives and allow_negative_crop is False; the caller then draws
    another image, as mmdetection's dataset does.
    """
    crop_h, crop_w = min(size, canvas.height), min(size, canvas.width)
    off_y = int(rng.integers(0, canvas.height - crop_h + 1))
    off_x = int(rng.integers(0, canvas.width - crop_w + 1))
    out = crop_canvas(canvas, off_x, off_y, crop_w, crop_h)
    if len(out.boxes) == 0 and not allow_negative_crop:
        return None
    return out


def _pixel_span(lo: float, hi: float, limit: int) -> tuple[int, int]:
    """Pixels whose centres lie in [lo, hi), clamped to [0, limit)."""
    return max(math.ceil(lo - 0.5), 0), min(math.ceil(hi - 0.5), limit)


def _source_span(p1: int, p2: int, scale: float, offset: float, size: int) -> int:
    """First source pixel (minus a margin) that output pixels p1..p2-1 sample from."""
    first = (p1 + 0.5 - offset) / scale - 0.5
    return min(max(math.floor(first) - 2 - math.ceil(1 / scale), 0), size)


def _render_scaled(layer: Layer, px: tuple[int, int], py: tuple[int, int],
                   source: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
    """The layer's pixels for output spans px, py: (patch, x, y) with patch's top-left at (x, y).

    cv2.resize of just the source window the spans need (10x faster than warpAffine here),
    with resize's own pixel-centre mapping. The window's fractional canvas position is rounded
    to whole pixels, so a layer may sit up to 0.5 px off its exact place (boxes are exact).
    """
    (sx, sy), (tx, ty) = layer.scale, layer.offset
    source = layer.image if source is None else source  # or one of its masks, as uint8
    h, w = source.shape[:2]
    x0, y0 = _source_span(px[0], px[1], sx, tx, w), _source_span(py[0], py[1], sy, ty, h)
    x1 = min(math.ceil((px[1] - tx) / sx) + 3 + math.ceil(1 / sx), w)
    y1 = min(math.ceil((py[1] - ty) / sy) + 3 + math.ceil(1 / sy), h)
    patch = cv2.resize(source[y0:y1, x0:x1], None, fx=sx, fy=sy, interpolation=cv2.INTER_LINEAR)
    # resized pixel j is canvas pixel j + x0 * sx + tx (both use centre-aligned mapping)
    ox, oy = round(x0 * sx + tx), round(y0 * sy + ty)
    if ox > px[0] or oy > py[0] or ox + patch.shape[1] < px[1] or oy + patch.shape[0] < py[1]:
        # Rounding at the image's own edge can leave one pixel short: replicate the edge.
        patch = cv2.copyMakeBorder(patch, 1, 1, 1, 1, cv2.BORDER_REPLICATE)
        ox, oy = ox - 1, oy - 1
    return patch, ox, oy


def render(canvas: Canvas) -> np.ndarray:
    """Draw the canvas: each layer resized (cv2 bilinear) into the pixels of its clip rectangle."""
    out = np.full((canvas.height, canvas.width, 3), canvas.fill, np.uint8)
    for ly in canvas.layers:
        px1, px2 = _pixel_span(ly.clip[0], ly.clip[2], canvas.width)
        py1, py2 = _pixel_span(ly.clip[1], ly.clip[3], canvas.height)
        if px2 <= px1 or py2 <= py1:
            continue
        (sx, sy), (tx, ty) = ly.scale, ly.offset
        if sx == 1.0 and sy == 1.0 and float(tx).is_integer() and float(ty).is_integer():
            # Pure integer shift (mosaic paste, crop of an unscaled image): a slice copy.
            out[py1:py2, px1:px2] = ly.image[py1 - int(ty) : py2 - int(ty), px1 - int(tx) : px2 - int(tx)]
            continue
        patch, ox, oy = _render_scaled(ly, (px1, px2), (py1, py2))
        out[py1:py2, px1:px2] = patch[py1 - oy : py2 - oy, px1 - ox : px2 - ox]
    return out


def render_masks(canvas: Canvas) -> np.ndarray:
    """The instance masks of the canvas's boxes, [K, height, width] bool, drawn as `render` draws
    the pixels (bilinear, then >= 0.5), each cut to its layer's visible rectangle."""
    out = np.zeros((len(canvas.boxes), canvas.height, canvas.width), bool)
    if canvas.instances is None or not len(out):
        return out
    for k, (li, mi) in enumerate(canvas.instances.tolist()):
        ly = canvas.layers[li]
        px1, px2 = _pixel_span(ly.clip[0], ly.clip[2], canvas.width)
        py1, py2 = _pixel_span(ly.clip[1], ly.clip[3], canvas.height)
        if px2 <= px1 or py2 <= py1:
            continue
        source = ly.masks[mi].view(np.uint8) * np.uint8(255)
        (sx, sy), (tx, ty) = ly.scale, ly.offset
        if sx == 1.0 and sy == 1.0 and float(tx).is_integer() and float(ty).is_integer():
            patch = source[py1 - int(ty) : py2 - int(ty), px1 - int(tx) : px2 - int(tx)]
        else:
            full, ox, oy = _render_scaled(ly, (px1, px2), (py1, py2), source)
            patch = full[py1 - oy : py2 - oy, px1 - ox : px2 - ox]
        out[k, py1:py2, px1:px2] = patch >= 128
    return out


def hsv_gains(rng: np.random.Generator, hue: int = 5, saturation: int = 30, value: int = 30) -> np.ndarray:
    """YOLOX's random HSV gains: each channel on or off with p=0.5, magnitude U(-delta, delta)."""
    gains = rng.uniform(-1, 1, 3) * np.array([hue, saturation, value])
    gains *= rng.integers(0, 2, 3)
    return gains.astype(np.int16)  # truncates toward zero, as YOLOX and mmdet do


def apply_hsv(image: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Shift hue (mod 180) and saturation/value (clipped) in OpenCV's uint8 HSV space."""
    if not np.any(gains):
        return image  # skip the lossy BGR->HSV->BGR round trip when nothing changes
    x = np.arange(256, dtype=np.int16)
    lut = np.stack(
        [(x + gains[0]) % 180, np.clip(x + gains[1], 0, 255), np.clip(x + gains[2], 0, 255)], axis=1
    ).astype(np.uint8)
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    hsv = cv2.LUT(hsv, lut.reshape(256, 1, 3))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def random_hsv(image: np.ndarray, rng: np.random.Generator, deltas: tuple[int, int, int] = (5, 30, 30)) -> np.ndarray:
    """mmdet YOLOXHSVRandomAug with (hue, saturation, value) deltas."""
    return apply_hsv(image, hsv_gains(rng, *deltas))


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror an image and its xyxy boxes left-right."""
    w = image.shape[1]
    flipped = boxes.copy()
    flipped[:, 0] = w - boxes[:, 2]
    flipped[:, 2] = w - boxes[:, 0]
    return cv2.flip(image, 1), flipped


def random_flip(
    image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, prob: float = 0.5,
    masks: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """mmdet RandomFlip(direction='horizontal') with probability prob; masks [K, H, W] flip along."""
    if rng.random() < prob:
        return (*hflip(image, boxes), None if masks is None else masks[:, :, ::-1])
    return image, boxes, masks


def pad_masks_to(masks: np.ndarray, size: int) -> np.ndarray:
    """Pad [K, H, W] masks bottom/right to size x size with False (as pad_to pads the image)."""
    k, h, w = masks.shape
    if (h, w) == (size, size):
        return np.ascontiguousarray(masks)
    out = np.zeros((k, size, size), bool)
    out[:, :h, :w] = masks
    return out


def pad_to(image: np.ndarray, size: int, value: int = PAD_VALUE) -> np.ndarray:
    """Pad bottom/right to size x size (mmdet Pad(size=...)); the image must fit."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    out = np.full((size, size, 3), value, np.uint8)
    out[:h, :w] = image
    return out
