"""Rotated boxes (cx, cy, w, h, angle): mmrotate's le90 convention, RTMDet-R's decoding and its
post-process.

Angles are radians; a positive angle turns the box's width axis from +x towards +y (clockwise
on screen, where y points down), as mmrotate's; normalized to [-pi/2, pi/2) ("le90").

The post-process follows mmrotate's RotatedRTMDetHead (mmdet's `_predict_by_feat_single` on
rotated boxes): per level the (location, class) pairs over score_thr, at most nms_pre of them,
decoded without clipping; rescaled to the original image; boxes with w or h <= min_bbox_size
dropped; class-aware rotated NMS; the max_per_img best.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rtmdet.geometry.rotated import norm_angle_le90, rotated_nms
from rtmdet.inference.postprocess import level_points

__all__ = ["RotatedPostprocessConfig", "decode_rotated", "norm_angle_le90", "postprocess_rotated",
           "rescale_rboxes"]


@dataclass(frozen=True)
class RotatedPostprocessConfig:
    """rotated_rtmdet_*-3x-dota.py's test_cfg."""

    score_thr: float = 0.05
    nms_pre: int = 2000
    iou_thr: float = 0.1
    max_per_img: int = 2000
    min_bbox_size: float = 0.0


def decode_rotated(points: Tensor, distances: Tensor, angles: Tensor) -> Tensor:
    """mmrotate's DistanceAnglePointCoder.decode: (left, top, right, bottom) distances measured in
    the box's own frame around each point, and its angle -> (cx, cy, w, h, angle) [..., 5].

    No clipping (mmrotate passes max_shape but ignores it), so w and h keep their sign."""
    left, top, right, bottom = distances.unbind(-1)
    angle = angles[..., 0]
    cos, sin = torch.cos(angle), torch.sin(angle)
    dx, dy = (right - left) / 2, (bottom - top) / 2
    cx = points[..., 0] + cos * dx - sin * dy
    cy = points[..., 1] + sin * dx + cos * dy
    return torch.stack([cx, cy, left + right, top + bottom, norm_angle_le90(angle)], dim=-1)


def rescale_rboxes(rboxes: Tensor, scale_wh: tuple[float, float]) -> Tensor:
    """Canvas boxes -> original-image boxes for a letterbox of scale (sx, sy): centres divided by
    their scale, sides by the length of their axis under the map, the angle of the mapped width
    axis (mmrotate's RotatedBoxes.rescale_ with 1/scale; exact when sx == sy)."""
    fx, fy = 1.0 / scale_wh[0], 1.0 / scale_wh[1]
    cx, cy, w, h, a = rboxes.unbind(-1)
    cos, sin = torch.cos(a), torch.sin(a)
    w2 = w * torch.sqrt((fx * cos) ** 2 + (fy * sin) ** 2)
    h2 = h * torch.sqrt((fx * sin) ** 2 + (fy * cos) ** 2)
    a2 = torch.atan2(fy * sin, fx * cos)
    return torch.stack([cx * fx, cy * fy, w2, h2, norm_angle_le90(a2)], dim=-1)


def postprocess_rotated(cls_scores: list[Tensor], bbox_preds: list[Tensor], angle_preds: list[Tensor],
                        strides: tuple[int, ...], scale_wh: list[tuple[float, float]],
                        cfg: RotatedPostprocessConfig = RotatedPostprocessConfig()) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per level [N, C, H, W] logits, [N, 4, H, W] distances and [N, 1, H, W] angles -> per image
    (rboxes [K, 5] in original-image pixels, scores [K], labels [K]), best first."""
    out = []
    for i in range(cls_scores[0].shape[0]):
        boxes, scores, labels = [], [], []
        for cls, reg, ang, stride in zip(cls_scores, bbox_preds, angle_preds, strides):
            c, h, w = cls.shape[1:]
            s = cls[i].float().permute(1, 2, 0).reshape(-1).sigmoid()  # (location, class) row-major
            keep = (s > cfg.score_thr).nonzero().squeeze(1)
            if keep.numel() > cfg.nms_pre:
                keep = keep[s[keep].topk(cfg.nms_pre).indices]
            loc, label = keep // c, keep % c
            points = level_points(h, w, stride, cls.device)[loc]
            dist = reg[i].float().permute(1, 2, 0).reshape(-1, 4)[loc]
            theta = ang[i].float().permute(1, 2, 0).reshape(-1, 1)[loc]
            boxes.append(decode_rotated(points, dist, theta))
            scores.append(s[keep])
            labels.append(label)
        rb = rescale_rboxes(torch.cat(boxes), scale_wh[i])
        sc, lb = torch.cat(scores), torch.cat(labels)
        ok = (rb[:, 2] > cfg.min_bbox_size) & (rb[:, 3] > cfg.min_bbox_size)
        rb, sc, lb = rb[ok], sc[ok], lb[ok]
        kept = rotated_nms(rb, sc, cfg.iou_thr, lb, max_keep=cfg.max_per_img)
        out.append((rb[kept], sc[kept], lb[kept]))
    return out
