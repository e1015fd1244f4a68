"""RTMDet-R's head (mmrotate's RotatedRTMDetSepBNHead): RTMDet's head plus an angle per point."""

from __future__ import annotations

import torch
from torch import nn

from rtmdet.models.head import RTMDetSepBNHead


# Initial rtm_reg bias of the sizes that decode distances without exp (tiny, s): every point starts
# with a box one stride from it on each side, as exp(0) = 1 gives the others. mmrotate starts them
# at 0, a box of no size: the rotated IoU loss of a box inside its target, w h / area, then has
# almost no gradient, and on boxes_obb (100 epochs from scratch) the first ~30 epochs found nothing.
REG_BIAS_INIT = 1.0


class RotatedRTMDetSepBNHead(RTMDetSepBNHead):
    """Per level: class logits, box distances (pixels) and the angle [N, 1, H, W] in radians,
    read raw from a 1x1 conv on the regression features (mmrotate's PseudoAngleCoder, no Scale).
    Initialized as mmrotate's except the distance bias of tiny and s (REG_BIAS_INIT)."""

    def init_weights(self) -> None:
        super().init_weights()
        if not self.exp_on_reg:
            for conv in self.rtm_reg:
                nn.init.constant_(conv.bias, REG_BIAS_INIT)

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
