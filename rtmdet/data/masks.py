"""Instance masks from COCO `segmentation` fields: polygons, uncompressed RLE and compressed RLE,
as Roboflow and COCO exports write them, decoded with pycocotools (COCO's own rasterizer, so a
mask here is the mask COCO's segm evaluation scores).

`check_segmentation` says what is wrong with a field in words a user can act on; the reader
that uses it decides what is an error and what is skipped and counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from rtmdet.errors import DataError

REASONS = {
    "no_mask": "annotations with a box but no usable segmentation (instance dropped)",
    "degenerate_polygon": "polygons with under 3 points or no area (dropped from their mask)",
    "polygon_outside_image": "polygons with points more than 1 px outside the image (clipped by rasterizing)",
}


def check_segmentation(segm: Any, height: int, width: int) -> tuple[list[str], Any]:
    """(reasons, usable field): the problems of one `segmentation` value and the part that can be
    rasterized (None when nothing can). Raises DataError for a value of the wrong kind or an RLE
    of another image size (the annotation belongs to another image)."""
    if segm is None or (isinstance(segm, list) and not segm):
        return ["no_mask"], None
    if isinstance(segm, dict):
        size = segm.get("size")
        if not (isinstance(size, list) and len(size) == 2) or "counts" not in segm:
            raise DataError("an RLE segmentation needs 'size' [height, width] and 'counts'")
        if [int(v) for v in size] != [height, width]:
            raise DataError(f"an RLE segmentation of size {size[0]}x{size[1]} on an image of {height}x{width}")
        return [], segm
    if not isinstance(segm, list) or not all(isinstance(p, list) for p in segm):
        raise DataError(f"segmentation must be polygons (a list of [x1, y1, x2, y2, ...]) or RLE, got {type(segm).__name__}")
    reasons, kept = [], []
    for poly in segm:
        pts = np.asarray(poly, np.float64)
        if pts.size < 6 or pts.size % 2 or not np.isfinite(pts).all() or _area(pts.reshape(-1, 2)) <= 0:
            reasons.append("degenerate_polygon")
            continue
        xy = pts.reshape(-1, 2)
        if (xy < -1).any() or (xy[:, 0] > width + 1).any() or (xy[:, 1] > height + 1).any():
            reasons.append("polygon_outside_image")
        kept.append([float(v) for v in pts])
    if not kept:
        return reasons + ["no_mask"], None
    return sorted(set(reasons)), kept


def segmentation_to_mask(segm: Any, height: int, width: int) -> np.ndarray:
    """A usable `segmentation` (check_segmentation's second value) -> bool mask [height, width]."""
    if isinstance(segm, dict):
        rle = segm if isinstance(segm["counts"], (str, bytes)) else mask_utils.frPyObjects(segm, height, width)
        if isinstance(rle["counts"], str):
            rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    else:
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    return mask_utils.decode(rle).astype(bool)


def _area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


MASK_LOSS_STRIDE = 4  # RTMDet-Ins compares masks at 1/4 of the input (mmdetection's mask_loss_stride)


def mask_loss_targets(masks: np.ndarray, stride: int = MASK_LOSS_STRIDE) -> tuple[np.ndarray, np.ndarray]:
    """What the segment task's loss needs of an image's [K, H, W] bool masks: the masks sampled at
    every `stride`-th pixel from stride // 2 ([K, H/stride, W/stride] uint8, mmdetection's
    `gt_masks[:, s//2::s, s//2::s]`) and each mask's centre of mass (x, y) in pixels of the full
    mask ([K, 2] float32, mmdetection's `center_of_mass`: pixel indices, an empty mask gives 0, 0),
    which the assigner's centre prior uses instead of the box centre."""
    k, h, w = masks.shape
    sampled = np.ascontiguousarray(masks[:, stride // 2::stride, stride // 2::stride], dtype=np.uint8)
    area = masks.sum(axis=(1, 2), dtype=np.float64)
    cy = masks.sum(axis=2, dtype=np.float64) @ np.arange(h, dtype=np.float64)
    cx = masks.sum(axis=1, dtype=np.float64) @ np.arange(w, dtype=np.float64)
    norm = np.maximum(area, 1e-7)
    centers = np.stack([cx / norm, cy / norm], axis=1).astype(np.float32) if k else np.zeros((0, 2), np.float32)
    return sampled, centers


def masks_to_rles(masks: Any) -> list[dict[str, Any]]:
    """[K, H, W] bool masks (numpy, or a torch tensor on any device) -> COCO compressed RLEs
    ({"size": [H, W], "counts": str}: JSON-safe, what a COCO results file holds). A CUDA tensor
    is run-length coded where it is (only the run boundaries cross to the host, not K x H x W
    bytes: 100 masks of a 512 x 512 image are 26 MB), then compressed by pycocotools."""
    if len(masks) == 0:
        return []
    if not isinstance(masks, np.ndarray):  # a torch tensor
        if masks.is_cuda:
            return _rles_of_runs(*_mask_runs(masks))
        masks = masks.cpu().numpy()
    encoded = mask_utils.encode(np.asfortranarray(np.asarray(masks, np.uint8).transpose(1, 2, 0)))
    return [{"size": [int(v) for v in e["size"]], "counts": e["counts"].decode("ascii")} for e in encoded]


def _mask_runs(masks: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """COCO's run boundaries of [K, H, W] masks (column-major pixel order): (mask index and
    position of each boundary, each mask's first pixel, (H, W)), computed on the masks' device."""
    k, h, w = masks.shape
    flat = masks.bool().transpose(1, 2).reshape(k, h * w)
    which, where = (flat[:, 1:] != flat[:, :-1]).nonzero(as_tuple=True)
    first = flat[:, 0]
    return which.cpu().numpy(), where.cpu().numpy() + 1, first.cpu().numpy(), (h, w)


def _rles_of_runs(which: np.ndarray, where: np.ndarray, first: np.ndarray, hw: tuple[int, int]) -> list[dict[str, Any]]:
    h, w = hw
    n = h * w
    splits = np.searchsorted(which, np.arange(1, len(first)))
    raw = []
    for bounds, starts_set in zip(np.split(where, splits), first, strict=True):
        counts = np.diff(np.concatenate(([0], bounds, [n])))
        if starts_set:  # COCO's counts start with a run of zeros, empty when the first pixel is set
            counts = np.concatenate(([0], counts))
        raw.append({"size": [h, w], "counts": counts.tolist()})
    encoded = mask_utils.frPyObjects(raw, h, w)
    return [{"size": [h, w], "counts": e["counts"].decode("ascii")} for e in encoded]


def rle_bytes(rle: dict[str, Any]) -> dict[str, Any]:
    """An RLE with bytes counts, as pycocotools' functions take it (JSON holds str)."""
    counts = rle["counts"]
    return {"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """A COCO RLE (str or bytes counts) -> [H, W] uint8 mask."""
    return mask_utils.decode(rle_bytes(rle))
