"""Rotated boxes (cx, cy, w, h, angle): mmrotate's le90 convention and RTMDet-R's decoding.

Angles are radians; a positive angle turns the box's width axis from +x towards +y (clockwise
on screen, where y points down), as mmrotate's; normalized to [-pi/2, pi/2) ("le90").
"""

from __future__ import annotations

import torch
from torch import Tensor

from rtmdet.geometry.rotated import norm_angle_le90

__all__ = ["decode_rotated", "norm_angle_le90"]


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
