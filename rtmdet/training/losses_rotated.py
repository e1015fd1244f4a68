"""RTMDet-R's loss, as MMRotate 1.x's RotatedRTMDetHead.loss_by_feat computes it.

* Every prior's box is decoded from its distances and raw angle (DistanceAnglePointCoder, le90).
* The assigner is mmdet's DynamicSoftLabelAssigner with RBboxOverlaps2D: a prior is a candidate
  when its point lies inside a gt's rotated box (mmrotate's RotatedBoxes.find_inside_points, 0.01
  px margin), the IoU cost is the rotated IoU, the soft centre prior measures from the gt centre.
* QFL on every prior with the assigned IoU as the soft target; the box loss is RotatedIoULoss in
  its config's linear mode, 1 - IoU (clamped at eps first), on the positives, weighted by their
  assigned IoU; both divided by the assigned IoUs' sum averaged over the ranks (RTMDetLoss.normalize).

A predicted box with a negative width or height (tiny and s decode distances without exp) is the
same rectangle with |w| and |h| (its centre comes from (r - l)/2 and (b - t)/2), and is measured so.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rtmdet.geometry.rotated import rotated_iou
from rtmdet.inference.rotated import decode_rotated
from rtmdet.training.assigner import DynamicSoftLabelAssigner
from rtmdet.training.losses import RTMDetLoss, flatten_levels, make_priors, quality_focal_loss

LOSS_WEIGHT = 2.0  # rotated_rtmdet_*-3x-dota.py: loss_bbox=dict(type='RotatedIoULoss', mode='linear', loss_weight=2.0)
INSIDE_EPS = 0.01  # mmrotate's RotatedBoxes.find_inside_points default


def as_geometric(rboxes: Tensor) -> Tensor:
    """The rectangle a decoded box stands for: w and h as absolute values."""
    return torch.cat([rboxes[..., :2], rboxes[..., 2:4].abs(), rboxes[..., 4:]], dim=-1)


def rotated_iou_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Per pair, 1 - IoU(pred, target) for aligned [N, 5] rotated boxes, times `weight` if given."""
    loss = 1.0 - rotated_iou(pred, target, aligned=True).clamp(min=eps)
    return loss if weight is None else loss * weight


def points_inside_rboxes(points: Tensor, rboxes: Tensor, eps: float = INSIDE_EPS) -> Tensor:
    """[A, 2] points vs [..., M, 5] rotated boxes -> [..., A, M]: inside by more than eps px along
    both of the box's axes."""
    cx, cy, w, h, a = (rboxes[..., None, :, i] for i in range(5))
    dx, dy = points[:, 0, None] - cx, points[:, 1, None] - cy
    cos, sin = torch.cos(a), torch.sin(a)
    u, v = cos * dx + sin * dy, cos * dy - sin * dx
    return (u.abs() <= w / 2 - eps) & (v.abs() <= h / 2 - eps)


class RotatedDynamicSoftLabelAssigner(DynamicSoftLabelAssigner):
    """DynamicSoftLabelAssigner on rotated boxes [.., 5] (the module docstring)."""

    @staticmethod
    def _inside(points: Tensor, gts: Tensor) -> Tensor:
        return points_inside_rboxes(points, gts)

    @staticmethod
    def _ious(boxes: Tensor, gts: Tensor, pair_ok: Tensor) -> Tensor:
        """Rotated IoU of the candidate pairs only (a host sync: the rotate step runs eagerly)."""
        b, a, m = pair_ok.nonzero(as_tuple=True)
        ious = torch.zeros(pair_ok.shape, dtype=boxes.dtype, device=boxes.device)
        if b.numel():
            ious[b, a, m] = rotated_iou(as_geometric(boxes[b, a]), gts[b, m], aligned=True)
        return ious

    @staticmethod
    def _centers(gts: Tensor) -> Tensor:
        return gts[..., :2]


class RotatedRTMDetLoss(RTMDetLoss):
    """RTMDet-R's head loss (the module docstring); normalize() is RTMDet's."""

    def __init__(self, strides: Sequence[int] = (8, 16, 32), topk: int = 13, soft_center_radius: float = 3.0,
                 iou_weight: float = 3.0, qfl_beta: float = 2.0, cls_weight: float = 1.0,
                 bbox_weight: float = LOSS_WEIGHT) -> None:
        super().__init__(strides, topk, soft_center_radius, iou_weight, qfl_beta, cls_weight, bbox_weight)
        self.assigner = RotatedDynamicSoftLabelAssigner(topk, soft_center_radius, iou_weight)

    def step_sums(self, outputs: Sequence, targets: dict[str, Tensor], priors: Tensor | None = None) -> dict[str, Tensor]:
        """outputs: the RTMDet-R model's (cls_scores, bbox_preds, angle_preds); targets: rboxes
        [B, M, 5] and labels [B, M] (-1 padding)."""
        return self.rotated_sums(*outputs[:3], targets["rboxes"], targets["labels"], priors)

    def rotated_sums(self, cls_scores: Sequence[Tensor], bbox_preds: Sequence[Tensor], angle_preds: Sequence[Tensor],
                     gt_rboxes: Tensor, gt_labels: Tensor, priors: Tensor | None = None) -> dict[str, Tensor]:
        device = cls_scores[0].device
        with torch.autocast(device_type=device.type, enabled=False):
            logits = flatten_levels(cls_scores).float()
            dists = flatten_levels(bbox_preds).float()
            angles = flatten_levels(angle_preds).float()
            if priors is None:
                priors = make_priors([tuple(m.shape[-2:]) for m in cls_scores], self.strides, device=device)
            boxes = decode_rotated(priors[:, :2].float(), dists, angles)  # [B, A, 5]
            with self.phase("assigner"):
                t = self.assigner(logits, boxes, priors, gt_rboxes, gt_labels)
        with self.phase("losses"), torch.autocast(device_type=device.type, enabled=False):
            metrics = t.assign_metrics.float()
            loss_cls = quality_focal_loss(logits, metrics, t.labels, self.qfl_beta, "sum")
            image, prior = t.fg_mask.nonzero(as_tuple=True)  # a host sync: eager steps only
            pred = as_geometric(boxes[image, prior])
            loss_bbox = rotated_iou_loss(pred, t.bbox_targets[image, prior].float(), metrics[image, prior]).sum()
            # Zero times the angle outputs: with no positive on this rank the angle convs still get a
            # gradient (DDP waits for every parameter's).
            loss_bbox = loss_bbox + 0.0 * angles.sum()
            return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "metric_sum": metrics.sum(),
                    "num_pos": t.fg_mask.sum()}
