"""RTMDet-R's head (mmrotate's RotatedRTMDetSepBNHead): RTMDet's head plus an angle per point."""

from __future__ import annotations

import torch
from torch import nn

from rtmdet.models.head import RTMDetSepBNHead


class RotatedRTMDetSepBNHead(RTMDetSepBNHead):
    """Per level: class logits, box distances (pixels) and the angle [N, 1, H, W] in radians,
    read raw from a 1x1 conv on the regression features (mmrotate's PseudoAngleCoder, no Scale)."""

    def _add_predictors(self, channels: int) -> None:
        self.rtm_ang = nn.ModuleList(nn.Conv2d(channels, 1, 1) for _ in self.strides)  # init_weights: N(0, 0.01), 0

    def forward(self, feats: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                              list[torch.Tensor]]:
        cls_scores, bbox_preds, angle_preds = [], [], []
        for lvl, x in enumerate(feats):
            cls_feat, reg_feat = self.branches(lvl, x)
            cls_scores.append(self.rtm_cls[lvl](cls_feat))
            bbox_preds.append(self.distances(lvl, reg_feat))
            angle_preds.append(self.rtm_ang[lvl](reg_feat))
        return cls_scores, bbox_preds, angle_preds
