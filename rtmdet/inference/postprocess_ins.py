"""RTMDet-Ins's post-process: the detection steps, then each kept instance's mask.

mmdetection's `RTMDetInsHead._predict_by_feat_single` and `_bbox_mask_post_process` (rescale),
step by step (refs README, "Post-processing"):

1-7. as boxes (score filter, nms_pre per level, decode and clamp to the canvas, rescale, drop
     empty boxes, class-aware NMS, max_per_img), carrying each candidate's kernel and prior;
8.   mask logits of the kept instances from their priors and kernels on the stride-8 mask
     features of the whole canvas (not from the boxes; masks are not cropped to boxes);
9.   bilinear x8 to the canvas;
10.  bilinear to ceil(canvas / scale) and a top-left crop to the original image. mmdetection
     divides the rows by the width's scale factor and the columns by the height's; this port does
     the same (with a keep-ratio letterbox the two differ by rounding only), and pads a map that
     falls short of the image with background (mmdetection would return a smaller mask);
11.  masks = sigmoid(logits) > mask_thr, in fp32, computed as logits > logit(mask_thr) (sigmoid is
     increasing; this skips a sigmoid over K full-size maps, 15% of the post-process on a CPU).

The final boxes are then clipped to the original image, as the box post-process does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from rtmdet.inference.postprocess import PostprocessConfig, decode, level_points, level_scores
from rtmdet.models.head_ins import dynamic_mask_logits


@dataclass(frozen=True)
class InsPostprocessConfig(PostprocessConfig):
    """mmdetection's RTMDet-Ins test_cfg: the box post-process's settings with its defaults, and
    the mask threshold."""

    score_thr: float = 0.05
    nms_pre: int = 1000
    iou_thr: float = 0.6
    max_per_img: int = 100
    mask_thr: float = 0.5


def postprocess_ins_single(cls_scores: list[torch.Tensor], bbox_preds: list[torch.Tensor],
                           kernel_preds: list[torch.Tensor], mask_feat: torch.Tensor, strides: tuple[int, ...],
                           canvas_hw: tuple[int, int], scale_wh: tuple[float, float], ori_hw: tuple[int, int],
                           cfg: InsPostprocessConfig = InsPostprocessConfig()) -> tuple[torch.Tensor, ...]:
    """One image: per level [C, H, W] logits, [4, H, W] distances, [169, H, W] kernels, and the
    mask features [8, H/8, W/8] -> (boxes [K, 4], scores [K], labels [K], masks bool [K, h0, w0])."""
    parts = [_level_candidates(c, r, k, s, canvas_hw, cfg) for c, r, k, s in
             zip(cls_scores, bbox_preds, kernel_preds, strides)]
    boxes, scores, labels, kernels, priors = (torch.cat(p) for p in zip(*parts))
    sw, sh = scale_wh
    inv = torch.tensor([1 / sw, 1 / sh] * 2, dtype=torch.float32, device=boxes.device)
    boxes = boxes * inv
    wh = boxes[:, 2:] - boxes[:, :2]
    valid = (wh[:, 0] > cfg.min_bbox_size) & (wh[:, 1] > cfg.min_bbox_size)
    boxes, scores, labels, kernels, priors = boxes[valid], scores[valid], labels[valid], kernels[valid], priors[valid]
    if boxes.numel():
        keep = batched_nms(boxes, scores, labels, cfg.iou_thr)[: cfg.max_per_img]
        boxes, scores, labels, kernels, priors = boxes[keep], scores[keep], labels[keep], kernels[keep], priors[keep]
    h0, w0 = ori_hw
    masks = _masks(mask_feat.float(), kernels, priors, canvas_hw, scale_wh, ori_hw, cfg.mask_thr)
    boxes = torch.stack((boxes[:, 0].clamp(0, w0), boxes[:, 1].clamp(0, h0),
                         boxes[:, 2].clamp(0, w0), boxes[:, 3].clamp(0, h0)), dim=-1)
    return boxes, scores, labels, masks


def postprocess_ins_batch(outputs: tuple, strides: tuple[int, ...], canvas_hw: tuple[int, int],
                          scale_wh: list, ori_hw: list,
                          cfg: InsPostprocessConfig = InsPostprocessConfig()) -> list[tuple]:
    """A batch of an RTMDet-Ins model's outputs (cls, bbox, kernel maps per level, mask features),
    image by image -> per image (boxes, scores, labels, masks as COCO RLEs): what Detector and
    the training validator both keep (an image's 100 full-size masks as RLEs, not bytes)."""
    from rtmdet.data.masks import masks_to_rles

    cls_scores, bbox_preds, kernels, mask_feat = outputs
    found = []
    for i in range(mask_feat.shape[0]):
        boxes, scores, labels, masks = postprocess_ins_single(
            [c[i] for c in cls_scores], [b[i] for b in bbox_preds], [k[i] for k in kernels], mask_feat[i],
            strides, canvas_hw, tuple(scale_wh[i]), tuple(ori_hw[i]), cfg)
        found.append((boxes, scores, labels, masks_to_rles(masks)))
    return found


def _level_candidates(cls: torch.Tensor, reg: torch.Tensor, kernel: torch.Tensor, stride: int,
                      canvas_hw: tuple[int, int], cfg: InsPostprocessConfig) -> tuple[torch.Tensor, ...]:
    """Every (location, class) over score_thr in one level, the nms_pre best, with its decoded box,
    kernel and prior (x, y, stride, stride)."""
    c, h, w = cls.shape
    scores = level_scores(cls[None])[0]  # [H*W*C], (location, class) row-major
    keep = (scores > cfg.score_thr).nonzero(as_tuple=True)[0]
    top, order = scores[keep].sort(descending=True)  # mmdetection sorts, then keeps nms_pre
    top, keep = top[: cfg.nms_pre], keep[order[: cfg.nms_pre]]
    loc, label = keep // c, keep % c
    points = level_points(h, w, stride, cls.device)[loc]
    dist = reg.float().permute(1, 2, 0).reshape(-1, 4)[loc]
    kernels = kernel.float().permute(1, 2, 0).reshape(h * w, -1)[loc]
    priors = torch.cat([points, torch.full_like(points, float(stride))], dim=1)
    return decode(points, dist, canvas_hw), top, label, kernels, priors


def _masks(mask_feat: torch.Tensor, kernels: torch.Tensor, priors: torch.Tensor, canvas_hw: tuple[int, int],
           scale_wh: tuple[float, float], ori_hw: tuple[int, int], thr: float) -> torch.Tensor:
    h0, w0 = ori_hw
    if kernels.shape[0] == 0:
        return torch.zeros((0, h0, w0), dtype=torch.bool, device=mask_feat.device)
    logits = dynamic_mask_logits(mask_feat, kernels, priors)[None]  # [1, K, H/8, W/8]
    logits = F.interpolate(logits, size=canvas_hw, mode="bilinear", align_corners=False)
    sw, sh = scale_wh  # mmdetection: rows by the width's factor, columns by the height's
    size = (math.ceil(canvas_hw[0] * (1 / sw)), math.ceil(canvas_hw[1] * (1 / sh)))
    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0, :, :h0, :w0]
    if logits.shape[-2:] != (h0, w0):
        # Rows scaled by the width's factor and columns by the height's (mmdetection's order) can
        # fall a few pixels short of the image (375 x 244 at 64 px: 372 columns); what is missing
        # is background, so every mask has the image's size, as COCO's segm scoring requires.
        logits = F.pad(logits, (0, w0 - logits.shape[-1], 0, h0 - logits.shape[-2]), value=float("-inf"))
    if not 0.0 < thr < 1.0:
        return logits.sigmoid() > thr
    return logits > math.log(thr / (1.0 - thr))
