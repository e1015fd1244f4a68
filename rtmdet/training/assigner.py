"""RTMDet's DynamicSoftLabelAssigner: batched for training, plus a per-image reference.

Semantics follow mmdetection 3.x ``DynamicSoftLabelAssigner`` (as used by ``RTMDetHead``):

* priors are points ``(x, y, stride_w, stride_h)`` (offset 0: top-left corner of the cell);
* a prior is a candidate only if its point lies strictly inside at least one gt box;
* cost(prior, gt) = soft-label BCE cost over all classes
  + ``-log(IoU + 1e-7) * iou_weight`` + ``10 ** (distance / stride - soft_center_radius)``;
* each gt takes its ``k`` cheapest candidates, ``k = max(1, floor(sum of its top-13 IoUs))``;
* a prior picked by several gts goes to the gt with the lowest cost (over all gts);
* ``assign_metrics`` is the IoU between the prior's predicted box and its gt.

``pred_logits`` are raw classification logits (mmdet passes the detached logits; the
assigner applies the sigmoid itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

EPS = 1e-7


@dataclass
class AssignResult:
    """Per-prior training targets for a batch of B images and A priors."""

    labels: Tensor  # [B, A] int64; num_classes marks background
    bbox_targets: Tensor  # [B, A, 4] xyxy gt box of positives ([B, A, 5] rotated boxes), 0 elsewhere
    assign_metrics: Tensor  # [B, A] IoU(pred, gt) for positives, 0 elsewhere
    fg_mask: Tensor  # [B, A] bool
    gt_inds: Tensor  # [B, A] int64 index into the padded gts, -1 for background


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bf16/float32 inputs; float64 stays float64 (tests use it)."""
    return torch.promote_types(dtype, torch.float32)


def _empty_result(num_images: int, num_priors: int, num_classes: int,
                  device: torch.device, dtype: torch.dtype, box_dim: int = 4) -> AssignResult:
    return AssignResult(
        labels=torch.full((num_images, num_priors), num_classes, dtype=torch.long, device=device),
        bbox_targets=torch.zeros(num_images, num_priors, box_dim, dtype=dtype, device=device),
        assign_metrics=torch.zeros(num_images, num_priors, dtype=dtype, device=device),
        fg_mask=torch.zeros(num_images, num_priors, dtype=torch.bool, device=device),
        gt_inds=torch.full((num_images, num_priors), -1, dtype=torch.long, device=device),
    )


def _points_inside(points: Tensor, boxes: Tensor) -> Tensor:
    """[A, 2] points vs [..., M, 4] boxes -> [..., A, M], True when strictly inside."""
    px = points[:, 0, None]
    py = points[:, 1, None]
    x1, y1, x2, y2 = (boxes[..., None, :, i] for i in range(4))
    # Four separate minima instead of a stacked [..., A, M, 4] tensor keeps memory at B*A*M.
    margin = torch.minimum(torch.minimum(px - x1, py - y1), torch.minimum(x2 - px, y2 - py))
    return margin > 0


def _center_prior(priors: Tensor, boxes: Tensor, radius: float, centers: Tensor | None = None) -> Tensor:
    """Soft centre prior ``10 ** (dist / stride - radius)``: [A, 4] priors, [..., M, 4] boxes; the
    distance to `centers` [..., M, 2] when given (the segment task: the masks' centres of mass,
    as mmdetection's assigner uses for gts with masks), else to the box centres."""
    if centers is not None:
        cx, cy = centers[..., 0], centers[..., 1]
    else:
        cx = (boxes[..., 0] + boxes[..., 2]) / 2.0
        cy = (boxes[..., 1] + boxes[..., 3]) / 2.0
    dx = priors[:, 0, None] - cx[..., None, :]
    dy = priors[:, 1, None] - cy[..., None, :]
    distance = (dx.pow(2) + dy.pow(2)).sqrt() / priors[:, 2, None]
    return torch.pow(10.0, distance - radius)


def _pairwise_iou(boxes: Tensor, gts: Tensor) -> Tensor:
    """IoU of [A, 4] boxes vs [M, 4] gts; 0/0 from degenerate pairs becomes 0, not NaN."""
    return box_iou(boxes, gts).nan_to_num(0.0)


def _batched_iou(boxes: Tensor, gts: Tensor) -> Tensor:
    """IoU of [B, A, 4] boxes vs [B, M, 4] gts -> [B, A, M]: torchvision's box_iou arithmetic,
    op for op (the same bits), for all images in one go; 0/0 becomes 0."""
    area_a = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    area_b = (gts[..., 2] - gts[..., 0]) * (gts[..., 3] - gts[..., 1])
    lt = torch.max(boxes[:, :, None, :2], gts[:, None, :, :2])
    rb = torch.min(boxes[:, :, None, 2:], gts[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, :, None] + area_b[:, None, :] - inter
    return (inter / union).nan_to_num(0.0)


class DynamicSoftLabelAssigner:
    """Batched DynamicSoftLabelAssigner (mmdet semantics, no per-gt Python loop)."""

    def __init__(self, topk: int = 13, soft_center_radius: float = 3.0,
                 iou_weight: float = 3.0) -> None:
        self.topk = topk
        self.soft_center_radius = soft_center_radius
        self.iou_weight = iou_weight

    @torch.no_grad()
    def __call__(self, pred_logits: Tensor, pred_boxes: Tensor, priors: Tensor,
                 gt_boxes: Tensor, gt_labels: Tensor,
                 pad_mask: Tensor | None = None, gt_centers: Tensor | None = None) -> AssignResult:
        """Assign gts to priors.

        pred_logits [B, A, C] raw logits, pred_boxes [B, A, 4] decoded xyxy pixels,
        priors [A, 4] (x, y, stride_w, stride_h), gt_boxes [B, M, 4], gt_labels [B, M]
        (-1 = padding), pad_mask [B, M] optional, True for real gts; gt_centers [B, M, 2]
        optional, the centres the centre prior measures from (default: the boxes'). Computed
        without gradients in float32 (float64 inputs stay float64).
        """
        dtype = _work_dtype(pred_logits.dtype)
        logits = pred_logits.detach().to(dtype)
        boxes = pred_boxes.detach().to(dtype)
        priors = priors.detach().to(dtype)
        gts = gt_boxes.detach().to(dtype)
        num_images, num_priors, num_classes = logits.shape
        gt_valid = gt_labels >= 0
        if pad_mask is not None:
            gt_valid = gt_valid & pad_mask.bool()
        # Shapes only: a batch whose gts are all padding goes through the same ops and assigns
        # nothing, so the GPU never waits for the host to look at the data.
        if gts.shape[1] == 0 or num_priors == 0:
            return _empty_result(num_images, num_priors, num_classes, logits.device, dtype, gts.shape[-1])

        inside = self._inside(priors[:, :2], gts) & gt_valid[:, None, :]
        valid = inside.any(-1)  # [B, A]: candidate priors (inside any real gt)
        pair_ok = valid[..., None] & gt_valid[:, None, :]
        ious = self._ious(boxes, gts, pair_ok)
        centers = self._centers(gts) if gt_centers is None else gt_centers.detach().to(dtype)

        cost = (self._cls_cost(logits, ious, gt_labels)
                - torch.log(ious + EPS) * self.iou_weight
                + _center_prior(priors, gts, self.soft_center_radius, centers))
        # Overflowing centre priors stay finite so a real candidate always sorts before
        # a non-candidate (inf); among themselves they are ties, as in mmdet.
        cost = cost.clamp(max=torch.finfo(dtype).max).masked_fill(~pair_ok, float("inf"))

        gt_inds, fg = self._dynamic_k_matching(cost, ious, valid, gt_valid)
        return self._gather_targets(gt_inds, fg, ious, gts, gt_labels, num_classes)

    # The box geometry (xyxy boxes here; rtmdet.training.losses_rotated overrides it for rotated ones).
    @staticmethod
    def _inside(points: Tensor, gts: Tensor) -> Tensor:
        """[A, 2] points vs [B, M, D] gts -> [B, A, M], True when inside."""
        return _points_inside(points, gts)

    @staticmethod
    def _ious(boxes: Tensor, gts: Tensor, pair_ok: Tensor) -> Tensor:
        """IoU [B, A, M] of [B, A, D] predicted boxes and [B, M, D] gts, 0 where not pair_ok."""
        return _batched_iou(boxes, gts).masked_fill(~pair_ok, 0.0)

    @staticmethod
    def _centers(gts: Tensor) -> Tensor | None:
        """The centres [B, M, 2] the centre prior measures from (None: the xyxy boxes' own)."""
        return None

    def _cls_cost(self, logits: Tensor, ious: Tensor, gt_labels: Tensor) -> Tensor:
        """Soft-label classification cost [B, A, M] without a [B, A, M, C] tensor.

        mmdet sums ``BCE(x_c, y_c) * |y_c - sigmoid(x_c)|^2`` over all C classes with
        ``y = one_hot(label) * IoU``. Every class but the gt's has y = 0, so the sum is the
        prior's all-negative total, minus its negative term at the gt class, plus the
        soft-label term at the gt class.
        """
        num_priors = logits.shape[1]
        neg = F.binary_cross_entropy_with_logits(
            logits, torch.zeros_like(logits), reduction="none") * logits.sigmoid().pow(2)
        idx = gt_labels.clamp(min=0)[:, None, :].expand(-1, num_priors, -1)
        logit_gt = logits.gather(2, idx)
        pos = F.binary_cross_entropy_with_logits(logit_gt, ious, reduction="none") \
            * (ious - logit_gt.sigmoid()).abs().pow(2)
        return neg.sum(-1, keepdim=True) - neg.gather(2, idx) + pos

    def _dynamic_k_matching(self, cost: Tensor, ious: Tensor, valid: Tensor,
                            gt_valid: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k-by-cost per gt with IoU-derived k, then conflicts to the cheapest gt."""
        num_priors = cost.shape[1]
        k = min(self.topk, num_priors)
        # Non-candidate IoUs are already 0, so this equals mmdet's top-k over candidates.
        dynamic_ks = ious.topk(k, dim=1).values.sum(1).int().clamp(min=1)  # [B, M]
        # One top-k of the largest possible k serves every gt: its first dynamic_k
        # entries are that gt's dynamic_k cheapest priors.
        cand = cost.topk(k, dim=1, largest=False).indices  # [B, k, M]
        rank = torch.arange(k, device=cost.device)[None, :, None]
        take = (rank < dynamic_ks[:, None, :]) & gt_valid[:, None, :]
        matching = torch.zeros_like(cost, dtype=torch.bool).scatter_(1, cand, take)
        matching &= valid[..., None]  # an image whose gts cover no prior matches nothing

        num_matches = matching.sum(-1)
        fg = num_matches > 0
        first = matching.to(torch.uint8).argmax(-1)
        gt_inds = torch.where(num_matches > 1, cost.argmin(-1), first)
        return gt_inds, fg

    @staticmethod
    def _gather_targets(gt_inds: Tensor, fg: Tensor, ious: Tensor, gts: Tensor,
                        gt_labels: Tensor, num_classes: int) -> AssignResult:
        metrics = ious.gather(2, gt_inds[..., None]).squeeze(-1) * fg
        labels = torch.where(fg, gt_labels.long().gather(1, gt_inds),
                             torch.full_like(gt_inds, num_classes))
        box_idx = gt_inds[..., None].expand(-1, -1, gts.shape[-1])
        targets = gts.gather(1, box_idx) * fg[..., None]
        return AssignResult(labels=labels, bbox_targets=targets, assign_metrics=metrics,
                            fg_mask=fg, gt_inds=torch.where(fg, gt_inds, -1))


@torch.no_grad()
def assign_single(pred_logits: Tensor, pred_boxes: Tensor, priors: Tensor,
                  gt_boxes: Tensor, gt_labels: Tensor, topk: int = 13,
                  soft_center_radius: float = 3.0, iou_weight: float = 3.0
                  ) -> AssignResult:
    """Reference assigner for one image, written like mmdet's (loops, dense one-hot).

    pred_logits [A, C], pred_boxes [A, 4], priors [A, 4], gt_boxes [G, 4], gt_labels [G]
    (only real gts, no padding). Returns an AssignResult with a leading batch dim of 1.
    """
    dtype = _work_dtype(pred_logits.dtype)
    logits, boxes = pred_logits.to(dtype), pred_boxes.to(dtype)
    priors, gts = priors.to(dtype), gt_boxes.to(dtype)
    num_priors, num_classes = logits.shape
    num_gt = gts.shape[0]
    out = _empty_result(1, num_priors, num_classes, logits.device, dtype)
    valid = _points_inside(priors[:, :2], gts).any(-1) if num_gt else None
    if num_gt == 0 or not bool(valid.any()):
        return out

    v_logits, v_boxes, v_priors = logits[valid], boxes[valid], priors[valid]
    num_valid = v_logits.shape[0]
    ious = _pairwise_iou(v_boxes, gts)  # [V, G]
    center = _center_prior(v_priors, gts, soft_center_radius)
    soft_label = F.one_hot(gt_labels.long(), num_classes).to(dtype)[None] * ious[..., None]
    scores = v_logits[:, None, :].expand(-1, num_gt, -1)
    cls_cost = (F.binary_cross_entropy_with_logits(scores, soft_label, reduction="none")
                * (soft_label - scores.sigmoid()).abs().pow(2)).sum(-1)
    cost = cls_cost - torch.log(ious + EPS) * iou_weight + center
    cost = cost.clamp(max=torch.finfo(dtype).max)

    matching = torch.zeros_like(cost, dtype=torch.bool)
    top_ious = ious.topk(min(topk, num_valid), dim=0).values
    dynamic_ks = top_ious.sum(0).int().clamp(min=1)
    for g in range(num_gt):
        picked = cost[:, g].topk(int(dynamic_ks[g]), largest=False).indices
        matching[picked, g] = True
    for p in range(num_valid):
        if matching[p].sum() > 1:  # conflict: keep only the cheapest gt (over all gts)
            best = cost[p].argmin()
            matching[p] = False
            matching[p, best] = True

    fg_valid = matching.any(1)
    matched = matching.to(torch.uint8).argmax(1)
    idx = valid.nonzero().squeeze(1)[fg_valid]
    g_idx = matched[fg_valid]
    out.fg_mask[0, idx] = True
    out.gt_inds[0, idx] = g_idx
    out.labels[0, idx] = gt_labels.long()[g_idx]
    out.bbox_targets[0, idx] = gts[g_idx]
    out.assign_metrics[0, idx] = ious[fg_valid, g_idx]
    return out
