"""RTMDet-Ins's loss: RTMDet's, plus mmdetection's Dice loss on the positives' masks.

``RTMDetInsLoss`` follows mmdetection's ``RTMDetInsHead.loss_by_feat`` and ``loss_mask_by_feat``:

* the assignment and the class and box losses are RTMDet's, except that the assigner's soft
  centre prior measures from each gt's mask centre of mass instead of its box centre;
* every positive prior's kernel turns its image's mask features into a mask (the dynamic
  convolution of rtmdet.models.head_ins), upsampled from stride 8 to the mask loss stride 4
  (bilinear, align_corners False) and compared with its gt's mask sampled at that stride (the
  loader ships it so: rtmdet.data.masks.mask_loss_targets);
* Dice loss (sigmoid, squared sums, eps 5e-6 on each), summed over positives, divided by the
  number of positives averaged over the DDP ranks (at least 1), weighted 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rtmdet.data.masks import MASK_LOSS_STRIDE
from rtmdet.models.head_ins import MASK_STRIDE, dynamic_mask_logits
from rtmdet.training.losses import RTMDetLoss, flatten_levels, rank_mean

DICE_EPS = 5e-6


def dice_loss(logits: Tensor, targets: Tensor, eps: float = DICE_EPS) -> Tensor:
    """Per instance ``1 - 2 sum(p t) / (sum(p^2) + eps + sum(t^2) + eps)`` with p = sigmoid(logits)
    [K, H, W] and binary targets [K, H, W]: mmdetection's DiceLoss (naive_dice False)."""
    p = logits.sigmoid().flatten(1)
    t = targets.flatten(1).to(p.dtype)
    a = (p * t).sum(1)
    b = (p * p).sum(1) + eps
    c = (t * t).sum(1) + eps
    return 1 - 2 * a / (b + c)


class RTMDetInsLoss(RTMDetLoss):
    """RTMDet's head loss plus the Dice mask loss (see the module docstring)."""

    def __init__(self, strides: Sequence[int] = (8, 16, 32), mask_weight: float = 2.0,
                 mask_loss_stride: int = MASK_LOSS_STRIDE, **kwargs) -> None:
        super().__init__(strides, **kwargs)
        self.mask_weight = mask_weight
        self.upsample = MASK_STRIDE // mask_loss_stride

    def step_sums(self, outputs: Sequence, targets: dict[str, Tensor], priors: Tensor | None = None) -> dict[str, Tensor]:
        """The detection sums (assigned with the masks' centres) and the positives' Dice sum.
        outputs: the Ins model's (cls_scores, bbox_preds, kernel_preds, mask_feat); targets:
        boxes, labels, masks [B, M, H/4, W/4] and mask_centers [B, M, 2]."""
        cls_scores, bbox_preds, kernel_preds, mask_feat = outputs
        sums, t, priors = self.sums_and_assignment(cls_scores, bbox_preds, targets["boxes"], targets["labels"],
                                                   priors, gt_centers=targets["mask_centers"])
        with self.phase("mask loss"), torch.autocast(device_type=mask_feat.device.type, enabled=False):
            kernels = flatten_levels(kernel_preds).float()  # [B, A, 169]
            feats = mask_feat.float()
            image, prior = t.fg_mask.nonzero(as_tuple=True)  # the positives: a host sync, eager steps only
            logits = dynamic_mask_logits(feats[image], kernels[image, prior], priors[prior].float())
            if logits.shape[0]:
                logits = F.interpolate(logits[None], scale_factor=self.upsample, mode="bilinear",
                                       align_corners=False)[0]
            gt = targets["masks"][image, t.gt_inds[image, prior]]
            # Zero times every mask output: each rank's backward reaches the mask branches even
            # with no positive (DDP waits for every parameter's gradient).
            sums["loss_mask"] = dice_loss(logits, gt).sum() + 0.0 * (feats.sum() + kernels.sum())
            sums["mask_pos"] = torch.tensor(float(image.numel()), device=feats.device)
        return sums

    def normalize(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        out = super().normalize(sums)
        num = rank_mean(sums["mask_pos"]).clamp(min=1.0)
        out["loss_mask"] = sums["loss_mask"] * self.mask_weight / (num + torch.finfo(torch.float32).eps)
        out["loss"] = out["loss"] + out["loss_mask"]
        return out
