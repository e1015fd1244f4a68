"""The one post-process: decode distances, score filter, top-k, class-aware NMS, rescale.

It follows mmdetection's `_predict_by_feat_single` step by step (refs README), then clips the
final boxes to the original image, which is what users expect.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms


@dataclass(frozen=True)
class PostprocessConfig:
    """mmdetection's test_cfg defaults."""

    score_thr: float = 0.001
    nms_pre: int = 30000
    iou_thr: float = 0.65
    max_per_img: int = 300
    min_bbox_size: float = 0.0


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
    all_boxes, all_scores, all_labels = [], [], []
    for cls, reg, stride in zip(cls_scores, bbox_preds, strides):
        c, h, w = cls.shape
        scores = cls.float().permute(1, 2, 0).reshape(-1, c).sigmoid()
        dist = reg.float().permute(1, 2, 0).reshape(-1, 4)
        keep = scores > cfg.score_thr  # strict, multi-label: a location may give several classes
        scores = scores[keep]
        idx = keep.nonzero()
        scores, order = scores.sort(descending=True)
        top = order[: cfg.nms_pre]
        scores, idx = scores[: cfg.nms_pre], idx[top]
        loc, labels = idx.unbind(dim=1)
        points = level_points(h, w, stride, cls.device)[loc]
        all_boxes.append(decode(points, dist[loc], canvas_hw))
        all_scores.append(scores)
        all_labels.append(labels)
    boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
    # Rescale before NMS, by the fp32 reciprocal of the scale factor (as mmdetection does).
    inv = torch.tensor([1 / scale_wh[0], 1 / scale_wh[1]] * 2, dtype=torch.float32, device=boxes.device)
    boxes = boxes * inv
    wh = boxes[:, 2:] - boxes[:, :2]
    valid = (wh[:, 0] > cfg.min_bbox_size) & (wh[:, 1] > cfg.min_bbox_size)
    boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
    if boxes.numel():
        keep = batched_nms(boxes, scores, labels, cfg.iou_thr)[: cfg.max_per_img]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    h0, w0 = ori_hw
    boxes = torch.stack(
        (boxes[:, 0].clamp(0, w0), boxes[:, 1].clamp(0, h0), boxes[:, 2].clamp(0, w0), boxes[:, 3].clamp(0, h0)), dim=-1
    )
    return boxes, scores, labels
