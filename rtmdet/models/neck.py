"""CSPNeXtPAFPN neck: top-down then bottom-up paths with CSP layers, 3x3 output convs."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rtmdet.models.layers import ConvModule, CSPLayer


class CSPNeXtPAFPN(nn.Module):
    """Path-aggregation FPN over (C3, C4, C5), as mmdetection's CSPNeXtPAFPN."""

    def __init__(self, in_channels: list[int], out_channels: int, num_blocks: int, act: str = "silu"):
        super().__init__()
        n = len(in_channels)
        self.reduce_layers = nn.ModuleList()
        self.top_down_blocks = nn.ModuleList()
        for idx in range(n - 1, 0, -1):
            self.reduce_layers.append(ConvModule(in_channels[idx], in_channels[idx - 1], 1, act=act))
            self.top_down_blocks.append(
                CSPLayer(in_channels[idx - 1] * 2, in_channels[idx - 1], num_blocks, False, False, act)
            )
        self.downsamples = nn.ModuleList()
        self.bottom_up_blocks = nn.ModuleList()
        for idx in range(n - 1):
            self.downsamples.append(ConvModule(in_channels[idx], in_channels[idx], 3, stride=2, act=act))
            self.bottom_up_blocks.append(
                CSPLayer(in_channels[idx] * 2, in_channels[idx + 1], num_blocks, False, False, act)
            )
        self.out_convs = nn.ModuleList(ConvModule(c, out_channels, 3, act=act) for c in in_channels)

    def forward(self, feats: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        n = len(feats)
        # Top-down: the reduced higher level is both upsampled here and reused bottom-up.
        inner = [feats[-1]]
        for i, idx in enumerate(range(n - 1, 0, -1)):
            high = self.reduce_layers[i](inner[0])
            inner[0] = high
            up = F.interpolate(high, scale_factor=2.0, mode="nearest")
            inner.insert(0, self.top_down_blocks[i](torch.cat([up, feats[idx - 1]], dim=1)))
        outs = [inner[0]]
        for idx in range(n - 1):
            down = self.downsamples[idx](outs[-1])
            outs.append(self.bottom_up_blocks[idx](torch.cat([down, inner[idx + 1]], dim=1)))
        return tuple(conv(x) for conv, x in zip(self.out_convs, outs))
