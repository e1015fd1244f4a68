"""Rotated-box geometry in plain PyTorch (CPU or GPU, batched, no compiled extension).

A rotated box is (cx, cy, w, h, angle) in pixels and radians. The box's width axis is
u = (cos a, sin a) and its height axis v = (-sin a, cos a): a positive angle turns the width
axis from +x towards +y (clockwise on screen, where y points down), as in mmrotate. Angles are
kept in [-pi/2, pi/2) ("le90"); turning a box by pi gives the same box.

Overlaps are polygon intersections of the two rectangles: the corners of each inside the other
plus the crossings of their edges, ordered around their mean and summed with the shoelace
formula. It is exact up to float rounding (tests compare it with shapely) and differentiable
almost everywhere (the ordering is piecewise constant), so a rotated IoU loss can use it too.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

EPS = 1e-9


def norm_angle_le90(angle: Tensor) -> Tensor:
    """Angles into [-pi/2, pi/2) (mmrotate's norm_angle for le90, with torch's % semantics)."""
    return (angle + math.pi / 2) % math.pi - math.pi / 2


def rbox_to_corners(rboxes: Tensor) -> Tensor:
    """[..., 5] rotated boxes -> [..., 4, 2] corners, in one winding (positive shoelace area for
    positive w and h): c - u w/2 - v h/2, c + u w/2 - v h/2, c + u w/2 + v h/2, c - u w/2 + v h/2."""
    cx, cy, w, h, a = rboxes.unbind(-1)
    cos, sin = torch.cos(a), torch.sin(a)
    su, sv = torch.tensor([-1.0, 1.0, 1.0, -1.0], dtype=rboxes.dtype, device=rboxes.device), \
        torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=rboxes.dtype, device=rboxes.device)
    hu, hv = (w / 2)[..., None] * su, (h / 2)[..., None] * sv  # [..., 4]
    x = cx[..., None] + hu * cos[..., None] - hv * sin[..., None]
    y = cy[..., None] + hu * sin[..., None] + hv * cos[..., None]
    return torch.stack([x, y], dim=-1)


def quad_to_rbox(quads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, 4, 2] quadrilaterals (DOTA's x1 y1 ... x4 y4) -> ([N, 5] rotated boxes, [N] bool: the
    quad was already a rectangle). Each box is the quad's minimum-area enclosing rectangle (one of
    its sides lies along a side of the quad's convex hull, so every pair of points is tried)."""
    quads = np.asarray(quads, np.float64).reshape(-1, 4, 2)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    d = np.stack([quads[:, j] - quads[:, i] for i, j in pairs], axis=1)  # [N, 6, 2]
    angles = np.arctan2(d[..., 1], d[..., 0])  # [N, 6]
    u = np.stack([np.cos(angles), np.sin(angles)], -1)  # [N, 6, 2]
    v = np.stack([-np.sin(angles), np.cos(angles)], -1)
    pu = np.einsum("nkd,npd->nkp", u, quads)  # [N, 6, 4] projections on each candidate axis
    pv = np.einsum("nkd,npd->nkp", v, quads)
    w, h = pu.max(-1) - pu.min(-1), pv.max(-1) - pv.min(-1)
    area = w * h
    area[np.hypot(d[..., 0], d[..., 1]) < EPS] = np.inf  # two equal points give no direction
    k = area.argmin(1)
    n = np.arange(len(quads))
    mid_u = (pu.max(-1) + pu.min(-1))[n, k] / 2
    mid_v = (pv.max(-1) + pv.min(-1))[n, k] / 2
    center = mid_u[:, None] * u[n, k] + mid_v[:, None] * v[n, k]
    a = (angles[n, k] + math.pi / 2) % math.pi - math.pi / 2
    rboxes = np.stack([center[:, 0], center[:, 1], w[n, k], h[n, k], a], -1)
    quad_area = np.abs(_shoelace_np(quads))
    is_rect = np.isclose(quad_area, area[n, k], rtol=1e-3, atol=1e-3)
    return rboxes.astype(np.float32), is_rect


def _shoelace_np(poly: np.ndarray) -> np.ndarray:
    x, y = poly[..., 0], poly[..., 1]
    return 0.5 * (x * np.roll(y, -1, -1) - np.roll(x, -1, -1) * y).sum(-1)


def _cross(a: Tensor, b: Tensor) -> Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _inside(points: Tensor, quad: Tensor) -> Tensor:
    """[..., P, 2] points inside (or on) [..., 4, 2] convex quads of positive winding -> [..., P]."""
    edges = quad.roll(-1, dims=-2) - quad  # [..., 4, 2]
    rel = points[..., :, None, :] - quad[..., None, :, :]  # [..., P, 4, 2]
    side = _cross(edges[..., None, :, :].expand_as(rel), rel)
    scale = edges.norm(dim=-1).amax(-1)[..., None, None].clamp_min(1.0)
    return (side >= -1e-6 * scale * scale).all(-1)


def _crossings(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Edge crossings of quads a and b [..., 4, 2] -> ([..., 16, 2] points, [..., 16] valid)."""
    p, r = a[..., :, None, :], (a.roll(-1, dims=-2) - a)[..., :, None, :]  # [..., 4, 1, 2]
    q, s = b[..., None, :, :], (b.roll(-1, dims=-2) - b)[..., None, :, :]  # [..., 1, 4, 2]
    denom = _cross(r, s)  # [..., 4, 4]
    qp = q - p
    safe = torch.where(denom.abs() > EPS, denom, torch.ones_like(denom))
    t, u = _cross(qp, s) / safe, _cross(qp, r) / safe
    valid = (denom.abs() > EPS) & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
    points = p + t[..., None] * r
    return points.flatten(-3, -2), valid.flatten(-2)


def _intersection_area(a: Tensor, b: Tensor) -> Tensor:
    """Areas of the intersections of convex quads a and b [..., 4, 2] (positive winding)."""
    cross_pts, cross_ok = _crossings(a, b)
    points = torch.cat([a, b, cross_pts], dim=-2)  # [..., 24, 2]
    valid = torch.cat([_inside(a, b), _inside(b, a), cross_ok], dim=-1)
    n = valid.sum(-1, keepdim=True)
    center = (points * valid[..., None]).sum(-2) / n.clamp_min(1).to(points.dtype)
    rel = points - center[..., None, :]
    angle = torch.atan2(rel[..., 1], rel[..., 0])
    angle = torch.where(valid, angle, torch.full_like(angle, 10.0))  # invalid ones sort last
    order = angle.argsort(dim=-1)
    ordered = torch.gather(points, -2, order[..., None].expand_as(points))
    ordered_ok = torch.gather(valid, -1, order)
    # Invalid slots repeat the first point: their segments add no area.
    ordered = torch.where(ordered_ok[..., None], ordered, ordered[..., :1, :].expand_as(ordered))
    area = 0.5 * _cross(ordered, ordered.roll(-1, dims=-2)).sum(-1)
    return torch.where(n[..., 0] >= 3, area.abs(), torch.zeros_like(area))


def rotated_iou(boxes1: Tensor, boxes2: Tensor, aligned: bool = False, chunk: int = 65536) -> Tensor:
    """IoU of rotated boxes [N, 5] and [M, 5]: [N, M] (or [N] with aligned, N == M). Boxes with
    w or h <= 0 overlap nothing (IoU 0).

    For [N, M], only pairs whose circumscribed circles meet are intersected (`chunk` pairs at a
    time, to bound memory); finding them reads a count back to the host."""
    if aligned:
        return _iou_aligned(boxes1, boxes2)
    out = boxes1.new_zeros((boxes1.shape[0], boxes2.shape[0]))
    if out.numel() == 0:
        return out
    radius1, radius2 = boxes1[:, 2:4].norm(dim=1) / 2, boxes2[:, 2:4].norm(dim=1) / 2
    near = torch.cdist(boxes1[:, :2], boxes2[:, :2]) < radius1[:, None] + radius2[None, :]
    i, j = near.nonzero(as_tuple=True)
    for a, b in zip(i.split(chunk), j.split(chunk)):
        out[a, b] = _iou_aligned(boxes1[a], boxes2[b])
    return out


def _iou_aligned(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    ok = (boxes1[..., 2] > 0) & (boxes1[..., 3] > 0) & (boxes2[..., 2] > 0) & (boxes2[..., 3] > 0)
    safe1 = torch.where(ok[..., None], boxes1, boxes1.new_tensor([0.0, 0.0, 1.0, 1.0, 0.0]))
    safe2 = torch.where(ok[..., None], boxes2, boxes2.new_tensor([0.0, 0.0, 1.0, 1.0, 0.0]))
    inter = _intersection_area(rbox_to_corners(safe1), rbox_to_corners(safe2))
    area1, area2 = safe1[..., 2] * safe1[..., 3], safe2[..., 2] * safe2[..., 3]
    iou = inter / (area1 + area2 - inter).clamp_min(EPS)
    return torch.where(ok, iou.clamp(0.0, 1.0), torch.zeros_like(iou))


def rotated_nms(boxes: Tensor, scores: Tensor, iou_thr: float, labels: Tensor | None = None,
                max_keep: int | None = None) -> Tensor:
    """Greedy NMS of rotated boxes [N, 5] by score; with labels, boxes of different classes never
    suppress each other. Returns the kept indices, highest score first (at most max_keep: the
    greedy pass stops there, the same first max_keep as a full pass).

    Each kept box is intersected only with the boxes still alive after it whose circumscribed
    circles meet its own: the cost grows with kept x near boxes, not N^2."""
    if boxes.shape[0] == 0:
        return torch.zeros((0,), dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True)
    b = boxes[order]
    lab = None if labels is None else labels[order]
    radius = b[:, 2:4].norm(dim=1) / 2
    alive = torch.ones(len(b), dtype=torch.bool, device=b.device)
    kept: list[int] = []
    limit = len(b) if max_keep is None else max_keep
    i = 0
    while len(kept) < limit:
        rest = alive[i:].nonzero()
        if rest.numel() == 0:
            break
        i += int(rest[0])
        kept.append(i)
        alive[i] = False
        near = alive.clone()
        near[:i] = False
        near &= (b[:, :2] - b[i, :2]).norm(dim=1) < radius + radius[i]
        if lab is not None:
            near &= lab == lab[i]
        j = near.nonzero().squeeze(1)
        if j.numel():
            iou = _iou_aligned(b[i].expand(len(j), 5), b[j])
            alive[j[iou > iou_thr]] = False
    return order[torch.tensor(kept, dtype=torch.long, device=b.device)]
