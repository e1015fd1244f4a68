"""CSPNeXt backbone (P5), as in mmdetection's RTMDet."""

from __future__ import annotations

import torch
from torch import nn

from rtmdet.models.layers import ConvModule, CSPLayer, SPPBottleneck

# (in, out, blocks, add_identity, use_spp) before widen/deepen factors.
P5_ARCH = ((64, 128, 3, True, False), (128, 256, 6, True, False), (256, 512, 6, True, False), (512, 1024, 3, False, True))


def scaled_blocks(n: int, deepen: float) -> int:
    """Blocks per CSP layer: max(round(n * deepen), 1) with Python's round, as mmdetection."""
    return max(round(n * deepen), 1)


class CSPNeXt(nn.Module):
    """Stem of three 3x3 convs, then four stages; returns the stride 8/16/32 features."""

    def __init__(self, deepen: float, widen: float, act: str = "silu", channel_attention: bool = True):
        super().__init__()
        c0 = P5_ARCH[0][0]
        self.stem = nn.Sequential(
            ConvModule(3, int(c0 * widen // 2), 3, stride=2, act=act),
            ConvModule(int(c0 * widen // 2), int(c0 * widen // 2), 3, act=act),
            ConvModule(int(c0 * widen // 2), int(c0 * widen), 3, act=act),
        )
        self.out_channels: list[int] = []
        for i, (cin, cout, n, identity, spp) in enumerate(P5_ARCH):
            cin, cout = int(cin * widen), int(cout * widen)
            layers: list[nn.Module] = [ConvModule(cin, cout, 3, stride=2, act=act)]
            if spp:
                layers.append(SPPBottleneck(cout, cout, act=act))
            layers.append(CSPLayer(cout, cout, scaled_blocks(n, deepen), identity, channel_attention, act))
            self.add_module(f"stage{i + 1}", nn.Sequential(*layers))
            self.out_channels.append(cout)
        self.out_channels = self.out_channels[1:]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stage1(self.stem(x))
        c3 = self.stage2(x)
        c4 = self.stage3(c3)
        c5 = self.stage4(c4)
        return c3, c4, c5
