"""RTMDet losses: Quality Focal Loss, GIoU loss and the head loss with mmdet's normalization.

``RTMDetLoss`` reproduces mmdetection's ``RTMDetHead.loss_by_feat``:

* classification: sigmoid QFL (beta 2) over every prior and class, target = IoU of the
  assigned pair at the gt class and 0 elsewhere, summed (weight 1);
* regression: GIoU loss (weight 2) on positives between the decoded prediction and its gt,
  each weighted by its assign metric (the assignment IoU), summed;
* both sums divided by the same average factor: the batch's sum of assign metrics,
  averaged over DDP ranks (all_reduce / world_size), clamped to >= 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from rtmdet.training.assigner import AssignResult, DynamicSoftLabelAssigner


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"unknown reduction {reduction!r}: use 'none', 'sum' or 'mean'")


def quality_focal_loss(pred_logits: Tensor, target_scores: Tensor, labels: Tensor,
                       beta: float = 2.0, reduction: str = "none") -> Tensor:
    """Sigmoid QFL: ``BCE(x, y) * |y - sigmoid(x)|^beta`` per element.

    pred_logits [..., C]; labels [...] in [0, C) for positives (anything else is
    background); target_scores [...] the soft target (IoU) of the positive class.
    ``reduction='none'`` returns the element-wise [..., C] loss.
    """
    num_classes = pred_logits.shape[-1]
    pos = (labels >= 0) & (labels < num_classes)
    onehot = F.one_hot(torch.where(pos, labels, 0).long(), num_classes).to(pred_logits.dtype)
    target = onehot * (target_scores * pos).to(pred_logits.dtype)[..., None]
    bce = F.binary_cross_entropy_with_logits(pred_logits, target, reduction="none")
    loss = bce * (target - pred_logits.sigmoid()).abs().pow(beta)
    return _reduce(loss, reduction)


def giou_loss(pred_boxes: Tensor, target_boxes: Tensor, weight: Tensor | None = None,
              reduction: str = "sum", eps: float = 1e-7) -> Tensor:
    """``1 - GIoU`` of aligned xyxy boxes [N, 4], optionally weighted per box [N].

    torchvision's generalized_box_iou_loss, op for op, with the intersection written as a
    `where` instead of a masked assignment: no data-dependent shape, so torch.compile keeps it
    in one graph (tests compare the two)."""
    x1, y1, x2, y2 = pred_boxes.unbind(dim=-1)
    x1g, y1g, x2g, y2g = target_boxes.unbind(dim=-1)
    xk1, yk1, xk2, yk2 = torch.max(x1, x1g), torch.max(y1, y1g), torch.min(x2, x2g), torch.min(y2, y2g)
    overlap = (yk2 > yk1) & (xk2 > xk1)
    inter = torch.where(overlap, (xk2 - xk1) * (yk2 - yk1), torch.zeros_like(x1))
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    enclosing = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    loss = 1 - (iou - ((enclosing - union) / (enclosing + eps)))
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


def make_priors(feat_sizes: Sequence[tuple[int, int]], strides: Sequence[int] = (8, 16, 32),
                device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """Point priors [A, 4] = (x, y, stride, stride), level by level, row-major (y, x).

    A cell (i, j) of a level with stride s has its point at (j * s, i * s): mmdet's
    ``MlvlPointGenerator`` with offset 0.
    """
    if len(feat_sizes) != len(strides):
        raise ValueError(f"got {len(feat_sizes)} feature sizes but {len(strides)} strides")
    levels = []
    for (height, width), stride in zip(feat_sizes, strides):
        ys = torch.arange(height, device=device, dtype=dtype) * stride
        xs = torch.arange(width, device=device, dtype=dtype) * stride
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        s = torch.full_like(xx, float(stride))
        levels.append(torch.stack([xx, yy, s, s], dim=-1).reshape(-1, 4))
    return torch.cat(levels)


def decode_distances(priors: Tensor, distances: Tensor) -> Tensor:
    """(left, top, right, bottom) pixel distances [..., A, 4] -> xyxy boxes around priors."""
    points = priors[:, :2]
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def flatten_levels(maps: Sequence[Tensor]) -> Tensor:
    """Per-level [B, K, H, W] maps -> [B, sum(H*W), K], in the order of ``make_priors``."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps],
                     dim=1)


def _no_phase(name: str) -> nullcontext:
    return nullcontext()


def average_factor(assign_metrics: Tensor) -> Tensor:
    """Sum of assign metrics, averaged over DDP ranks when initialized, clamped to >= 1."""
    return rank_mean(assign_metrics.detach().sum().float()).clamp(min=1.0)


def rank_mean(value: Tensor) -> Tensor:
    """A scalar averaged over the DDP ranks (itself in a single process): mmdetection's reduce_mean."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


class RTMDetLoss(nn.Module):
    """RTMDet head loss: assigner + QFL + weighted GIoU, normalized as mmdet does."""

    def __init__(self, strides: Sequence[int] = (8, 16, 32), topk: int = 13,
                 soft_center_radius: float = 3.0, iou_weight: float = 3.0,
                 qfl_beta: float = 2.0, cls_weight: float = 1.0,
                 bbox_weight: float = 2.0) -> None:
        super().__init__()
        self.strides = tuple(strides)
        self.assigner = DynamicSoftLabelAssigner(topk, soft_center_radius, iou_weight)
        self.qfl_beta = qfl_beta
        self.cls_weight = cls_weight
        self.bbox_weight = bbox_weight
        self.phase = _no_phase  # the trainer's phase timer (rtmdet.training.phases), when profiled

    def forward(self, cls_scores: Sequence[Tensor], bbox_preds: Sequence[Tensor],
                gt_boxes: Tensor, gt_labels: Tensor, priors: Tensor | None = None,
                pad_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Losses for one batch.

        cls_scores: per level [B, C, H, W] logits; bbox_preds: per level [B, 4, H, W]
        (l, t, r, b) distances in pixels; gt_boxes [B, M, 4] xyxy pixels; gt_labels
        [B, M] with -1 padding. Returns ``loss_cls``, ``loss_bbox``, ``loss`` (their sum),
        ``num_pos`` and ``avg_factor`` (the last two detached).
        """
        return self.normalize(self.sums(cls_scores, bbox_preds, gt_boxes, gt_labels, priors, pad_mask))

    def sums(self, cls_scores: Sequence[Tensor], bbox_preds: Sequence[Tensor], gt_boxes: Tensor,
             gt_labels: Tensor, priors: Tensor | None = None, pad_mask: Tensor | None = None) -> dict[str, Tensor]:
        """This rank's un-normalized sums: assignment and both losses, with static shapes and no
        host sync (the part `torch.compile` can take whole); `normalize` finishes the job."""
        return self.sums_and_assignment(cls_scores, bbox_preds, gt_boxes, gt_labels, priors, pad_mask)[0]

    def step_sums(self, outputs: Sequence, targets: dict[str, Tensor], priors: Tensor | None = None) -> dict[str, Tensor]:
        """`sums` from the model's outputs and the batch's targets on the device (the trainer's
        call, the same for every task)."""
        return self.sums(outputs[0], outputs[1], targets["boxes"], targets["labels"], priors=priors)

    def sums_and_assignment(self, cls_scores: Sequence[Tensor], bbox_preds: Sequence[Tensor], gt_boxes: Tensor,
                            gt_labels: Tensor, priors: Tensor | None = None, pad_mask: Tensor | None = None,
                            gt_centers: Tensor | None = None) -> tuple[dict[str, Tensor], AssignResult, Tensor]:
        """`sums`, the assignment they came from and the priors (a task's loss builds on them);
        gt_centers: the assigner's centre prior measures from these instead of the box centres."""
        device = cls_scores[0].device
        # Losses and assignment in float32 even inside an autocast region.
        with torch.autocast(device_type=device.type, enabled=False):
            logits = flatten_levels(cls_scores).float()
            dists = flatten_levels(bbox_preds).float()
            if priors is None:
                sizes = [tuple(m.shape[-2:]) for m in cls_scores]
                priors = make_priors(sizes, self.strides, device=device)
            boxes = decode_distances(priors.float(), dists)
            with self.phase("assigner"):
                t = self.assigner(logits, boxes, priors, gt_boxes, gt_labels, pad_mask, gt_centers)
        with self.phase("losses"), torch.autocast(device_type=device.type, enabled=False):
            metrics = t.assign_metrics.float()
            loss_cls = quality_focal_loss(logits, metrics, t.labels, self.qfl_beta, "sum")
            # Every prior, background replaced by a unit box against itself (zero loss, zero
            # gradient): boolean indexing would give a data-dependent shape and a host sync.
            fg = t.fg_mask[..., None]
            unit = F.pad(boxes.new_ones(2), (2, 0))  # [0, 0, 1, 1], made on the device (capturable)
            pred = torch.where(fg, boxes, unit).reshape(-1, 4)
            target = torch.where(fg, t.bbox_targets.float(), unit).reshape(-1, 4)
            loss_bbox = giou_loss(pred, target, weight=metrics.reshape(-1), reduction="sum")
            sums = {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "metric_sum": metrics.sum(),
                    "num_pos": t.fg_mask.sum()}
            return sums, t, priors

    def normalize(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """Divide both sums by mmdetection's average factor (the assign metrics' sum, averaged
        over DDP ranks, at least 1) and weight them."""
        avg = average_factor(sums["metric_sum"])
        loss_cls = sums["loss_cls"] * self.cls_weight / avg
        loss_bbox = sums["loss_bbox"] * self.bbox_weight / avg
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss": loss_cls + loss_bbox,
                "num_pos": sums["num_pos"].detach(), "avg_factor": avg}
