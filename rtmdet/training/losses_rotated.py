"""RTMDet-R's box loss: MMRotate's RotatedIoULoss in its config's linear mode, 1 - IoU of
rotated boxes (IoU clamped at eps first, as there), on the plain-torch polygon IoU."""

from __future__ import annotations

from torch import Tensor

from rtmdet.geometry.rotated import rotated_iou

LOSS_WEIGHT = 2.0  # rotated_rtmdet_*-3x-dota.py: loss_bbox=dict(type='RotatedIoULoss', mode='linear', loss_weight=2.0)


def rotated_iou_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Per pair, 1 - IoU(pred, target) for aligned [N, 5] rotated boxes, times `weight` if given."""
    loss = 1.0 - rotated_iou(pred, target, aligned=True).clamp(min=eps)
    return loss if weight is None else loss * weight
