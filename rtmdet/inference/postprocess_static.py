"""The box post-process in fixed shapes up to NMS: no host sync before the final boxes.

`rtmdet.inference.postprocess.postprocess_batch` finds each level's candidates with `nonzero`
(their number depends on the scores, so the host waits for the GPU at every level) and splits
them per image by a count read back from the GPU. On a GPU at batch 1 those waits cost more than
the arithmetic. This version keeps every tensor's shape fixed until NMS:

1. the K+1 best (location, class) pairs of each image over the levels, as if each level had kept
   its nms_pre best first (select_candidates: found among the best locations' classes, in logits),
   scores at or under score_thr marked invalid instead of dropped; K = max(PRESELECT, 8 x
   max_per_img) (the eager path's NMS preselection) unless the caller asks for another;
2. the K best of those, decoded, rescaled to the photo and marked invalid when smaller than
   min_bbox_size: [N, K] boxes, scores, labels and validity; the K+1-th score tells later
   whether the K settle the image;
3. per image, class-aware NMS (torchvision) of those K, invalid ones scored -inf so they come
   last and suppress nothing, then the valid kept ones, the first max_per_img, clipped.

Steps 1 and 2 can run inside a CUDA graph. The result equals `postprocess_batch`'s exactly:
when an image has more valid candidates than K and NMS of the K does not settle it (fewer than
max_per_img kept, or the last one kept not above the K+1-th score), the eager path itself looks
at all of them, and so does this one for that image (by calling it), as `_nms` explains there.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torchvision.ops import batched_nms

from rtmdet.inference import postprocess as eager
from rtmdet.inference.postprocess import PostprocessConfig, decode

Result = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Candidates(NamedTuple):
    """Step 2's result for a batch (see select_candidates)."""

    boxes: torch.Tensor  # [N, K, 4] photo pixels, unclipped
    scores: torch.Tensor  # [N, K], -inf where invalid
    labels: torch.Tensor  # [N, K]
    valid_count: torch.Tensor  # [N] candidates over score_thr
    beyond: torch.Tensor  # [N] the K+1-th best score (-1 when there are K or fewer)
    ranked: bool  # the K are in descending score order (they are a top-K of more), valid ones first


def all_points(sizes: list[tuple[int, int]], strides: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Every level's prior points, level after level: [sum H*W, 2]."""
    return torch.cat([eager.level_points(h, w, s, device) for (h, w), s in zip(sizes, strides)])


def select_candidates(cls_scores: list[torch.Tensor], bbox_preds: list[torch.Tensor], strides: tuple[int, ...],
                      canvas_hw: tuple[int, int], inv_scale: torch.Tensor, cfg: PostprocessConfig,
                      k: int | None = None) -> Candidates:
    """Steps 1-2 of the module docstring, shapes fixed by the maps' shapes, cfg and k alone.

    inv_scale: [N, 4] the reciprocal scale factors (1/sw, 1/sh, 1/sw, 1/sh) of each image.
    k: how many candidates go on (default: the eager path's preselection, max(PRESELECT,
    8 x max_per_img)); any k gives exact results, through finish_image's check of whether they settle.

    The K+1 best are found in logits (the sigmoid keeps their order) and, when every level's nms_pre
    reaches past K+1, among the classes of the K+1 locations whose best class scores highest: the
    K+1 best (location, class) pairs all lie there (each of those locations has a pair at or above
    the K+1-th location's best, so the K+1-th best pair does too, and a pair elsewhere cannot beat
    it). That is a top-k over locations and one over (K+1) x C pairs instead of one over every pair
    of the largest level (512,000 at 640 px and 80 classes, the selection's slowest kernel)."""
    n = cls_scores[0].shape[0]
    device = cls_scores[0].device
    sizes = [tuple(c.shape[2:]) for c in cls_scores]
    classes = cls_scores[0].shape[1]
    # K from the shapes: each level gives its nms_pre best; of all those, the K best go on. A level
    # then needs only its K+1 best (the K+1-th tells whether K settle it): the same K and K+1-th.
    total = sum(min(cfg.nms_pre, classes * h * w) for h, w in sizes)
    k = min(total, k or eager.preselection(cfg))
    logits = [c.permute(0, 2, 3, 1).reshape(n, -1, classes) for c in cls_scores]  # [N, H*W, C] per level
    # Scores as the eager path computes them (level_scores: the CPU's vectorized and scalar sigmoids
    # can differ in the last bit, so neither of a gathered few nor of a strided view).
    probs = [eager.level_scores(c).view(n, -1, classes) for c in cls_scores]
    counts = [(p > cfg.score_thr).sum(dim=(1, 2)).clamp(max=cfg.nms_pre) for p in probs]
    valid_count = torch.stack(counts).sum(dim=0)
    ranked = total > k  # as when every level kept its nms_pre best: more than K in all
    if ranked and cfg.nms_pre > k:
        top, loc, label = _top_by_location(torch.cat(logits, dim=1), torch.cat(probs, dim=1), k + 1, cfg.score_thr)
    else:
        top, loc, label = _top_by_level(probs, k, cfg, ranked)
    if ranked:
        beyond, top, loc, label = top[:, k], top[:, :k], loc[:, :k], label[:, :k]
    else:
        beyond = top.new_full((n,), -1.0)
    reg = torch.cat([r.float().permute(0, 2, 3, 1).reshape(n, -1, 4) for r in bbox_preds], dim=1)  # [N, sum H*W, 4]
    dist = reg.gather(1, loc.unsqueeze(-1).expand(-1, -1, 4))
    points = all_points(sizes, strides, device)[loc]  # [N, K, 2]
    boxes = decode(points.reshape(-1, 2), dist.reshape(-1, 4), canvas_hw).reshape(n, -1, 4)
    boxes = boxes * inv_scale[:, None, :]
    wh = boxes[..., 2:] - boxes[..., :2]
    valid = (top > cfg.score_thr) & (wh[..., 0] > cfg.min_bbox_size) & (wh[..., 1] > cfg.min_bbox_size)
    return Candidates(boxes, torch.where(valid, top, float("-inf")), label, valid_count, beyond, ranked)


def _top_by_location(logits: torch.Tensor, probs: torch.Tensor, take: int, score_thr: float) -> tuple[torch.Tensor, ...]:
    """The `take` best (location, class) pairs of [N, P, C] logits, best first (select_candidates'
    docstring says why among the best locations' classes): their scores from `probs` (the logits'
    sigmoid; -1 at or under score_thr), locations, classes."""
    n, points, classes = logits.shape
    locs = logits.amax(dim=2).topk(min(take, points), dim=1).indices  # [N, L]
    block = logits.gather(1, locs[..., None].expand(-1, -1, classes)).reshape(n, -1)  # [N, L * C]
    pick = block.topk(take, dim=1).indices
    loc, label = locs.gather(1, pick // classes), pick % classes
    score = probs.reshape(n, -1).gather(1, loc * classes + label)
    return torch.where(score > score_thr, score, -1.0), loc, label


def _top_by_level(probs: list[torch.Tensor], k: int, cfg: PostprocessConfig, ranked: bool) -> tuple[torch.Tensor, ...]:
    """Each level's min(nms_pre, K+1) best pairs of [N, H*W, C] scores, then of those the K+1 best
    when `ranked` (else all, in level order): scores (-1 at or under score_thr), locations, classes."""
    n, classes = probs[0].shape[0], probs[0].shape[2]
    device = probs[0].device
    take = min(cfg.nms_pre, k + 1)
    scores, flats = [], []
    offset = 0  # index of the level's first point
    for p in probs:
        level = torch.where(p > cfg.score_thr, p, -1.0).reshape(n, -1)  # [N, H*W*C], (loc, class) row-major
        if level.shape[1] > take:
            level, flat = level.topk(take, dim=1)
        else:
            flat = torch.arange(level.shape[1], device=device).expand(n, -1)
        scores.append(level)
        flats.append(flat + offset * classes)  # (point, class) index over all the levels
        offset += p.shape[1]
    score, flat = torch.cat(scores, dim=1), torch.cat(flats, dim=1)  # [N, T], level-major like the eager path
    if ranked:
        score, pick = score.topk(k + 1, dim=1)
        flat = flat.gather(1, pick)
    return score, flat // classes, flat % classes


def finish_image(found: Candidates, i: int, ori_hw: tuple[int, int], cfg: PostprocessConfig,
                 eager_result: Callable[[], Result]) -> Result:
    """Step 3 for image i of `found`: NMS of its valid candidates, the first max_per_img, clipped
    to the photo (ori_hw). `eager_result()` gives the eager post-process's result for the image,
    used when the K candidates do not settle it (module docstring)."""
    boxes, scores, labels = found.boxes[i], found.scores[i], found.labels[i]
    k = scores.shape[0]
    valid_count = int(found.valid_count[i])
    if found.ranked and valid_count < k:  # the invalid ones, last, change nothing: NMS without them
        boxes, scores, labels = boxes[:valid_count], scores[:valid_count], labels[:valid_count]
    keep = batched_nms(boxes, scores, labels, cfg.iou_thr)
    keep = keep[torch.isfinite(scores[keep])][: cfg.max_per_img]
    # Exact unless the image had more candidates than K and the K did not settle it: they do when
    # max_per_img were kept, the last of them scoring above every candidate left out (those come
    # after it in the full NMS, so they can neither join nor suppress the first max_per_img).
    m = cfg.max_per_img
    if valid_count > k and (keep.numel() < m or not bool(scores[keep[m - 1]] > found.beyond[i])):
        return eager_result()
    h0, w0 = ori_hw
    b = boxes[keep]
    b = torch.stack((b[:, 0].clamp(0, w0), b[:, 1].clamp(0, h0), b[:, 2].clamp(0, w0), b[:, 3].clamp(0, h0)), dim=-1)
    return b, scores[keep], labels[keep]


def postprocess_batch_static(cls_scores: list[torch.Tensor], bbox_preds: list[torch.Tensor],
                             strides: tuple[int, ...], canvas_hw: tuple[int, int],
                             scale_wh: list[tuple[float, float]], ori_hw: list[tuple[int, int]],
                             cfg: PostprocessConfig = PostprocessConfig()) -> list[Result]:
    """`postprocess_batch`'s arguments and result (the same boxes, scores and labels); see the
    module docstring for how it gets there."""
    device = cls_scores[0].device
    inv = torch.tensor([[1 / sw, 1 / sh] * 2 for sw, sh in scale_wh], dtype=torch.float32, device=device)
    found = select_candidates(cls_scores, bbox_preds, strides, canvas_hw, inv, cfg)

    def eager_result(i: int) -> Result:
        return eager.postprocess_batch([c[i : i + 1] for c in cls_scores], [r[i : i + 1] for r in bbox_preds],
                                       strides, canvas_hw, [scale_wh[i]], [ori_hw[i]], cfg)[0]

    return [finish_image(found, i, hw, cfg, lambda i=i: eager_result(i)) for i, hw in enumerate(ori_hw)]


class Final(NamedTuple):
    """Step 3 inside the graph (nms_in_graph) for a batch: the first `count` rows are the answer."""

    boxes: torch.Tensor  # [N, M, 4] clipped to the photo, M = max_per_img
    scores: torch.Tensor  # [N, M]
    labels: torch.Tensor  # [N, M]
    count: torch.Tensor  # [N] rows kept (at most M)
    exact: torch.Tensor  # [N] bool: the greedy passes converged and the K candidates settled the image


def nms_in_graph(found: Candidates, ori_hw: torch.Tensor, cfg: PostprocessConfig, passes: int = 12) -> Final:
    """Class-aware greedy NMS of the K candidates with fixed shapes and no host sync, so that it
    runs inside a CUDA graph: `finish_image`'s result when `exact` is true (else use it instead).

    The candidates are ranked by score (stable); a candidate is suppressed when a kept one ranked
    before it overlaps it by IoU > iou_thr, computed as torchvision's NMS kernel does (same class
    offsets, same float32 formula). Greedy NMS is the unique fixed point of "kept = not suppressed
    by a kept predecessor"; `passes` rounds of that update from "all kept" reach it whenever the
    chains of suppression are shorter (checked by one more round: `exact` is false otherwise).
    ori_hw: [N, 2] the photos' heights and widths (float32)."""
    n, k = found.scores.shape
    device = found.scores.device
    scores, order = found.scores.sort(dim=1, descending=True, stable=True)
    boxes = found.boxes.gather(1, order[..., None].expand(-1, -1, 4))
    labels = found.labels.gather(1, order)
    rank = torch.arange(k, device=device)
    # finish_image's NMS input: the first valid_count candidates when ranked, else all K.
    members = found.valid_count.clamp(max=k) if found.ranked else torch.full_like(found.valid_count, k)
    member = rank[None, :] < members[:, None]  # [N, K]; the members are the first ones in either case
    top = torch.where(member[..., None], boxes, float("-inf")).amax(dim=(1, 2))  # batched_nms's max coordinate
    shifted = boxes + (labels.to(boxes.dtype) * (top[:, None] + 1))[..., None]
    x1, y1, x2, y2 = shifted.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    w = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])).clamp(min=0)
    h = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])).clamp(min=0)
    inter = w * h
    over = inter / (area[:, :, None] + area[:, None, :] - inter) > cfg.iou_thr  # [N, K, K], row suppresses column
    later = rank[None, :] > rank[:, None]
    mat = torch.float16 if device.type == "cuda" else torch.float32  # 0/1 sums: exact enough to test > 0
    suppress = (over & later & member[:, :, None] & member[:, None, :]).to(mat)
    kept = member
    for _ in range(passes):
        kept = member & ~(torch.bmm(kept.to(mat)[:, None, :], suppress)[:, 0] > 0)
    settled = (member & ~(torch.bmm(kept.to(mat)[:, None, :], suppress)[:, 0] > 0)) == kept
    kept = kept & torch.isfinite(scores)
    place = kept.cumsum(dim=1) - 1
    m = cfg.max_per_img
    slot = torch.where(kept & (place < m), place, m)  # rows past max_per_img go to a dropped slot m
    pick = torch.zeros((n, m + 1), dtype=torch.long, device=device).scatter_(1, slot, rank.expand(n, -1))[:, :m]
    count = kept.sum(dim=1).clamp(max=m)
    kept_scores = scores.gather(1, pick)
    out = boxes.gather(1, pick[..., None].expand(-1, -1, 4))
    h0, w0 = ori_hw[:, :1, None], ori_hw[:, 1:, None]
    limit = torch.cat([w0, h0, w0, h0], dim=-1)  # [N, 1, 4]
    out = torch.minimum(out.clamp(min=0), limit)
    # finish_image's condition for the eager path: more candidates than K that the K did not settle.
    unsettled = (found.valid_count > k) & ((count < m) | ~(kept_scores[:, m - 1] > found.beyond))
    exact = settled.all(dim=1) & ~unsettled
    return Final(out, kept_scores, labels.gather(1, pick), count, exact)
