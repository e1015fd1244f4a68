"""RTMDetSepBNHead: 3x3 convs shared across levels, BatchNorm and predictors per level."""

from __future__ import annotations

import math

import torch
from torch import nn

from rtmdet.models.layers import ConvModule

STRIDES = (8, 16, 32)


class RTMDetSepBNHead(nn.Module):
    """Per level: class logits [N, C, H, W] and box distances [N, 4, H, W] in pixels."""

    def __init__(
        self,
        num_classes: int,
        channels: int,
        stacked_convs: int = 2,
        act: str = "silu",
        exp_on_reg: bool = False,
        strides: tuple[int, ...] = STRIDES,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.strides = strides
        self.exp_on_reg = exp_on_reg
        # Registration order is the state dict's order: mmdetection's, hooks included.
        self.cls_convs = nn.ModuleList(self._tower(channels, stacked_convs, act) for _ in strides)
        self.reg_convs = self._reg_towers(channels, stacked_convs, act)
        self._add_towers(channels, stacked_convs, act)
        self.rtm_cls = nn.ModuleList(nn.Conv2d(channels, num_classes, 1) for _ in strides)
        self.rtm_reg = nn.ModuleList(nn.Conv2d(channels, 4, 1) for _ in strides)
        self._add_predictors(channels)
        # share_conv: every level uses level 0's conv modules; BN stays separate. state_dict()
        # then lists the shared weights under each level too, exactly like mmdetection.
        for lvl in range(1, len(strides)):
            for i in range(stacked_convs):
                self.cls_convs[lvl][i].conv = self.cls_convs[0][i].conv
                self.reg_convs[lvl][i].conv = self.reg_convs[0][i].conv
        self.init_weights()

    @staticmethod
    def _tower(channels: int, stacked_convs: int, act: str) -> nn.ModuleList:
        return nn.ModuleList(ConvModule(channels, channels, 3, act=act) for _ in range(stacked_convs))

    def _reg_towers(self, channels: int, stacked_convs: int, act: str) -> nn.ModuleList:
        """The regression branch's per-level convs (RTMDet: its own)."""
        return nn.ModuleList(self._tower(channels, stacked_convs, act) for _ in self.strides)

    def _add_towers(self, channels: int, stacked_convs: int, act: str) -> None:
        """Further per-level conv branches, between reg_convs and rtm_cls (task heads)."""

    def _add_predictors(self, channels: int) -> None:
        """Further per-level predictors, after rtm_reg (task heads)."""

    def init_weights(self) -> None:
        """mmdetection's head init: N(0, 0.01) convs, BN at 1/0, class bias at prior 0.01."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.reset_cls_predictors()

    def reset_cls_predictors(self) -> None:
        """Re-initialize only the class-prediction layers (used when the class count changes)."""
        prior_bias = -math.log((1 - 0.01) / 0.01)
        for conv in self.rtm_cls:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.constant_(conv.bias, prior_bias)

    def branches(self, lvl: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A level's classification and regression features (what the predictors read)."""
        cls_feat, reg_feat = x, x
        for layer in self.cls_convs[lvl]:
            cls_feat = layer(cls_feat)
        for layer in self.reg_convs[lvl]:
            reg_feat = layer(reg_feat)
        return cls_feat, reg_feat

    def distances(self, lvl: int, reg_feat: torch.Tensor) -> torch.Tensor:
        """A level's (left, top, right, bottom) distances in pixels."""
        reg = self.rtm_reg[lvl](reg_feat)
        return (reg.exp() if self.exp_on_reg else reg) * self.strides[lvl]

    def forward(self, feats: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cls_scores, bbox_preds = [], []
        for lvl, x in enumerate(feats):
            cls_feat, reg_feat = self.branches(lvl, x)
            cls_scores.append(self.rtm_cls[lvl](cls_feat))
            bbox_preds.append(self.distances(lvl, reg_feat))
        return cls_scores, bbox_preds
