"""The one post-process: decode distances, score filter, top-k, class-aware NMS, rescale.

It follows mmdetection's `_predict_by_feat_single` step by step (refs README), then clips the
final boxes to the original image, which is what users expect.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms


# NMS of an image's best candidates first (exact, see _nms): at least this many, and 8 x max_per_img.
PRESELECT = 4096


@dataclass(frozen=True)
class PostprocessConfig:
    """mmdetection's test_cfg defaults."""

    score_thr: float = 0.001
    nms_pre: int = 30000
    iou_thr: float = 0.65
    max_per_img: int = 300
    min_bbox_size: float = 0.0


def preselection(cfg: PostprocessConfig) -> int:
    """How many of an image's best candidates NMS looks at first (see _nms)."""
    return max(PRESELECT, 8 * cfg.max_per_img)


def level_points(h: int, w: int, stride: int, device: torch.device) -> torch.Tensor:
    """Prior points of one level, row-major: cell (i, j) -> (j * stride, i * stride), offset 0."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack((xs.reshape(-1), ys.reshape(-1)), dim=1).float() * stride


def decode(points: torch.Tensor, dist: torch.Tensor, canvas_hw: tuple[int, int]) -> torch.Tensor:
    """(l, t, r, b) distances from points -> xyxy, clamped to the model canvas as mmdetection does."""
    h, w = canvas_hw
    x1 = (points[:, 0] - dist[:, 0]).clamp(0, w)
    y1 = (points[:, 1] - dist[:, 1]).clamp(0, h)
    x2 = (points[:, 0] + dist[:, 2]).clamp(0, w)
    y2 = (points[:, 1] + dist[:, 3]).clamp(0, h)
    return torch.stack((x1, y1, x2, y2), dim=-1)


def postprocess_single(
    cls_scores: list[torch.Tensor],
    bbox_preds: list[torch.Tensor],
    strides: tuple[int, ...],
    canvas_hw: tuple[int, int],
    scale_wh: tuple[float, float],
    ori_hw: tuple[int, int],
    cfg: PostprocessConfig = PostprocessConfig(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image: per level cls logits [C, H, W] and distances [4, H, W] -> (boxes, scores, labels)."""
    return postprocess_batch([c[None] for c in cls_scores], [b[None] for b in bbox_preds], strides, canvas_hw,
                             [scale_wh], [ori_hw], cfg)[0]


def postprocess_batch(
    cls_scores: list[torch.Tensor],
    bbox_preds: list[torch.Tensor],
    strides: tuple[int, ...],
    canvas_hw: tuple[int, int],
    scale_wh: list[tuple[float, float]],
    ori_hw: list[tuple[int, int]],
    cfg: PostprocessConfig = PostprocessConfig(),
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A batch: per level cls logits [N, C, H, W] and distances [N, 4, H, W] -> per image
    (boxes, scores, labels), on the maps' device. Candidates of all images are found in one
    pass per level; NMS then runs per image, as mmdetection does (offsetting images into one
    NMS call would round box coordinates differently)."""
    n = cls_scores[0].shape[0]
    found = [_level_candidates(cls, reg, stride, canvas_hw, cfg) for cls, reg, stride in
             zip(cls_scores, bbox_preds, strides)]
    image, boxes, scores, labels = (torch.cat(parts) for parts in zip(*found))
    order = torch.argsort(image, stable=True)  # level-major -> image-major, levels in order
    image, boxes, scores, labels = image[order], boxes[order], scores[order], labels[order]
    # Rescale before NMS, by the fp32 reciprocal of the scale factor (as mmdetection does).
    inv = torch.tensor([[1 / sw, 1 / sh] * 2 for sw, sh in scale_wh], dtype=torch.float32, device=boxes.device)
    boxes = boxes * inv[image]
    # Boxes too small to keep go before NMS, for every image at once (one host sync, not one per image).
    wh = boxes[:, 2:] - boxes[:, :2]
    valid = (wh[:, 0] > cfg.min_bbox_size) & (wh[:, 1] > cfg.min_bbox_size)
    image, boxes, scores, labels = image[valid], boxes[valid], scores[valid], labels[valid]
    counts = torch.bincount(image, minlength=n).tolist()
    out = []
    for (b, s, lab), (h0, w0) in zip(zip(boxes.split(counts), scores.split(counts), labels.split(counts)), ori_hw):
        if b.numel():
            keep = _nms(b, s, lab, cfg)
            b, s, lab = b[keep], s[keep], lab[keep]
        b = torch.stack((b[:, 0].clamp(0, w0), b[:, 1].clamp(0, h0), b[:, 2].clamp(0, w0), b[:, 3].clamp(0, h0)), dim=-1)
        out.append((b, s, lab))
    return out


def _nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, cfg: PostprocessConfig) -> torch.Tensor:
    """Class-aware NMS, the first max_per_img kept, in score order; of the best candidates first.

    Greedy NMS decides each box by the higher-scoring boxes alone, so NMS of the best m keeps
    exactly the full NMS's kept boxes among them, in the same order: when max_per_img are kept and
    the last of them scores above every candidate left out, they are the answer (the ones left
    out come after it in the full NMS); else the full NMS runs. An untrained model at 640 px has
    ~25,000 candidates per image over score_thr 0.001, and NMS's pairwise mask grows with their
    square (78 MB per image, copied to the host): m of them cost a fraction."""
    m = preselection(cfg)
    if scores.numel() > m:
        top, idx = scores.topk(m + 1)
        idx = idx[:m]
        keep = batched_nms(boxes[idx], scores[idx], labels[idx], cfg.iou_thr)
        if keep.numel() >= cfg.max_per_img and bool(top[keep[cfg.max_per_img - 1]] > top[m]):
            return idx[keep[: cfg.max_per_img]]
    return batched_nms(boxes, scores, labels, cfg.iou_thr)[: cfg.max_per_img]


def level_scores(cls: torch.Tensor) -> torch.Tensor:
    """One level's [N, C, H, W] logits -> scores [N, H*W*C], (location, class) row-major. Every
    post-process takes its scores from here: the sigmoid of a contiguous copy, so that the same
    elements fall in the CPU kernel's vectorized body and scalar tail (their results can differ in
    the last bit) whichever path computes them."""
    return cls.float().permute(0, 2, 3, 1).reshape(cls.shape[0], -1).sigmoid()


def _level_candidates(cls: torch.Tensor, reg: torch.Tensor, stride: int, canvas_hw: tuple[int, int],
                      cfg: PostprocessConfig) -> tuple[torch.Tensor, ...]:
    """(image index, decoded box, score, label) of every (location, class) over score_thr in one
    level of every image, at most nms_pre per image: mmdetection's multi-label filter."""
    n, c, h, w = cls.shape
    scores = level_scores(cls)
    dist = reg.float().permute(0, 2, 3, 1).reshape(n, -1, 4)
    keep = scores > cfg.score_thr  # strict, multi-label: a location may give several classes
    if scores.shape[1] > cfg.nms_pre:  # the nms_pre best of those over the threshold
        top, idx = torch.where(keep, scores, -1.0).topk(cfg.nms_pre, dim=1)
        image, j = (top > cfg.score_thr).nonzero(as_tuple=True)
        flat, score = idx[image, j], top[image, j]
    else:
        image, flat = keep.nonzero(as_tuple=True)
        score = scores[image, flat]
    loc, label = flat // c, flat % c
    points = level_points(h, w, stride, cls.device)[loc]
    return image, decode(points, dist[image, loc], canvas_hw), score, label
