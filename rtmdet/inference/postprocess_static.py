"""The box post-process in fixed shapes up to NMS: no host sync before the final boxes.

`rtmdet.inference.postprocess.postprocess_batch` finds each level's candidates with `nonzero`
(their number depends on the scores, so the host waits for the GPU at every level) and splits
them per image by a count read back from the GPU. On a GPU at batch 1 those waits cost more than
the arithmetic. This version keeps every tensor's shape fixed until NMS:

1. per level, the nms_pre best (location, class) scores of each image (all of them when the
   level has fewer), scores at or under score_thr marked invalid instead of dropped;
2. over the levels, the best `preselect` = max(PRESELECT, 8 x max_per_img) of each image (the
   eager path's NMS preselection), decoded, rescaled to the photo and marked invalid when
   smaller than min_bbox_size: [N, K] boxes, scores, labels and validity;
3. per image, class-aware NMS (torchvision) of those K, invalid ones scored -inf so they come
   last and suppress nothing, then the valid kept ones, the first max_per_img, clipped.

Steps 1 and 2 can run inside a CUDA graph. The result equals `postprocess_batch`'s exactly:
when an image has more valid candidates than K and NMS of the K keeps fewer than max_per_img
(or scores tie at the cut), the eager path itself looks at all of them, and so does this one
for that image (by calling it), as `_nms` explains there.
"""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from rtmdet.inference import postprocess as eager
from rtmdet.inference.postprocess import PostprocessConfig, decode

Result = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def all_points(sizes: list[tuple[int, int]], strides: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Every level's prior points, level after level: [sum H*W, 2]."""
    return torch.cat([eager.level_points(h, w, s, device) for (h, w), s in zip(sizes, strides)])


def select_candidates(cls_scores: list[torch.Tensor], bbox_preds: list[torch.Tensor], strides: tuple[int, ...],
                      canvas_hw: tuple[int, int], inv_scale: torch.Tensor, cfg: PostprocessConfig
                      ) -> tuple[torch.Tensor, ...]:
    """Steps 1-2 of the module docstring, shapes fixed by the maps' shapes and cfg alone.

    inv_scale: [N, 4] the reciprocal scale factors (1/sw, 1/sh, 1/sw, 1/sh) of each image.
    Returns boxes [N, K, 4] in photo pixels (unclipped), scores [N, K] (-inf where invalid),
    labels [N, K], the number of valid candidates of each image [N] and the K+1-th best score
    of each image [N] (-1 when there are K or fewer)."""
    n = cls_scores[0].shape[0]
    device = cls_scores[0].device
    sizes = [tuple(c.shape[2:]) for c in cls_scores]
    scores, flats, dists = [], [], []
    offset = 0  # index of the level's first point in all_points
    for cls, reg in zip(cls_scores, bbox_preds):
        c, h, w = cls.shape[1:]
        level = cls.float().permute(0, 2, 3, 1).reshape(n, -1).sigmoid()  # [N, H*W*C], (loc, class) row-major
        level = torch.where(level > cfg.score_thr, level, -1.0)
        if level.shape[1] > cfg.nms_pre:
            level, flat = level.topk(cfg.nms_pre, dim=1)
        else:
            flat = torch.arange(level.shape[1], device=device).expand(n, -1)
        scores.append(level)
        flats.append(flat + offset * c)  # (point, class) index, per level then made global below
        dists.append((reg.float().permute(0, 2, 3, 1).reshape(n, -1, 4), c, offset))
        offset += h * w
    classes = cls_scores[0].shape[1]
    score = torch.cat(scores, dim=1)  # [N, T], level-major like the eager path
    flat = torch.cat(flats, dim=1)
    valid_count = (score > cfg.score_thr).sum(dim=1)
    k = min(score.shape[1], max(eager.PRESELECT, 8 * cfg.max_per_img))
    if score.shape[1] > k:
        top, pick = score.topk(k + 1, dim=1)
        beyond, top, pick = top[:, k], top[:, :k], pick[:, :k]
    else:
        top, pick, beyond = score, torch.arange(score.shape[1], device=device).expand(n, -1), score.new_full((n,), -1.0)
    flat = flat.gather(1, pick)
    loc, label = flat // classes, flat % classes
    reg = torch.cat([d for d, _, _ in dists], dim=1)  # [N, sum H*W, 4]
    dist = reg.gather(1, loc.unsqueeze(-1).expand(-1, -1, 4))
    points = all_points(sizes, strides, device)[loc]  # [N, K, 2]
    boxes = decode(points.reshape(-1, 2), dist.reshape(-1, 4), canvas_hw).reshape(n, -1, 4)
    boxes = boxes * inv_scale[:, None, :]
    wh = boxes[..., 2:] - boxes[..., :2]
    valid = (top > cfg.score_thr) & (wh[..., 0] > cfg.min_bbox_size) & (wh[..., 1] > cfg.min_bbox_size)
    return boxes, torch.where(valid, top, float("-inf")), label, valid_count, beyond


def postprocess_batch_static(cls_scores: list[torch.Tensor], bbox_preds: list[torch.Tensor],
                             strides: tuple[int, ...], canvas_hw: tuple[int, int],
                             scale_wh: list[tuple[float, float]], ori_hw: list[tuple[int, int]],
                             cfg: PostprocessConfig = PostprocessConfig()) -> list[Result]:
    """`postprocess_batch`'s arguments and result (the same boxes, scores and labels); see the
    module docstring for how it gets there."""
    device = cls_scores[0].device
    inv = torch.tensor([[1 / sw, 1 / sh] * 2 for sw, sh in scale_wh], dtype=torch.float32, device=device)
    boxes, scores, labels, valid_count, beyond = select_candidates(cls_scores, bbox_preds, strides, canvas_hw, inv,
                                                                   cfg)
    k = scores.shape[1]
    out: list[Result] = []
    for i, (h0, w0) in enumerate(ori_hw):
        keep = batched_nms(boxes[i], scores[i], labels[i], cfg.iou_thr)
        keep = keep[torch.isfinite(scores[i][keep])][: cfg.max_per_img]
        # Exact unless the image had more candidates than K and the K did not settle it.
        if int(valid_count[i]) > k and (keep.numel() < cfg.max_per_img or not bool(scores[i][k - 1] > beyond[i])):
            out.extend(eager.postprocess_batch([c[i : i + 1] for c in cls_scores], [r[i : i + 1] for r in bbox_preds],
                                               strides, canvas_hw, [scale_wh[i]], [ori_hw[i]], cfg))
            continue
        b = boxes[i][keep]
        b = torch.stack((b[:, 0].clamp(0, w0), b[:, 1].clamp(0, h0), b[:, 2].clamp(0, w0), b[:, 3].clamp(0, h0)), dim=-1)
        out.append((b, scores[i][keep], labels[i][keep]))
    return out
