"""RTMDet-R's head (mmrotate's RotatedRTMDetSepBNHead): RTMDet's head plus an angle per point."""

from __future__ import annotations

import torch
from torch import nn

from rtmdet.models.head import STRIDES, RTMDetSepBNHead


class RotatedRTMDetSepBNHead(RTMDetSepBNHead):
    """Per level: class logits, box distances (pixels) and the angle [N, 1, H, W] in radians,
    read raw from a 1x1 conv on the regression features (mmrotate's PseudoAngleCoder, no Scale)."""

    def __init__(self, num_classes: int, channels: int, stacked_convs: int = 2, act: str = "silu",
                 exp_on_reg: bool = False, strides: tuple[int, ...] = STRIDES):
        super().__init__(num_classes, channels, stacked_convs, act, exp_on_reg, strides)
        self.rtm_ang = nn.ModuleList(nn.Conv2d(channels, 1, 1) for _ in strides)
        for conv in self.rtm_ang:  # mmrotate: normal_init(std=0.01), bias 0
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feats: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                              list[torch.Tensor]]:
        cls_scores, bbox_preds, angle_preds = [], [], []
        for lvl, x in enumerate(feats):
            cls_feat, reg_feat = self.branches(lvl, x)
            cls_scores.append(self.rtm_cls[lvl](cls_feat))
            bbox_preds.append(self.distances(lvl, reg_feat))
            angle_preds.append(self.rtm_ang[lvl](reg_feat))
        return cls_scores, bbox_preds, angle_preds
